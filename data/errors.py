"""Errors raised by the ``data`` package.

Every problem with an input file (missing, unreadable, wrong columns, bad values)
surfaces as a :class:`DataError` whose message states what was expected and where.
"""

from __future__ import annotations


class DataError(ValueError):
    """A data file or data request is missing or malformed.

    Guarantee: the message names the offending path, column(s) or value(s) and
    says what was expected instead.
    """


class UnknownCountryError(DataError, KeyError):
    """A country name that the data set (or partition) does not contain.

    It is both a :class:`DataError` and a :class:`KeyError`, so either
    ``except DataError`` or ``except KeyError`` catches it.
    """

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return Exception.__str__(self)

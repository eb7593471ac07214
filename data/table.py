"""Reading one CSV file into a checked table.

:func:`read_table` guarantees: the file exists and parses as CSV; every required
column is present (extra columns are ignored, not returned); every numeric column
holds only numbers or empty cells; the SHA-256 returned is of exactly the bytes
that were parsed. Any violation raises :class:`DataError` naming the path and
the columns or values at fault.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from carbonfed.data.errors import DataError

_MAX_SHOWN = 5
_MISSING_TOKENS = ("", "NA", "NaN", "nan", "N/A", "null")  # cells read as "no value"


@dataclass(frozen=True, eq=False)
class Table:
    """A parsed CSV restricted to the requested columns, with its fingerprint."""

    path: Path
    frame: pd.DataFrame  # exactly the requested columns, in the requested order
    sha256: str          # hex digest of the file bytes that were parsed
    rows_read: int       # data rows in the file (header excluded)


def read_table(
    path: str | Path,
    text_columns: tuple[str, ...],
    numeric_columns: tuple[str, ...],
) -> Table:
    """Read ``path`` keeping ``text_columns`` (as strings) and ``numeric_columns`` (as float64).

    Empty numeric cells become NaN; non-numeric text in a numeric column is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"expected a CSV file at {path}, but it does not exist")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read CSV file {path}: {exc}") from exc

    wanted = tuple(text_columns) + tuple(numeric_columns)
    try:
        header = pd.read_csv(io.BytesIO(raw), nrows=0).columns
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable CSV file: {exc}") from exc
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(
            f"{path} is missing required column(s) {missing}; "
            f"expected at least {list(wanted)}"
        )

    try:
        frame = pd.read_csv(
            io.BytesIO(raw),
            usecols=list(wanted),
            dtype={c: str for c in wanted},  # parse everything as text, convert below
            keep_default_na=False,
        )
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} could not be parsed as CSV: {exc}") from exc

    out = pd.DataFrame(index=frame.index)
    for col in text_columns:
        out[col] = frame[col].astype(str).str.strip()
    for col in numeric_columns:
        out[col] = _to_float(frame[col], col, path)
    return Table(
        path=path,
        frame=out[list(wanted)],
        sha256=hashlib.sha256(raw).hexdigest(),
        rows_read=len(frame),
    )


def _to_float(column: pd.Series, name: str, path: Path) -> pd.Series:
    text = column.astype(str).str.strip()
    empty = text.isin(_MISSING_TOKENS)
    values = pd.to_numeric(text.where(~empty, None), errors="coerce").astype("float64")
    bad = text[~empty & values.isna()]
    if len(bad):
        shown = [f"line {int(i) + 2}: {v!r}" for i, v in bad.head(_MAX_SHOWN).items()]
        raise DataError(
            f"{path}: column {name!r} must be numeric, found {len(bad)} non-numeric "
            f"value(s), e.g. {', '.join(shown)}"
        )
    return values

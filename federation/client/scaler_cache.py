"""This process's scalers: the statistics aggregates every training request carries, opened once.

Every train and evaluate request carries the run's statistics aggregates (stages 1..3), and a
simulation worker serves many clients of one run: each would decrypt the same aggregates, check
the same tags and build the same scaler. :func:`scaler` does that once per process.

Guarantees
----------
* :func:`scaler` returns what ``compute()`` returns for ``key``; ``compute`` runs once per
  process for a key (at most :data:`MAX_KEPT` keys are kept), and an exception it raises is
  never kept: a refused aggregate is opened, and refused, again at every request.
* :func:`scaler_key` holds everything that decides the scaler and whether it is accepted: the
  run config, the client's HE key (its fingerprint: a client under another key decrypts, and is
  refused, anew), the tag key, charter and plain modulus of its check slots, each aggregate's
  SHA-256 and term count, and the contributions the request names. A request that differs in
  any of these is opened anew.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

MAX_KEPT = 16
_KEPT: dict[tuple, object] = {}


def scaler_key(participant, stats: list[tuple[bytes, int]], named: list) -> tuple:
    """The key of the scaler ``participant`` makes from ``stats`` with contributions ``named``."""
    signer = participant.signer
    tags = (signer.tag_key, signer.charter.sha256, signer.modulus) if signer is not None else None
    aggregates = tuple((hashlib.sha256(data).digest(), int(terms)) for data, terms in stats)
    return participant.cfg, participant.fingerprint, tags, aggregates, repr(named)


def scaler(key: tuple, compute: Callable[[], object]):
    """The scaler of ``key``: kept from an earlier call in this process, else ``compute()``."""
    if key not in _KEPT:
        value = compute()
        if len(_KEPT) >= MAX_KEPT:
            _KEPT.clear()
        _KEPT[key] = value
    return _KEPT[key]

"""The privacy ledger: an append-only, hash-chained JSON-lines file.

Guarantees
----------
* One JSON object per line; each carries ``seq`` (0, 1, 2, ...), ``prev_hash`` (the ``hash`` of
  the line before, or 64 zeros) and ``hash`` = SHA-256 of the line's canonical JSON without its
  own ``hash``. Editing, deleting, inserting or reordering a line breaks the chain, and
  :func:`check_chain` says where.
* The chain has no key: it locates an accidental or third-party edit, but whoever holds the file
  (the server) can write a fresh valid chain. What the server cannot rewrite are the clients'
  signed statements that its lines carry (:mod:`carbonfed.privacy.statements`), checked by
  :mod:`carbonfed.privacy.audit.verify` with the clients' public keys.
* Each append is written with one ``write`` of a whole line, flushed and fsynced before
  :meth:`Ledger.append` returns: a crash loses at most the line being written, never one
  already recorded. Reopening a ledger continues its chain (a resumed run stays continuous).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

GENESIS = "0" * 64


def _canonical(record: dict) -> bytes:
    return json.dumps({k: v for k, v in record.items() if k != "hash"}, sort_keys=True,
                      separators=(",", ":"), allow_nan=True).encode()


def line_hash(record: dict) -> str:
    return hashlib.sha256(_canonical(record)).hexdigest()


class LedgerError(ValueError):
    """The ledger file is unreadable or its hash chain is broken."""


def read_ledger(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise LedgerError(f"ledger not found: {p}")
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise LedgerError(f"{p}:{i}: not a JSON line ({exc})") from exc
    return out


def check_chain(records: list[dict]) -> list[str]:
    """Every break in the chain, as messages naming the line (1-based); empty if intact."""
    problems, prev = [], GENESIS
    for i, rec in enumerate(records, 1):
        if rec.get("seq") != i - 1:
            problems.append(f"line {i}: seq is {rec.get('seq')!r}, expected {i - 1} (a line was deleted or inserted)")
        if rec.get("prev_hash") != prev:
            problems.append(f"line {i}: prev_hash does not match the hash of line {i - 1}")
        if rec.get("hash") != line_hash(rec):
            problems.append(f"line {i}: content does not match its hash (the line was edited)")
        prev = rec.get("hash")
    return problems


class Ledger:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seq, self._prev = 0, GENESIS
        if self.path.exists() and self.path.stat().st_size:
            records = read_ledger(self.path)
            problems = check_chain(records)
            if problems:
                raise LedgerError(f"refusing to extend {self.path}: " + "; ".join(problems[:3]))
            self._seq, self._prev = len(records), records[-1]["hash"]

    def append(self, record: dict) -> dict:
        rec = {**record, "seq": self._seq, "prev_hash": self._prev}
        rec["hash"] = line_hash(rec)
        data = (json.dumps(rec, sort_keys=True, allow_nan=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._seq, self._prev = self._seq + 1, rec["hash"]
        return rec

"""Bound aggregates: each stored aggregate carries its run, kind, round and contributors in its
check slots, so a swapped, stale or missing file is refused by name.

Every block of a packed vector starts with a check slot (:mod:`carbonfed.privacy.packing`). A
client sets its check slots to a *tag* (:func:`tag_checks`) instead of 1::

    tag(client, kind, round) = HMAC-SHA256(tag key, client, kind, round) mod ⌊t/2⌋ + 1

with ``kind`` one of :data:`KINDS` and the tag key (:func:`tag_key`) derived from the charter's
SHA-256 and, in HE runs, the key holders' secret key. An honest sum of the contributions of
clients C then decrypts to Σ_{c∈C} tag(c, kind, round) mod t in every check slot; whoever
decrypts it (a client receiving the global model or statistics, the key holders' report) checks
that against the kind, round and contributors it expects (:func:`check_aggregate`), which are
listed in the ledger (:func:`expected_aggregates`).

Why the server cannot make a swapped file pass
----------------------------------------------
The server writes every file and holds the public key, so it can encrypt any vector and add
ciphertexts. Were the tags public, it could relabel a real aggregate: adding an encryption of
Δ = tag' − tag in each check slot turns round 3's metrics into "round 5's". The tags are
therefore keyed with the key holders' secret key, which the server never holds (HE runs): it
knows no tag, so it can neither relabel an aggregate of another round, kind or run (each has
other tags), nor make a term of its own that counts as a client's (its check slot would have to
hold that client's tag), nor count one client's ciphertext twice (2·tag_A ≠ tag_A + tag_B).
Any of these makes the check slots read a value that no expected contributor set gives,
except with probability about 1/t ≈ 2⁻³² per check. What it can still do: add terms whose check
slots hold 0 (shifting the payload by values it chose, which a key holder cannot see; G7), or
withhold a file, which :func:`expected_aggregates` and the signed statements expose as missing.

Without HE there is no secret: the tags are public and bind a file only against accidents and
parties other than the server, which sees and could rewrite every plaintext aggregate anyway.

Guarantees
----------
* :func:`check_aggregate` returns the vector with its check slots set back to the number of
  contributions (what :mod:`carbonfed.privacy.packing`'s ``unpack_sum`` expects), or raises
  :class:`BindingError` naming the file and, where one of the candidates given matches, the
  aggregate the file really holds (for example "the metrics of round 3": stale or swapped).
* :func:`expected_aggregates` lists, from a ledger and its charter, every aggregate file a
  key holder must find (with its contributors), so a missing one is named.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from carbonfed.privacy.charter import Charter
from carbonfed.privacy.packing import BLOCK
from carbonfed.privacy.signing import canonical

TAG_DOMAIN = b"carbonfed check-slot tag v1\0"
KINDS = ("update", "stats", "stats2", "stats3", "metrics")
# A part of an aggregate: (kind, round, contributing clients).
Part = tuple[str, int, tuple[str, ...]]


class BindingError(ValueError):
    """A stored aggregate is missing, or its check slots do not bind it to what it should be."""


def secret_key_bytes(ctx) -> bytes:
    """The key holders' secret BFV key as bytes (stable across serialisations of the context)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "secret.key")
        ctx.secret_key().data.save(path)
        with open(path, "rb") as fh:
            return fh.read()


def tag_key(charter_sha256: str, secret: bytes | None) -> bytes:
    """The tag key of a run: secret (``secret``: :func:`secret_key_bytes` of the key holders'
    context) in HE runs, public (the charter alone) without HE."""
    return hashlib.sha256(TAG_DOMAIN + charter_sha256.encode() + b"\0" + (secret or b"")).digest()


@functools.lru_cache(maxsize=1 << 16)
def slot_tag(key: bytes, client: str, kind: str, rnd: int, modulus: int) -> int:
    """``client``'s check-slot value for its ``kind`` contribution of round ``rnd``: 1..⌊t/2⌋.

    Memoised (a pure function of its arguments): every client checks the tags of every
    contributor to each aggregate it receives, the same few thousand values all run long."""
    if kind not in KINDS:
        raise ValueError(f"unknown aggregate kind {kind!r} (one of {KINDS})")
    mac = hmac.new(key, canonical({"client": client, "kind": kind, "round": int(rnd)}), hashlib.sha256).digest()
    return int.from_bytes(mac[:8], "big") % (modulus // 2) + 1


def tag_checks(vec: np.ndarray, tag: int) -> np.ndarray:
    """``vec`` (packed with check slots of 1) with every check slot set to ``tag``."""
    out = np.array(vec, dtype=np.int64, copy=True)
    if not np.all(out[::BLOCK] == 1):
        raise ValueError("the vector's check slots are not the packing's 1s: tag a freshly packed vector")
    out[::BLOCK] = int(tag)
    return out


def expected_check(key: bytes, parts: Sequence[Part], modulus: int) -> int:
    """The check-slot value (mod t) of an honest sum of ``parts``."""
    return _expected_check(key, tuple((str(kind), int(rnd), tuple(clients)) for kind, rnd, clients in parts), modulus)


@functools.lru_cache(maxsize=1024)
def _expected_check(key: bytes, parts: tuple[Part, ...], modulus: int) -> int:
    # memoised: the same aggregate (statistics stages, global model) is checked by every client
    return sum(slot_tag(key, c, kind, rnd, modulus) for kind, rnd, clients in parts for c in clients) % modulus


def _describe(parts: Sequence[Part]) -> str:
    return " + ".join(f"the {kind} of round {rnd} ({len(clients)} contribution(s))" for kind, rnd, clients in parts)


def check_aggregate(name: str, vec: np.ndarray, key: bytes, parts: Sequence[Part], modulus: int,
                    candidates: Mapping[str, Sequence[Part]] | None = None) -> np.ndarray:
    """``vec`` (a decrypted aggregate read from ``name``) with check slots reset to its number of
    contributions, if they carry exactly the tags of ``parts``; else :class:`BindingError`.
    ``candidates`` (label → parts): other aggregates of the run, to say which one the file holds."""
    checks = np.mod(np.asarray(vec, dtype=np.int64)[::BLOCK], modulus)
    want = expected_check(key, parts, modulus)
    if checks.size and np.all(checks == want):
        out = np.array(vec, dtype=np.int64, copy=True)
        out[::BLOCK] = sum(len(clients) for _, _, clients in parts)
        return out
    if checks.size and not np.all(checks == checks[0]):
        raise BindingError(f"{name}: its check slots differ between blocks: a corrupted ciphertext, or a term "
                           "under another key was summed into it")
    found = [label for label, other in (candidates or {}).items()
             if checks.size and expected_check(key, other, modulus) == checks[0]]
    holds = (f"it holds {found[0]} (a stale or swapped file)" if found else
             "it holds none of this run's aggregates: a file of another run, one the server made, or a corrupted one")
    raise BindingError(f"{name}: its check slots do not carry the tags of {_describe(parts)}; {holds}")


# -- which aggregates a run must have --------------------------------------------------------------

@dataclass(frozen=True)
class Expected:
    name: str                   # file name under aggregates/
    parts: tuple[Part, ...]
    lines: tuple[int, ...]      # the ledger lines (1-based) of the accepted contributions

    @property
    def terms(self) -> int:
        return sum(len(clients) for _, _, clients in self.parts)

    def label(self) -> str:
        return _describe(self.parts)


def stats_name(stage: int) -> str:
    return "stats" if stage == 1 else f"stats{stage}"


def _accepted(records: Sequence[dict]) -> dict[tuple[str, int], list[tuple[int, str]]]:
    """(kind, round or stage) → [(line no, client)] of the accepted contributions. A round that a
    restarted server made again (accepted lines of it both before and after a ``resume`` line)
    counts from its last attempt only: the earlier one's aggregate was never kept. A ``resume``
    line drops nothing else (one the server appended on its own excuses no missing file)."""
    out: dict = {}
    resumes = [n for n, rec in enumerate(records, 1) if rec.get("kind") == "resume"]
    for n, rec in enumerate(records, 1):
        if rec.get("status") != "accepted" or rec.get("kind") not in ("stats", "train", "evaluate"):
            continue
        kind = stats_name(int(rec.get("stage", 1))) if rec["kind"] == "stats" else rec["kind"]
        out.setdefault((kind, int(rec.get("round", 0))), []).append((n, str(rec.get("country"))))
    for key, lines in out.items():
        cut = max((r for r in resumes if lines[0][0] < r < lines[-1][0]), default=None)
        if cut is not None:
            out[key] = [(n, c) for n, c in lines if n > cut]
    return out


def expected_aggregates(records: Sequence[dict], charter: Charter) -> list[Expected]:
    """Every aggregate file a run with ledger ``records`` must hold: each statistics stage, each
    round's global model (``model_round_NNN.bin``, rounds with at least ``min-train-clients``
    accepted updates), the run's model (``model.bin``: the last ``average-last`` of those) and
    each evaluated round's metrics. Contributors are the ledger's accepted lines."""
    acc = _accepted(records)

    def part(kind: str, rnd: int, file_kind: str) -> tuple[Part, tuple[int, ...]]:
        lines = acc.get((kind, rnd), [])
        return (file_kind, rnd, tuple(c for _, c in lines)), tuple(n for n, _ in lines)

    out = []
    for kind, rnd in sorted(k for k in acc if k[0].startswith("stats")):
        p, lines = part(kind, rnd, kind)
        out.append(Expected(f"{kind}.bin", (p,), lines))
    model_rounds = sorted(r for kind, r in acc if kind == "train" and len(acc[(kind, r)]) >= charter.min_train_clients)
    for r in model_rounds:
        p, lines = part("train", r, "update")
        out.append(Expected(f"model_round_{r:03d}.bin", (p,), lines))
    tail = model_rounds[-int(charter.config.get("average-last", 1)):] if model_rounds else []
    if tail:
        parts = [part("train", r, "update") for r in tail]
        out.append(Expected("model.bin", tuple(p for p, _ in parts), tuple(n for _, ls in parts for n in ls)))
    for r in sorted(r for kind, r in acc if kind == "evaluate"):
        p, lines = part("evaluate", r, "metrics")
        out.append(Expected(f"metrics_round_{r:03d}.bin", (p,), lines))
    return out

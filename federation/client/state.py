"""A client's state between messages, and the replies it already gave.

A deployed client keeps nothing in memory between messages: the participant's state (accountant
history, calibrated σ, which statistics stages it released, the head of its signed chain) lives
in ``context.state`` and, with a ``state-dir``, in a file that survives restarts.

Guarantees
----------
* :class:`PersistentState` writes itself (atomically: temporary file, fsync, ``os.replace``) to
  ``state-dir/<country>-<config digest>.json`` every time a key is set (and :func:`save_state`
  before every reply), unless the file already holds those very bytes: the charge of a round is
  on disk before local training starts, and a reply is sent only once the state it leaves is.
* :func:`merge_states` keeps the state with the most accountant steps and, among those, the one
  further along its signed chain (a later snapshot of one client's timeline has at least as
  many of both); a statistics stage counts as released if any state says so. ε never goes
  backwards and a chain never forks by a restart.
* :func:`remember` / :func:`recall`: a request answered before (same kind, round and inputs) is
  answered with the very same bytes and the very same signed statement, so re-sending a release
  costs no budget and a verifier counts the replayed statement once.
* The replay cache is keyed by the key it was made under: a cached reply names the fingerprint
  of the client's HE key (:attr:`PersistentState.fingerprint`, its file name carries it too) and
  is replayed only to a client holding that very key. A state folder reused under another key
  (a second job with fresh keys) never replays the first key's ciphertexts: the request is
  answered afresh, or refused where answering again would spend budget twice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

from flwr.app import ConfigRecord, Context

from carbonfed.federation.config import RunConfig
from carbonfed.federation.durable import atomic_write

STATE_KEY = "carbonfed"


def accountant_steps(state: dict) -> int:
    return int(sum((state or {}).get("accountant", {}).get("steps", [])))


def chain_seq(state: dict) -> int:
    """How many statements the client signed in this state."""
    return int(((state or {}).get("chain") or {}).get("seq", 0))


def merge_states(*states: dict) -> dict:
    """The state with the most accountant steps, then the longest signed chain (on a tie, the
    later argument); the statistics count as released if any state says so."""
    best: dict = {}
    for st in states:
        if st and (not best or (accountant_steps(st), chain_seq(st)) >= (accountant_steps(best), chain_seq(best))):
            best = st
    out = json.loads(json.dumps(best))
    for release in {k for st in states if st for k in st if k.endswith("_released")}:
        if any(st.get(release) for st in states if st):
            out[release] = True
    return out


class PersistentState(dict):
    """A participant's state that writes itself to ``path`` whenever a key is set.

    :class:`~carbonfed.federation.client.participant.Participant` sets ``state["accountant"]`` when it charges a
    mechanism, before it trains: with this dict that charge is on disk at that moment.

    :meth:`flush` writes only what the file does not already hold (``written``: the bytes this
    object last wrote, or read from ``path``): a message that changed nothing writes nothing,
    and one that changed the state writes it once per change, never the same bytes twice."""

    def __init__(self, data: dict, path: Path | None, written: bytes | None = None, fingerprint: str = ""):
        super().__init__(data)
        self.path = path
        self.written = written
        self.fingerprint = fingerprint      # of the HE key the replies are made under ("": none)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.flush()

    def flush(self) -> None:
        if self.path is not None:
            data = _encode(self)
            if data != self.written:
                atomic_write(self.path, data)
                self.written = data


def _encode(state: dict) -> bytes:
    return json.dumps(dict(state), sort_keys=True).encode()


@functools.lru_cache(maxsize=16)
def config_digest(cfg: RunConfig) -> str:
    """``cfg.digest()``, memoised (a frozen config, asked for several times per message)."""
    return cfg.digest()


def state_file(state_dir: str | os.PathLike, country: str, cfg: RunConfig) -> Path:
    """``state-dir/<country>-<config digest>.json``: one accountant per country and job."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", country).strip("_") or "country"
    return Path(state_dir) / f"{slug}-{config_digest(cfg)[:16]}.json"


def load_state(context: Context, path: Path | None, fingerprint: str = "") -> PersistentState:
    """The state of ``context`` merged with ``path``'s; ``fingerprint``: of the HE key this client's
    replies are made under (the replay cache's key)."""
    records = context.state.config_records
    ctx_state = json.loads(records[STATE_KEY]["json"]) if STATE_KEY in records else {}
    disk = json.loads(path.read_text()) if path is not None and path.exists() else None
    return PersistentState(merge_states(ctx_state, disk or {}), path, _encode(disk) if disk is not None else None,
                           fingerprint)


def save_state(context: Context, state: dict) -> None:
    if isinstance(state, PersistentState):
        state.flush()
    context.state.config_records[STATE_KEY] = ConfigRecord({"json": json.dumps(dict(state))})


# -- replies already given are replayed, never recomputed ---------------------------------------

def request_key(kind: str, rnd: int, *parts) -> str:
    h = hashlib.sha256(f"{kind}:{rnd}".encode())
    for part in parts:
        h.update(b"\0" + (part if isinstance(part, bytes) else str(part).encode()))
    return h.hexdigest()


def _fingerprint(state: dict) -> str:
    return getattr(state, "fingerprint", "") or ""


def _replay_path(state: dict, kind: str) -> Path | None:
    """``<state file>.<key fingerprint[:16]>.<kind>.bin`` (without a key: ``<state file>.<kind>.bin``)."""
    path = getattr(state, "path", None)
    if path is None:
        return None
    fp = _fingerprint(state)
    return path.with_name(f"{path.stem}.{fp[:16]}.{kind}.bin" if fp else f"{path.stem}.{kind}.bin")


def remember(state: dict, kind: str, key: str, meta: dict, payload: bytes) -> None:
    """Cache this reply as the answer to request ``key`` (only with a state-dir); the state,
    with everything set in it since the last write (the chain head), is written with it."""
    path = _replay_path(state, kind)
    if path is None:
        return
    atomic_write(path, payload)
    replay = dict(state.get("replay", {}))
    replay[kind] = {"key": key, "meta": meta, "sha256": hashlib.sha256(payload).hexdigest(),
                    "fingerprint": _fingerprint(state)}
    state["replay"] = replay


def recall(state: dict, kind: str, key: str) -> tuple[dict, bytes] | None:
    entry = state.get("replay", {}).get(kind)
    path = _replay_path(state, kind)
    if not entry or entry.get("key") != key or path is None or not path.exists():
        return None
    if entry.get("fingerprint", "") != _fingerprint(state):
        return None                     # made under another key: never replayed to this one
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        return None
    return dict(entry["meta"]), data

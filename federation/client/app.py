"""The Flower ClientApp: turns messages into :class:`~carbonfed.federation.client.participant.Participant` calls.

Each message rebuilds the participant from the run config, the node config and the node's
``context.state`` (where the accountant history lives), and writes the state back before
replying: a deployed client keeps nothing in memory between messages.

Node config (``--node-config`` of a SuperNode) may set ``country``, ``data-dir``,
``secret-context`` (absolute path) and ``state-dir`` (absolute path); without the latter, run
config ``state-dir`` is used (``carbonfed run`` sets it so that an interrupted run can resume). In simulation the country
is the node's ``partition-id`` in the sorted country list and the secret context is
``keys-dir/secret.ctx`` from the run config.

Guarantees with ``state-dir`` (deployment)
------------------------------------------
* The participant's state (accountant history, calibrated σ, whether the statistics were
  released) is also kept in ``state-dir/<country>-<config digest>.json``, written atomically
  (temporary file, fsync, ``os.replace``) *every time it changes*: the charge of a round is on
  disk before local training starts, so killing the node mid-round cannot lose it.
* At each message the state is whichever of ``context.state`` and that file holds *more*
  accountant steps (the statistics count as released if either says so). A restarted SuperNode
  (whose ``context.state`` is empty) or a new Flower run of the same job (a restarted server)
  continues from the file: ε never goes backwards.
* A request answered before (same kind, round, global model and statistics: round k sent again
  by a server resumed from its checkpoint) is answered with the very same bytes, cached in
  ``state-dir``: re-sending a DP release already made costs no privacy budget, and the
  accountant is not charged twice for one release.
* With DP on, a training client whose state has no record of its statistics release (its state
  was lost: restarted without ``state-dir``) refuses to train instead of accounting from zero.
* ``query.refine`` (DP runs of 2 or 3 statistics stages) releases the next stage k once (the
  request carries the aggregates of stages 1..k-1, which fix its units); asked again with the
  same aggregates it replays the same bytes (with ``state-dir``), otherwise a second release of
  stage k is refused.
* ``query.role`` answers role, country and key fingerprint only (no data, no budget): a resumed
  server uses it to learn which node is which country.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from carbonfed.data import load_dataset, split_countries
from carbonfed.federation.config import RunConfig
from carbonfed.federation.durable import atomic_write
from carbonfed.federation.client.participant import BudgetExceeded, Participant, released_flag
from carbonfed.federation.wire import bytes_record, record_bytes, stage_key
from carbonfed.privacy.attest import attestation_key
from carbonfed.privacy.he import SECRET_CONTEXT_FILE, BFVCipher, key_fingerprint, load_secret_context
from carbonfed.privacy.secure_sum import PlainCipher

STATE_KEY = "carbonfed"

app = ClientApp()


# Memoised pure loads: a simulation worker serves many nodes, and re-reading a CSV or a key file
# per message is wasted work. The result depends only on the arguments.
@functools.lru_cache(maxsize=4)
def _dataset(name: str, data_dir: str):
    return load_dataset(name, data_dir or None)


@functools.lru_cache(maxsize=4)
def _secret_context(path: str):
    """The key holders' context, its public-key fingerprint (which costs a key serialisation) and
    the key of the client's ledger attestations."""
    ctx = load_secret_context(path)
    return ctx, key_fingerprint(ctx), attestation_key(path)


# -- state: context.state, and a file that survives restarts ------------------------------------

def _state_to_record(state: dict) -> ConfigRecord:
    return ConfigRecord({"json": json.dumps(state)})


def accountant_steps(state: dict) -> int:
    return int(sum((state or {}).get("accountant", {}).get("steps", [])))


def merge_states(*states: dict) -> dict:
    """The state with the most accountant steps (on a tie, the later argument); the statistics
    count as released if any state says so. Never less spent budget than any input."""
    best: dict = {}
    for st in states:
        if st and (not best or accountant_steps(st) >= accountant_steps(best)):
            best = st
    out = json.loads(json.dumps(best))
    for release in {k for st in states if st for k in st if k.endswith("_released")}:
        if any(st.get(release) for st in states if st):
            out[release] = True
    return out


class PersistentState(dict):
    """A participant's state that writes itself to ``path`` whenever a key is set.

    :class:`~carbonfed.federation.client.participant.Participant` sets ``state["accountant"]`` when it charges a
    mechanism, before it trains: with this dict that charge is on disk at that moment."""

    def __init__(self, data: dict, path: Path | None):
        super().__init__(data)
        self.path = path

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.flush()

    def flush(self) -> None:
        if self.path is not None:
            atomic_write(self.path, json.dumps(dict(self), sort_keys=True).encode())


def state_file(state_dir: str | os.PathLike, country: str, cfg: RunConfig) -> Path:
    """``state-dir/<country>-<config digest>.json``: one accountant per country and job."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", country).strip("_") or "country"
    return Path(state_dir) / f"{slug}-{cfg.digest()[:16]}.json"


def _load_state(context: Context, path: Path | None) -> PersistentState:
    records = context.state.config_records
    ctx_state = json.loads(records[STATE_KEY]["json"]) if STATE_KEY in records else {}
    disk = json.loads(path.read_text()) if path is not None and path.exists() else {}
    return PersistentState(merge_states(ctx_state, disk), path)


def _participant(context: Context) -> Participant:
    cfg = RunConfig.from_flower(dict(context.run_config))
    node = dict(context.node_config)
    data_dir = str(node.get("data-dir", cfg.data_dir))
    ds = _dataset(cfg.dataset, data_dir)
    part = split_countries(ds.countries(), cfg.holdout_offset)
    if "country" in node:
        country = str(node["country"])
    elif "partition-id" in node:
        pid = int(node["partition-id"])
        if pid >= len(ds.countries()):
            raise ValueError(f"partition-id {pid} but the {cfg.dataset} data set has only "
                             f"{len(ds.countries())} countries: run with that many SuperNodes")
        country = part.country_of(pid)
    else:
        raise ValueError("node config needs 'country' (deployment) or 'partition-id' (simulation)")
    ctx, fingerprint, attest_key = None, "", b""
    if cfg.he:
        secret = node.get("secret-context") or (str(Path(cfg.keys_dir) / SECRET_CONTEXT_FILE) if cfg.keys_dir else "")
        if not secret:
            raise ValueError("HE is on but neither node config 'secret-context' nor run config 'keys-dir' is set")
        ctx, fingerprint, attest_key = _secret_context(str(secret))
    path = None
    state_dir = node.get("state-dir") or cfg.state_dir
    if state_dir:
        path = state_file(str(state_dir), country, cfg)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Participant(cfg, ds, part, country, ctx, _load_state(context, path), fingerprint, attest_key)


def _save_state(context: Context, p: Participant) -> None:
    if isinstance(p.state, PersistentState):
        p.state.flush()
    context.state.config_records[STATE_KEY] = _state_to_record(dict(p.state))


# -- replies already given are replayed, never recomputed ---------------------------------------

def _request_key(kind: str, rnd: int, *parts) -> str:
    h = hashlib.sha256(f"{kind}:{rnd}".encode())
    for part in parts:
        h.update(b"\0" + (part if isinstance(part, bytes) else str(part).encode()))
    return h.hexdigest()


def _replay_path(p: Participant, kind: str) -> Path | None:
    path = getattr(p.state, "path", None)
    return path.with_name(f"{path.stem}.{kind}.bin") if path is not None else None


def _remember(p: Participant, kind: str, key: str, meta: dict, payload: bytes) -> None:
    """Cache this reply as the answer to request ``key`` (only with a state-dir)."""
    path = _replay_path(p, kind)
    if path is None:
        return
    atomic_write(path, payload)
    replay = dict(p.state.get("replay", {}))
    replay[kind] = {"key": key, "meta": meta, "sha256": hashlib.sha256(payload).hexdigest()}
    p.state["replay"] = replay


def _recall(p: Participant, kind: str, key: str) -> tuple[dict, bytes] | None:
    entry = p.state.get("replay", {}).get(kind)
    path = _replay_path(p, kind)
    if not entry or entry.get("key") != key or path is None or not path.exists():
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        return None
    return dict(entry["meta"]), data


# -- messages -----------------------------------------------------------------------------------

def _reply(msg: Message, context: Context, p: Participant, meta: dict, arrays: dict) -> Message:
    _save_state(context, p)
    content = RecordDict({"meta": ConfigRecord(meta), **arrays})
    return Message(content, reply_to=msg)


def _stats(msg: Message, p: Participant) -> list[tuple[bytes, int]]:
    """The statistics aggregates of a request: stage 1, then stages 2, 3 as far as the server sent them."""
    c, arrays = msg.content.config_records["config"], msg.content.array_records
    stats = []
    while stage_key(len(stats) + 1) in arrays:
        name = stage_key(len(stats) + 1)
        stats.append((record_bytes(arrays[name], _stype(p)), int(c[f"{name}-terms"])))
    if not stats:
        raise ValueError("the request carries no statistics aggregate ('stats')")
    return stats


def _inputs(msg: Message, p: Participant):
    c = msg.content.config_records["config"]
    model = msg.content.array_records.get("model")
    model_bytes = record_bytes(model, _stype(p)) if model is not None else None
    return int(c["server-round"]), model_bytes, int(c["model-terms"]), _stats(msg, p)


def _stype(p: Participant) -> str:
    """The record type of this run's vectors: the cipher's own (BFV or its plaintext twin)."""
    return BFVCipher.stype if p.cfg.he else PlainCipher.stype


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    p = _participant(context)
    key = _request_key("setup", 0, p.cfg.digest())
    cached = _recall(p, "setup", key)
    if cached is not None:              # the release made before, sent again: no new spend
        meta, stats = cached
        return _reply(msg, context, p, meta, {"stats": bytes_record(stats, _stype(p))})
    out = p.setup()
    meta = {"role": out["role"], "country": out["country"], "fingerprint": out["fingerprint"],
            **p.attested("stats", 1, 0, _release_facts(p, out))}
    arrays = {}
    if out["stats"] is not None:
        _remember(p, "setup", key, meta, out["stats"])
        arrays["stats"] = bytes_record(out["stats"], _stype(p))
    return _reply(msg, context, p, meta, arrays)


def _release_facts(p: Participant, out: dict) -> dict:
    """Ledger facts of a statistics release: σ, the accountant history and ε after it."""
    dp = p.cfg.dp and out.get("noise_multiplier") is not None
    return {"noise_multiplier": out.get("noise_multiplier"),
            "history": p.accountant.history if dp else [],
            "epsilon": p.accountant.epsilon(p.cfg.delta) if dp else None}


@app.query("refine")
def refine(msg: Message, context: Context) -> Message:
    """Statistics stage k = 2 or 3 (DP runs of more stages), measured with the scaler of the
    aggregates of stages 1..k-1 that the request carries."""
    p = _participant(context)
    stats = _stats(msg, p)
    name = stage_key(len(stats) + 1)
    kind = "refine" if name == "stats2" else f"refine-{name}"
    key = _request_key(kind, 0, *[x for pair in stats for x in pair], p.cfg.digest())
    cached = _recall(p, kind, key)
    if cached is not None:              # the release made before, sent again: no new spend
        meta, data = cached
        return _reply(msg, context, p, meta, {name: bytes_record(data, _stype(p))})
    out = p.refine(stats)
    meta = {"role": p.role, "country": p.country, "fingerprint": p.fingerprint,
            **p.attested("stats", len(stats) + 1, 0, _release_facts(p, out))}
    _remember(p, kind, key, meta, out[name])
    return _reply(msg, context, p, meta, {name: bytes_record(out[name], _stype(p))})


@app.query("role")
def role(msg: Message, context: Context) -> Message:
    """Who this node is, for a resumed server: no data touched, no budget spent."""
    p = _participant(context)
    meta = {"role": p.role, "country": p.country, "fingerprint": p.fingerprint, "facts": "{}"}
    return _reply(msg, context, p, meta, {})


@app.train()
def train(msg: Message, context: Context) -> Message:
    p = _participant(context)
    rnd, model, model_terms, stats = _inputs(msg, p)
    key = _request_key("train", rnd, model or b"", model_terms, *[x for pair in stats for x in pair], p.cfg.digest())
    cached = _recall(p, "train", key)
    if cached is not None:              # this very request was answered before: same bytes
        meta, update = cached
        return _reply(msg, context, p, meta, {"update": bytes_record(update, _stype(p))})
    if p.cfg.dp and not p.state.get(released_flag(1)):
        # Every training client released its statistics at the setup; a state without that
        # release is a lost state (a restart without state-dir): training on it would account
        # from zero and under-state ε.
        return _reply(msg, context, p, {"status": "refused", "fingerprint": p.fingerprint, "facts": "{}",
                                        "reason": f"{p.country}: no record of this client's statistics release: "
                                                  "its accountant state was lost (restart without node config "
                                                  "state-dir?); refusing to train rather than under-state ε"}, {})
    try:
        out = p.train(rnd, model, model_terms, stats)
    except BudgetExceeded as exc:
        _save_state(context, p)
        facts = {"epsilon": p.accountant.epsilon(p.cfg.delta), "history": p.accountant.history}
        return _reply(msg, context, p, {"status": "refused", "reason": str(exc), "fingerprint": p.fingerprint,
                                        **p.attested("train", None, rnd, facts)}, {})
    finally:
        _save_state(context, p)   # a spend charged before a failure is kept (the error reply follows)
    facts = {**out["facts"], "history": p.accountant.history if p.cfg.dp else []}
    meta = {"status": "ok", "fingerprint": p.fingerprint, **p.attested("train", None, rnd, facts)}
    _remember(p, "train", key, meta, out["update"])
    return _reply(msg, context, p, meta, {"update": bytes_record(out["update"], _stype(p))})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    p = _participant(context)
    _, model, model_terms, stats = _inputs(msg, p)
    metrics = p.evaluate(model, model_terms, stats)
    meta = {"status": "ok", "fingerprint": p.fingerprint, "facts": "{}"}
    return _reply(msg, context, p, meta, {"metrics": bytes_record(metrics, _stype(p))})

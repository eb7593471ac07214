"""The Flower ClientApp: turns messages into :class:`~federation.participant.Participant` calls.

Each message rebuilds the participant from the run config, the node config and the node's
``context.state`` (where the accountant history lives), and writes the state back before
replying: a deployed client keeps nothing in memory between messages.

Node config (``--node-config`` of a SuperNode) may set ``country``, ``data-dir`` and
``secret-context`` (absolute path). In simulation the country is the node's ``partition-id``
in the sorted country list and the secret context is ``keys-dir/secret.ctx`` from the run config.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from data import load_dataset, split_countries
from federation.config import RunConfig
from federation.participant import BudgetExceeded, Participant
from federation.strategy import bytes_record, record_bytes
from privacy.he import SECRET_CONTEXT_FILE, load_secret_context

STATE_KEY = "carbonfed"

app = ClientApp()


# Memoised pure loads: a simulation worker serves many nodes, and re-reading a CSV or a key file
# per message is wasted work. The result depends only on the arguments.
@functools.lru_cache(maxsize=4)
def _dataset(name: str, data_dir: str):
    return load_dataset(name, data_dir or None)


@functools.lru_cache(maxsize=4)
def _secret_context(path: str):
    return load_secret_context(path)


def _state_to_record(state: dict) -> ConfigRecord:
    return ConfigRecord({"json": json.dumps(state)})


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
    ctx = None
    if cfg.he:
        secret = node.get("secret-context") or (str(Path(cfg.keys_dir) / SECRET_CONTEXT_FILE) if cfg.keys_dir else "")
        if not secret:
            raise ValueError("HE is on but neither node config 'secret-context' nor run config 'keys-dir' is set")
        ctx = _secret_context(str(secret))
    state = json.loads(context.state.config_records[STATE_KEY]["json"]) if STATE_KEY in context.state.config_records else {}
    return Participant(cfg, ds, part, country, ctx, state)


def _save_state(context: Context, p: Participant) -> None:
    context.state.config_records[STATE_KEY] = _state_to_record(p.state)


def _reply(msg: Message, context: Context, p: Participant, meta: dict, arrays: dict) -> Message:
    _save_state(context, p)
    content = RecordDict({"meta": ConfigRecord(meta), **arrays})
    return Message(content, reply_to=msg)


def _inputs(msg: Message, p: Participant):
    c = msg.content.config_records["config"]
    model = msg.content.array_records.get("model")
    model_bytes = record_bytes(model, _stype(p)) if model is not None else None
    stats_bytes = record_bytes(msg.content.array_records["stats"], _stype(p))
    return int(c["server-round"]), model_bytes, int(c["model-terms"]), stats_bytes, int(c["stats-terms"])


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    p = _participant(context)
    out = p.setup()
    meta = {"role": out["role"], "country": out["country"], "fingerprint": out["fingerprint"],
            "facts": json.dumps({"noise_multiplier": out.get("noise_multiplier"),
                                 "history": out.get("stats_mechanism", []),
                                 "epsilon": p.accountant.epsilon(p.cfg.delta) if p.cfg.dp else None})}
    arrays = {"stats": bytes_record(out["stats"], _stype(p))} if out["stats"] is not None else {}
    return _reply(msg, context, p, meta, arrays)


def _stype(p: Participant) -> str:
    return "tenseal.bfv_vector" if p.cfg.he else "numpy.int64"


@app.train()
def train(msg: Message, context: Context) -> Message:
    p = _participant(context)
    rnd, model, model_terms, stats, stats_terms = _inputs(msg, p)
    try:
        out = p.train(rnd, model, model_terms, stats, stats_terms)
    except BudgetExceeded as exc:
        _save_state(context, p)
        facts = {"epsilon": p.accountant.epsilon(p.cfg.delta), "history": p.accountant.history}
        return _reply(msg, context, p, {"status": "refused", "reason": str(exc), "fingerprint": p.fingerprint,
                                        "facts": json.dumps(facts)}, {})
    finally:
        _save_state(context, p)   # a spend charged before a failure is kept (the error reply follows)
    facts = {**out["facts"], "history": p.accountant.history if p.cfg.dp else []}
    meta = {"status": "ok", "fingerprint": p.fingerprint, "facts": json.dumps(facts)}
    return _reply(msg, context, p, meta, {"update": bytes_record(out["update"], _stype(p))})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    p = _participant(context)
    _, model, model_terms, stats, stats_terms = _inputs(msg, p)
    metrics = p.evaluate(model, model_terms, stats, stats_terms)
    meta = {"status": "ok", "fingerprint": p.fingerprint, "facts": "{}"}
    return _reply(msg, context, p, meta, {"metrics": bytes_record(metrics, _stype(p))})

"""The Flower ClientApp: turns messages into :class:`~carbonfed.federation.client.participant.Participant` calls.

Each message rebuilds the participant from the run config, the node config and the node's ``context.state``
(the accountant history), and writes the state back before replying: nothing is kept in memory between messages.

Node config (``--node-config`` of a SuperNode) may set ``country``, ``data-dir``,
``secret-context``, ``signing-key``, ``charter`` and ``state-dir`` (absolute paths); without the
latter, run config ``state-dir`` is used (``carbonfed run`` sets it so that an interrupted run can
resume). In simulation the country is the node's ``partition-id`` in the sorted country list, the
secret context is ``keys-dir/secret.ctx``, the signing key is the country's file under
``keys-dir/signing/`` (else ``state-dir/signing/``: :func:`carbonfed.federation.enrolment.signing_dir`)
and the charter is run config ``charter``.

Guarantees: signatures and the charter
--------------------------------------
* Without a charter the client answers nothing (an error: a run of this package is always
  signed). Every request is first checked against the charter the client endorsed
  (:meth:`~carbonfed.federation.client.signer.Signer.refusal`): a run config that differs from it
  (a lowered ``min-train-clients``), a round outside its plan, or an aggregate that does not carry
  the tags of the training clients the server names is refused, with a signed statement.
* Every fact the client reports is in a statement it signs (reply metadata ``signed``): its
  statistics releases, training rounds, refusals, an error after a charge (status ``error``, with
  its history), its evaluations, and ``query.close``, its final history, after which it signs
  nothing more. A cached reply replays the very statement it carried.

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
  server uses it to learn which node is which country. ``query.masks``: :mod:`.masking` (issue 22).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from carbonfed.data import split_countries
from carbonfed.federation.client import masking
from carbonfed.federation.client.participant import BudgetExceeded, Participant, released_flag
from carbonfed.federation.client.signer import RequestRefused, Signer, parse_parts
from carbonfed.federation.client.state import (accountant_steps, config_digest, load_state, recall, remember,
                                               request_key, save_state, state_file)
from carbonfed.federation.config import RunConfig
from carbonfed.federation.enrolment import load_charter, signing_dir
from carbonfed.federation.run_data import load_run_data
from carbonfed.federation.wire import bytes_record, record_bytes, stage_key
from carbonfed.privacy.binding import secret_key_bytes, tag_key
from carbonfed.privacy.he import SECRET_CONTEXT_FILE, BFVCipher, HEParams, key_fingerprint, load_secret_context
from carbonfed.privacy.secure_sum import PlainCipher
from carbonfed.privacy.signing import key_file, load_signing_key
from carbonfed.privacy.statements import received

app = ClientApp()


# Memoised pure loads: a simulation worker serves many nodes, and re-reading a CSV or a key file
# per message is wasted work. The result depends only on the arguments.
@functools.lru_cache(maxsize=4)
def _dataset(cfg: RunConfig, data_dir: str):
    return load_run_data(cfg, data_dir or None)


@functools.lru_cache(maxsize=8)
def _run_config(items: tuple) -> RunConfig:
    """The RunConfig of a run config's (sorted) items: one frozen object per run config."""
    return RunConfig.from_flower(dict(items))


def _config_of(context: Context) -> RunConfig:
    items = tuple(sorted(dict(context.run_config).items()))
    try:
        return _run_config(items)
    except TypeError:                   # an unhashable value: parsed (and refused) as it is
        return RunConfig.from_flower(dict(items))


@functools.lru_cache(maxsize=4)
def _secret_context(path: str):
    """The key holders' context, its public-key fingerprint (which costs a key serialisation) and
    its secret key's bytes (the check-slot tag key is derived from them)."""
    ctx = load_secret_context(path)
    return ctx, key_fingerprint(ctx), secret_key_bytes(ctx)


@functools.lru_cache(maxsize=8)
def _charter(path: str):
    return load_charter(path)


@functools.lru_cache(maxsize=256)
def _signing_key(path: str):
    return load_signing_key(path)


def _signer(cfg: RunConfig, node: dict, country: str, secret: bytes | None) -> Signer:
    """This client's charter (node config ``charter``, else run config ``charter``), signing key
    (node config ``signing-key``, else its file under the simulation's signing folder) and tags."""
    path = node.get("charter") or cfg.charter
    if not path:
        raise ValueError("no charter: this run's clients endorsed none (carbonfed run and deploy seal one; for "
                         "`flwr run`, seal one with `carbonfed keygen --out KEYS [job options]` and pass run config "
                         "keys-dir and charter='KEYS/charter.json')")
    folder = signing_dir(cfg)
    key = node.get("signing-key") or (str(key_file(folder, country)) if folder else "")
    if not key:
        raise ValueError("no signing key: set node config 'signing-key' (or run config keys-dir in a simulation)")
    charter = _charter(str(path))
    return Signer(charter, country, _signing_key(str(key)), tag_key(charter.sha256, secret), HEParams().plain_modulus)


def _participant(context: Context) -> Participant:
    cfg = _config_of(context)
    node = dict(context.node_config)
    data_dir = str(node.get("data-dir", cfg.data_dir))
    ds = _dataset(cfg, data_dir)
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
    ctx, fingerprint, secret = None, "", None
    if cfg.he:
        path = node.get("secret-context") or (str(Path(cfg.keys_dir) / SECRET_CONTEXT_FILE) if cfg.keys_dir else "")
        if not path:
            raise ValueError("HE is on but neither node config 'secret-context' nor run config 'keys-dir' is set")
        ctx, fingerprint, secret = _secret_context(str(path))
    signer = _signer(cfg, node, country, secret)
    path = None
    state_dir = node.get("state-dir") or cfg.state_dir
    if state_dir:
        path = state_file(str(state_dir), country, cfg)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Participant(cfg, ds, part, country, ctx, load_state(context, path, fingerprint), fingerprint, signer=signer)


# -- messages -----------------------------------------------------------------------------------

def _reply(msg: Message, context: Context, p: Participant, meta: dict, arrays: dict) -> Message:
    save_state(context, p.state)
    content = RecordDict({"meta": ConfigRecord(meta), **arrays})
    return Message(content, reply_to=msg)


def _signed(p: Participant, kind: str, rnd: int, facts: dict, **kw) -> dict:
    """Reply metadata carrying this client's signed statement of ``facts``."""
    return {"signed": json.dumps(p.sign(kind, rnd, facts, **kw))}


def _dp_facts(p: Participant) -> dict:
    """The client's accountant history and ε at the charter's δ (DP runs with a history)."""
    acc, delta = p.accountant, p.signer.charter.delta
    if not (p.cfg.dp and acc.history):
        return {}
    return {"history": acc.history, "epsilon": p.epsilon() if p.cfg.delta == delta else acc.epsilon(delta),
            "delta": delta}


def _refused(msg: Message, context: Context, p: Participant, why: str, kind: str | None, rnd: int,
             stage: int | None = None) -> Message:
    """A refusal: a signed statement of it (``kind`` None: nothing to state, a held-out client at
    the setup), with the client's history so far."""
    meta = {"status": "refused", "reason": why, "role": p.role, "country": p.country, "fingerprint": p.fingerprint}
    if kind is not None:
        meta.update(_signed(p, kind, rnd, {"reason": why, **_dp_facts(p)}, status="refused", stage=stage))
    return _reply(msg, context, p, meta, {})


def _refusal(p: Participant, rnd: int, model_terms: int | None = None, stats=()) -> str | None:
    """Why the charter forbids this request (None: it allows it). A client that closed its
    history acts on nothing more: it could sign nothing (an error, before any work)."""
    if (p.state.get("chain") or {}).get("closed"):
        raise RuntimeError(f"{p.country} closed its signed history (query.close): it answers no more requests")
    return p.signer.refusal(p.cfg.to_flower(), rnd, model_terms, [t for _, t in stats])


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


def _parts(msg: Message, with_model: bool, stages: int) -> dict:
    """The contributions the request says each aggregate sums: ``{"model": [...], "stats": [...]}``."""
    c = msg.content.config_records["config"]
    stats = parse_parts(c.get("stats-parts"), "the statistics")
    if len(stats) < stages:
        raise RequestRefused(f"the request names the contributions of {len(stats)} statistics stage(s), not {stages}")
    return {"model": parse_parts(c.get("model-parts"), "the model") if with_model else None, "stats": stats[:stages]}


def _inputs(msg: Message, p: Participant):
    c = msg.content.config_records["config"]
    model = msg.content.array_records.get("model")
    model_bytes = record_bytes(model, _stype(p)) if model is not None else None
    return int(c["server-round"]), model_bytes, int(c["model-terms"]), _stats(msg, p)


def _stype(p: Participant) -> str:
    """The record type of this run's vectors: the cipher's own (BFV or its plaintext twin)."""
    return BFVCipher.stype if p.cfg.he else PlainCipher.stype


def _release_facts(p: Participant, out: dict) -> dict:
    """The facts of a statistics release: σ, the accountant history and ε after it."""
    return {"noise_multiplier": out.get("noise_multiplier"), **_dp_facts(p)} if p.cfg.dp else {}


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    p = _participant(context)
    key = request_key("setup", 0, config_digest(p.cfg), *masking.arm_upload(p, msg, "stats", 1))   # masks first
    cached = recall(p.state, "setup", key)
    if cached is not None:              # the release made before, sent again: no new spend
        meta, stats = cached
        return _reply(msg, context, p, meta, {"stats": bytes_record(stats, _stype(p))})
    why = _refusal(p, 0)
    if why:
        return _refused(msg, context, p, why, "stats" if p.role == "train" else None, 0, stage=1)
    out = p.setup()
    meta = {"role": out["role"], "country": out["country"], "fingerprint": out["fingerprint"]}
    arrays = {}
    if out["stats"] is not None:
        meta.update(_signed(p, "stats", 0, _release_facts(p, out), stage=1, inputs=received(None, None),
                            output=out["stats"]))
        remember(p.state, "setup", key, meta, out["stats"])
        arrays["stats"] = bytes_record(out["stats"], _stype(p))
    return _reply(msg, context, p, meta, arrays)


@app.query("refine")
def refine(msg: Message, context: Context) -> Message:
    """Statistics stage k = 2 or 3 (DP runs of more stages), measured with the scaler of the
    aggregates of stages 1..k-1 that the request carries."""
    p = _participant(context)
    stats = _stats(msg, p)
    name = stage_key(len(stats) + 1)
    kind = "refine" if name == "stats2" else f"refine-{name}"
    key = request_key(kind, 0, *[x for pair in stats for x in pair], config_digest(p.cfg),
                      *masking.arm_upload(p, msg, name, len(stats) + 1))
    cached = recall(p.state, kind, key)
    if cached is not None:              # the release made before, sent again: no new spend
        meta, data = cached
        return _reply(msg, context, p, meta, {name: bytes_record(data, _stype(p))})
    try:
        why = _refusal(p, 0, stats=stats)
        if why:
            raise RequestRefused(why)
        out = p.refine(stats, _parts(msg, False, len(stats)))
    except RequestRefused as exc:
        return _refused(msg, context, p, str(exc), "stats", 0, stage=len(stats) + 1)
    meta = {"role": p.role, "country": p.country, "fingerprint": p.fingerprint,
            **_signed(p, "stats", 0, _release_facts(p, out), stage=len(stats) + 1,
                      inputs=received(None, None, stats), output=out[name])}
    remember(p.state, kind, key, meta, out[name])
    return _reply(msg, context, p, meta, {name: bytes_record(out[name], _stype(p))})


@app.query("role")
def role(msg: Message, context: Context) -> Message:
    """Who this node is, for a resumed server: no data touched, no budget spent."""
    p = _participant(context)
    meta = {"role": p.role, "country": p.country, "fingerprint": p.fingerprint}
    return _reply(msg, context, p, meta, {})


def _train(msg: Message, context: Context, p: Participant, rnd: int, model, model_terms: int, stats,
           shared: str = "", ahead: dict | None = None) -> Message:
    """Train round ``rnd``: refused (signed) under the charter or the budget; an error after the
    round was charged is signed with the history it leaves (status ``error``). ``ahead``: sent, never cached."""
    before = accountant_steps(p.state)
    try:
        why = _refusal(p, rnd, model_terms if model is not None else None, stats)
        if why:
            raise RequestRefused(why)
        out = p.train(rnd, model, model_terms, stats, _parts(msg, model is not None, len(stats)))
    except (BudgetExceeded, RequestRefused) as exc:
        return _refused(msg, context, p, str(exc), "train", rnd)
    except Exception as exc:
        if accountant_steps(p.state) == before:
            raise                     # nothing spent: Flower's error reply says what failed
        why = f"{type(exc).__name__}: {exc}"
        meta = {"status": "error", "reason": why, "fingerprint": p.fingerprint,
                **_signed(p, "train", rnd, {"reason": why, **_dp_facts(p)}, status="error")}
        return _reply(msg, context, p, meta, {})
    finally:
        save_state(context, p.state)   # a spend charged before a failure is kept
    facts = {**out["facts"], **({"history": p.accountant.history, "delta": p.signer.charter.delta} if p.cfg.dp else {})}
    meta = {"status": "ok", "fingerprint": p.fingerprint,
            **_signed(p, "train", rnd, facts, inputs=received(model, model_terms, stats), output=out["update"])}
    remember(p.state, "train", _train_key(p, rnd, model, model_terms, stats, shared), meta, out["update"])
    return _reply(msg, context, p, {**meta, **(ahead or {})}, {"update": bytes_record(out["update"], _stype(p))})


def _train_key(p: Participant, rnd: int, model, model_terms: int, stats, shared: str = "") -> str:
    return request_key("train", rnd, model or b"", model_terms, *[x for pair in stats for x in pair],
                       config_digest(p.cfg), *([shared] if shared else []))


@app.train()
def train(msg: Message, context: Context) -> Message:
    p = _participant(context)
    (rnd, model, model_terms, stats), config = _inputs(msg, p), dict(msg.content.config_records["config"])
    try:                                # masks (issue 22): refused before anything is charged
        shared = masking.arm(p, config, rnd)
    except masking.MaskRefusal as exc:
        return _refused(msg, context, p, str(exc), "train", rnd)
    ahead = masking.ahead(p, config, "update")
    cached = recall(p.state, "train", _train_key(p, rnd, model, model_terms, stats, shared))
    if cached is not None:              # this very request was answered before: same bytes
        meta, update = cached
        return _reply(msg, context, p, {**meta, **ahead}, {"update": bytes_record(update, _stype(p))})
    if p.cfg.dp and not p.state.get(released_flag(1)):
        # Every training client released its statistics at the setup; a state without that
        # release is a lost state (a restart without state-dir): training on it would account
        # from zero and under-state ε.
        return _refused(msg, context, p, f"{p.country}: no record of this client's statistics release: its "
                                         "accountant state was lost (restart without node config state-dir?); "
                                         "refusing to train rather than under-state ε", "train", rnd)
    return _train(msg, context, p, rnd, model, model_terms, stats, shared, ahead)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    p = _participant(context)
    rnd, model, model_terms, stats = _inputs(msg, p)
    try:
        why = _refusal(p, rnd, model_terms if model is not None else None, stats)
        if why:
            raise RequestRefused(why)
        masking.arm_upload(p, msg, "metrics", rnd)        # masks (issue 22): before the model is opened
        metrics = p.evaluate(model, model_terms, stats, rnd, _parts(msg, model is not None, len(stats)))
    except (RequestRefused, masking.MaskRefusal) as exc:
        return _refused(msg, context, p, str(exc), "evaluate", rnd)
    ahead = masking.ahead(p, dict(msg.content.config_records["config"]), "metrics")   # next round's bundle
    meta = {"status": "ok", "fingerprint": p.fingerprint, **ahead,
            **_signed(p, "evaluate", rnd, {}, inputs=received(model, model_terms, stats), output=metrics)}
    return _reply(msg, context, p, meta, {"metrics": bytes_record(metrics, _stype(p))})


@app.query("masks")
def masks(msg: Message, context: Context) -> Message:
    """A step of the mask protocol (:mod:`.masking`): no data touched, no budget spent."""
    p = _participant(context)
    config = dict(msg.content.config_records["config"])
    why = _refusal(p, int(config["server-round"]))
    if why:
        raise RuntimeError(f"{p.country} takes no part in the masks: {why}")
    return _reply(msg, context, p, masking.answer(p, config), {})


@app.query("close")
def close(msg: Message, context: Context) -> Message:
    """The end of the run: this client's final history, signed as its closing statement (after
    which it signs nothing); asked again, the same statement."""
    p = _participant(context)
    rnd = int(msg.content.config_records["config"]["server-round"])
    key = request_key("close", rnd, config_digest(p.cfg))
    cached = recall(p.state, "close", key)
    if cached is not None:
        return _reply(msg, context, p, cached[0], {})
    why = _refusal(p, rnd)
    if why:
        raise RuntimeError(f"{p.country} does not close: {why}")
    meta = {"status": "ok", "country": p.country, **_signed(p, "close", rnd, _dp_facts(p))}
    remember(p.state, "close", key, meta, b"")
    return _reply(msg, context, p, meta, {})

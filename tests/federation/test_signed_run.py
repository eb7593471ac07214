"""The ClientApp as a signing client, in process (real data, real Ed25519 keys, a real charter):
it refuses what its charter forbids, refuses aggregates whose check slots do not carry the tags
of the contributors the server names, and signs one unbroken chain of statements ending with its
closing statement. The whole-run checks (a real run folder verified without keys, a rewritten ε,
a swapped metrics file) are in tests/federation/test_pipeline.py."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from carbonfed.data import resolve_data_dir
from carbonfed.federation.client import app as ca
from carbonfed.federation.client.participant import Layouts, make_cipher
from carbonfed.federation.client.state import STATE_KEY
from carbonfed.federation.config import RunConfig
from carbonfed.federation.enrolment import load_charter, seal_run
from carbonfed.federation.flower_compat import act_as_server_app
from carbonfed.federation.run_data import schema
from carbonfed.federation.wire import bytes_record, record_bytes
from carbonfed.privacy.audit.signed import check_chain
from carbonfed.privacy.secure_sum import PlainCipher, SecureSum
from carbonfed.privacy.statements import statement_problem

pytestmark = pytest.mark.slow   # each client calibrates its noise for the run (tens of seconds in all)

TRAIN = ("Albania", "Algeria")
CFG = RunConfig(privacy="dp", rounds=2, local_epochs=1, batches_per_epoch=2, stats_stages=1, min_train_clients=2)


@pytest.fixture
def run(tmp_path):
    """A sealed charter for CFG (every country's key in tmp/keys, charter.json in tmp/run)."""
    cfg = seal_run(replace(CFG, data_dir=str(resolve_data_dir(None)), keys_dir=str(tmp_path / "keys"),
                           out_dir=str(tmp_path / "run")))
    act_as_server_app(run_id=1)          # Messages are built as the ServerApp's
    return cfg, load_charter(cfg.charter)


def _ask(handler, country, content, mtype, run_config, state=None):
    ctx = Context(run_id=1, node_id=7, node_config={"country": country}, state=state or RecordDict(),
                  run_config=run_config)
    reply = handler(Message(content=RecordDict(content), dst_node_id=7, message_type=mtype), ctx)
    return reply, ctx.state


def _meta(reply) -> dict:
    return dict(reply.content.config_records["meta"])


def _statement(reply) -> dict:
    return json.loads(_meta(reply)["signed"])


def _setup(cfg, country, state=None):
    return _ask(ca.setup, country, {"config": ConfigRecord({"server-round": 0})}, "query.setup", cfg.to_flower(), state)


def test_a_client_refuses_a_lowered_min_train_clients(run):
    """The operator's run config lowers min-train-clients below the charter's 2 that every client
    endorsed: to 1, the client refuses, signs its refusal, releases nothing and spends nothing;
    to 0, it does not even read the config (nor can a charter state 0:
    tests/privacy/test_charter.py::test_impossible_settings_are_refused)."""
    cfg, charter = run
    lowered = replace(cfg, min_train_clients=1)
    reply, state = _setup(lowered, "Albania")
    meta, st = _meta(reply), _statement(reply)
    assert meta["status"] == "refused" and "min-train-clients=1" in meta["reason"] and "min-train-clients=2" in meta["reason"]
    assert not reply.content.array_records                                  # no statistics released
    assert statement_problem(st, charter.keys, charter.sha256) is None      # its own signature, this charter
    assert (st["kind"], st["status"], st["facts"]["reason"]) == ("stats", "refused", meta["reason"])
    assert "accountant" not in json.loads(state.config_records[STATE_KEY]["json"])   # nothing charged
    held_out = next(c for c, r in charter.roles.items() if r == "test")
    assert _meta(_setup(lowered, held_out)[0])["status"] == "refused"
    zero = {**cfg.to_flower(), "min-train-clients": 0}
    with pytest.raises(ValueError, match="min-train-clients"):
        _ask(ca.setup, "Albania", {"config": ConfigRecord({"server-round": 0})}, "query.setup", zero)
    honest, _ = _setup(cfg, "Albania")                                      # the charter's own config: served
    assert "stats" in honest.content.array_records and _statement(honest)["status"] == "ok"


def _round_one(cfg, stats: bytes, parts: list, terms: int = 2) -> dict:
    return {"config": ConfigRecord({"server-round": 1, "model-terms": 0, "stats-terms": terms,
                                    "stats-parts": json.dumps(parts)}),
            "stats": bytes_record(stats, PlainCipher.stype)}


def test_a_client_refuses_aggregates_that_do_not_carry_the_named_tags(run):
    """Two clients release their statistics (tagged in their check slots); the sum named with its
    real contributors is accepted, and the client trains; named with another contributor, or
    with a third that is not in it, or with a term count that does not match, it is refused
    before anything is charged."""
    cfg, _ = run
    layouts = Layouts.for_run(cfg, *schema(cfg.dataset))
    total, states = SecureSum(make_cipher(cfg, None, layouts.stats.length)), {}
    for c in TRAIN:
        reply, states[c] = _setup(cfg, c)
        total.add(record_bytes(reply.content.array_records["stats"], PlainCipher.stype))
    stats, spent = total.serialize(), json.loads(states["Albania"].config_records[STATE_KEY]["json"])["accountant"]
    bad = {"another contributor": [["stats", 0, ["Albania", "Angola"]]],
           "a missing contributor": [["stats", 0, ["Albania", "Algeria", "Angola"]]],
           "another kind": [["stats2", 0, list(TRAIN)]]}
    for what, parts in bad.items():
        reply, state = _ask(ca.train, "Albania", _round_one(cfg, stats, parts, sum(len(p[2]) for p in parts)),
                            MessageType.TRAIN, cfg.to_flower(), states["Albania"])
        meta = _meta(reply)
        assert meta["status"] == "refused" and "refuses the stage-1 statistics" in meta["reason"], what
        assert json.loads(state.config_records[STATE_KEY]["json"])["accountant"] == spent, what   # nothing charged
    reply, _ = _ask(ca.train, "Albania", _round_one(cfg, stats, [["stats", 0, list(TRAIN)]], terms=3),
                    MessageType.TRAIN, cfg.to_flower(), states["Albania"])
    assert _meta(reply)["status"] == "refused" and "3 terms" in _meta(reply)["reason"]
    reply, _ = _ask(ca.train, "Albania", _round_one(cfg, stats, [["stats", 0, list(TRAIN)]]), MessageType.TRAIN,
                    cfg.to_flower(), states["Albania"])
    assert _meta(reply)["status"] == "ok" and "update" in reply.content.array_records


def test_statements_form_one_chain_that_the_closing_statement_ends(run):
    """Setup, a refused round, a trained round, the closing statement: one chain (seq 0..3, each
    naming the one before), the last one final: asked to train after it, the client refuses to
    act at all (it could sign nothing)."""
    cfg, charter = run
    states, stats = {}, SecureSum(make_cipher(cfg, None, Layouts.for_run(cfg, *schema(cfg.dataset)).stats.length))
    statements = []
    for c in TRAIN:
        reply, states[c] = _setup(cfg, c)
        stats.add(record_bytes(reply.content.array_records["stats"], PlainCipher.stype))
        if c == "Albania":
            statements.append(_statement(reply))
    good = _round_one(cfg, stats.serialize(), [["stats", 0, list(TRAIN)]])
    for content in (_round_one(cfg, stats.serialize(), [["stats", 0, ["Albania"]]], 1), good):
        reply, states["Albania"] = _ask(ca.train, "Albania", content, MessageType.TRAIN, cfg.to_flower(),
                                        states["Albania"])
        statements.append(_statement(reply))
    close = {"config": ConfigRecord({"server-round": 1})}
    reply, states["Albania"] = _ask(ca.close, "Albania", close, "query.close", cfg.to_flower(), states["Albania"])
    statements.append(_statement(reply))
    assert [(s["kind"], s["status"]) for s in statements] == [("stats", "ok"), ("train", "refused"), ("train", "ok"),
                                                              ("close", "ok")]
    assert all(statement_problem(s, charter.keys, charter.sha256) is None for s in statements)
    problems, notes = [], []
    chain = check_chain("Albania", list(enumerate(statements, 1)), problems, notes)
    assert problems == [] and [s["seq"] for _, s in chain] == [0, 1, 2, 3]
    assert statements[-1]["facts"]["history"] == statements[2]["facts"]["history"]    # its final history
    with pytest.raises(Exception, match="closed its signed history"):
        _ask(ca.train, "Albania", good, MessageType.TRAIN, cfg.to_flower(), states["Albania"])

"""The server's pieces without a federation: start() refuses what it cannot honour, and a
checkpoint comes back exactly, or is refused when the config or the ledger no longer match."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from carbonfed.federation.config import RunConfig
from carbonfed.federation.server.app import build_strategy
from carbonfed.federation.server.checkpoint import CheckpointError, ServerState, read_checkpoint, write_checkpoint
from carbonfed.privacy.ledger import Ledger


@pytest.fixture
def run(tmp_path):
    return build_strategy(RunConfig(privacy="dp"), tmp_path)[0]


@pytest.mark.parametrize("kw, words", [
    ({"initial_arrays": ArrayRecord({"w": Array(np.zeros(2))})}, "initial_arrays"),
    ({"evaluate_fn": lambda rnd, arrays: None}, "evaluate_fn"),
    ({"timeout": 0}, "timeout")])
def test_start_refuses_what_it_cannot_honour(run, kw, words):
    with pytest.raises(ValueError, match=words):
        run.start(None, **kw)


def test_the_wrapped_strategies_refuse_flowers_own_loop(run):
    for strategy in (run.fedavg, run.recorder):
        with pytest.raises(TypeError, match="ResumableRun"):
            strategy.start(None, ArrayRecord())


def _state():
    return ServerState(roles={7: ("train", "Albania"), 9: ("test", "Chad")}, stages=[(b"s1", 2), (b"s2", 2)],
                       model=b"m2", model_terms=2, round=2, tail=[(1, b"m1", 2), (2, b"m2", 2)])


def test_checkpoint_round_trip_and_refusals(tmp_path):
    cfg = RunConfig(privacy="dp")
    (tmp_path / "aggregates").mkdir()
    for r, data in ((1, b"m1"), (2, b"m2")):
        (tmp_path / "aggregates" / f"model_round_{r:03d}.bin").write_bytes(data)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.append({"kind": "round", "round": 2})
    write_checkpoint(tmp_path, _state(), cfg, "fp", ledger, 12.5, [])
    ledger.append({"kind": "train", "round": 3})          # a line of the interrupted round
    res = read_checkpoint(tmp_path, cfg, "fp", ledger.path)
    assert res.state == _state() and res.elapsed_s == 12.5 and res.resumed_from == [2]
    assert res.line["checkpoint_lines"] == 1 and res.line["interrupted_lines"] == 1
    with pytest.raises(CheckpointError, match="another config"):
        read_checkpoint(tmp_path, replace(cfg, rounds=cfg.rounds + 1), "fp", ledger.path)
    with pytest.raises(CheckpointError, match="another public key"):
        read_checkpoint(tmp_path, cfg, "other", ledger.path)
    (tmp_path / "ledger.jsonl").write_text("")
    with pytest.raises(CheckpointError, match="cut or replaced"):
        read_checkpoint(tmp_path, cfg, "fp", ledger.path)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["format"] == 1

"""The server's side of ``ddp+he`` (federation/server/strategy.py, ddp.py) with real BFV uploads:
a round whose accepted uploads fall below ``min-noise-clients`` is not released (the previous
aggregate stays, nothing is written for the round), and what the ledger records of each round."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from carbonfed.federation.client.participant import make_cipher
from carbonfed.federation.config import RunConfig
from carbonfed.federation.flower_compat import act_as_server_app
from carbonfed.federation.server.app import build_strategy
from carbonfed.federation.server.ddp import round_record
from carbonfed.federation.server.strategy import log_verdict
from carbonfed.federation.wire import bytes_record
from carbonfed.privacy.he import SECRET_CONTEXT_FILE, load_secret_context
from carbonfed.privacy.packing import with_checks


def _reply(fedavg, node: int, rng) -> Message:
    """A client's upload (random integers under the key holders' context) as the ClientApp replies."""
    cipher = make_cipher(fedavg.cfg, load_secret_context(fedavg.cfg.keys_dir + "/" + SECRET_CONTEXT_FILE),
                         fedavg.cipher_for("update").length)
    vec = with_checks(rng.integers(-1000, 1000, cipher.length - -(-cipher.length // 4096)))
    req = Message(content=RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)
    meta = ConfigRecord({"status": "ok", "fingerprint": fedavg.fingerprint})
    return Message(RecordDict({"meta": meta, "update": bytes_record(cipher.encrypt(vec), cipher.stype)}), reply_to=req)


@pytest.fixture
def fedavg(tmp_path, keys_dir):
    act_as_server_app(run_id=1)
    cfg = RunConfig(privacy="ddp+he", rounds=3, min_noise_clients=3, keys_dir=str(keys_dir))
    run, _ = build_strategy(cfg, tmp_path)
    run.fedavg.state.roles = {n: ("train", f"C{n}") for n in range(1, 5)}
    run.fedavg.on_verdict = log_verdict        # the strategy alone, no ledger
    return run.fedavg


def test_a_round_below_the_noise_floor_is_not_released(fedavg):
    rng = np.random.default_rng(0)
    assert fedavg.release_floor() == 3
    arrays, metrics = fedavg.aggregate_train(1, [_reply(fedavg, n, rng) for n in (1, 2, 3)])
    assert arrays is not None and fedavg.state.model_terms == 3 and fedavg.ddp_round["released"]
    kept = fedavg.state.model
    arrays, metrics = fedavg.aggregate_train(2, [_reply(fedavg, n, rng) for n in (1, 2)])
    assert arrays is None and metrics["accepted"] == 2
    assert fedavg.state.model == kept and fedavg.state.model_terms == 3           # the previous aggregate stays
    assert not (fedavg.out / "aggregates" / "model_round_002.bin").exists()
    assert fedavg.ddp_round["contributors"] == 2 and not fedavg.ddp_round["released"]
    assert "variance" not in fedavg.ddp_round                                      # no noise accounted: not released


def test_the_ledger_states_each_rounds_noise_at_its_contributors():
    cfg = RunConfig(privacy="ddp+he", rounds=30)
    low, high = round_record(cfg, 131, 105), round_record(cfg, 131, 131)
    assert low["released"] and high["released"] and not round_record(cfg, 131, 104)["released"]
    assert low["min_noise_clients"] == 105 and high["training_clients"] == 131
    assert high["variance"] == pytest.approx(low["variance"] * 131 / 105)
    assert low["variance"] == pytest.approx(low["share_variance"] * 105)

"""``carbonfed bench he`` with the seeded upload beside today's packing, and the stock Flower FedAvg
app that ``bench/round_time.py`` measures against (its ClientApp, in process, on the seed data)."""

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from carbonfed.data import split_countries
from carbonfed.federation.config import RunConfig
from carbonfed.federation.experiments.bench_he import format_table, run_bench
from carbonfed.federation.experiments.bench_he_schemes import SCHEMES
from carbonfed.federation.experiments.stock_fedavg import make_client_app
from carbonfed.federation.flower_compat import act_as_server_app
from carbonfed.privacy.he_ring import ring_for


def test_bench_reports_the_seeded_upload_beside_tenseal_and_the_baseline():
    r = run_bench(8192, 3, seed=2)
    assert list(r["scheme"]) == ["tenseal_public_key", "carbonfed_default_ring", "carbonfed", "baseline"]
    today, default, ours = r["tenseal_public_key"], r["carbonfed_default_ring"], r["carbonfed"]
    for s in (today, default, ours):
        assert s["exact_sum"] is True and s["max_abs_error"] <= 1e-6 and s["security_bits"] >= 128
    assert r["baseline"]["exact_sum"] is None
    # one polynomial and a seed per ciphertext: about half of TenSEAL's two; the run's ring less again
    assert ours["bytes_per_param"] <= default["bytes_per_param"] < 0.6 * today["bytes_per_param"]
    assert ours["bytes_per_param"] <= 8
    assert f"N={ring_for(8192, 3).poly_modulus_degree}" in r["scheme"]["carbonfed"]
    cmp = r["seeded_vs_tenseal"]
    assert cmp["upload_ratio"] == ours["bytes_per_param"] / today["bytes_per_param"]
    assert cmp["encrypt_speedup"] == ours["encrypt_params_per_s"] / today["encrypt_params_per_s"]
    table = format_table(r)
    assert all(name in table for name in SCHEMES) and "exact sums" in table


def _ask(app, kind: str, pid: int, content: dict) -> Message:
    msg = Message(content=RecordDict(content), dst_node_id=pid + 1, message_type=kind)
    ctx = Context(run_id=1, node_id=pid + 1, node_config={"partition-id": pid}, state=RecordDict(), run_config={})
    return app(msg, ctx)


def test_stock_client_trains_and_evaluates_the_linear_model_on_its_rows(seed_data):
    act_as_server_app(run_id=1)
    cfg = RunConfig(privacy="none", hidden="linear")
    app = make_client_app(cfg)
    torch.manual_seed(0)
    start = torch.nn.Linear(21, 5).state_dict()
    countries = seed_data.countries()
    pid = countries.index(split_countries(countries).train[0])
    rows = len(seed_data.client_arrays(countries[pid])[1])
    content = {"arrays": ArrayRecord(start), "config": ConfigRecord({"server-round": 1})}
    out = _ask(app, MessageType.TRAIN, pid, content).content
    assert out["metrics"]["num-examples"] == rows
    trained = out["arrays"].to_torch_state_dict()
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in start.items()}
    assert not torch.equal(trained["weight"], start["weight"])
    again = _ask(app, MessageType.TRAIN, pid, content).content["arrays"].to_torch_state_dict()
    assert torch.equal(again["weight"], trained["weight"])            # the node's own sampling seed
    ev = _ask(app, MessageType.EVALUATE, pid, {"arrays": ArrayRecord(trained), "config": ConfigRecord({})}).content
    assert ev["metrics"]["num-examples"] == rows and 0 <= ev["metrics"]["eval_acc"] <= 1
    assert np.isfinite(ev["metrics"]["eval_loss"])

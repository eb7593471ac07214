"""Masks on every upload, through the real Flower pipeline (issue 22): Ray simulation, real TenSEAL
BFV, real clients on the 15-party CSV (12 training clients, 3 held out).

``ddp+he`` with masks (OWID's recommended preset): the statistics stages (``stats`` stream), the
model updates and the held-out clients' evaluation counts (``metrics`` stream) are all masked and
all unmasked exactly: with reproducible noise the run equals the unmasked one bit for bit (model,
per-round evaluation, released statistics), and its ledger verifies without the key.
"""

from __future__ import annotations

import pytest
import torch

from carbonfed.data.example import write_example_csv
from carbonfed.federation.config import RunConfig
from carbonfed.federation.report.build import build_report
from carbonfed.federation.run_data import with_data_schema
from carbonfed.federation.simulation import run_simulation
from carbonfed.privacy.audit.verify import verify_run
from carbonfed.privacy.ledger import read_ledger

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return write_example_csv(tmp_path_factory.mktemp("mask-streams-csv") / "example.csv", parties=15)


def _run(table, keys_dir, out, **kw):
    cfg = with_data_schema(RunConfig(dataset="csv", data=str(table), client_col="site", label_col="level",
                                     keys_dir=str(keys_dir), out_dir=str(out), **kw))
    run_simulation(cfg)
    rep = build_report(cfg.out_dir, keys_dir)
    return cfg, rep, read_ledger(out / "ledger.jsonl")


def test_ddp_he_with_masks_on_every_upload_equals_the_unmasked_run(table, keys_dir, tmp_path):
    job = dict(privacy="ddp+he", rounds=2, reproducible_noise=True)
    cfg, masked, ledger = _run(table, keys_dir, tmp_path / "masked", masks=True, **job)
    _, plain, plain_ledger = _run(table, keys_dir, tmp_path / "plain", masks=False, **job)
    a, b = (torch.load(r["model"]["path"], weights_only=False)["state_dict"] for r in (masked, plain))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timeless = lambda r: [{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]]
    assert timeless(masked) == timeless(plain) and masked["metrics"] == plain["metrics"]   # the evaluation counts
    assert masked["preprocessing"] == plain["preprocessing"]                                # the released statistics
    stats = [line for line in ledger if line.get("kind") == "stats-masks"]
    assert [(s["stage"], s["status"], s["shared"], s["summed"]) for s in stats] == [
        (k, "unmasked", 12, 12) for k in range(1, cfg.stats_releases + 1)]
    rounds = [line for line in ledger if line.get("kind") == "round"]
    assert [(r["masks"]["status"], r["masks"]["summed"]) for r in rounds] == [("unmasked", 12)] * 2
    assert [(r["metrics_masks"]["status"], r["metrics_masks"]["summed"]) for r in rounds] == [("unmasked", 3)] * 2
    assert [r["evaluated"] for r in rounds] == [3, 3]
    assert not [line for line in ledger if line.get("kind") == "masks"]          # nothing refused
    assert not [line for line in plain_ledger if line.get("kind") in ("stats-masks", "masks")]
    assert all("metrics_masks" not in r for r in plain_ledger if r.get("kind") == "round")
    res = verify_run(tmp_path / "masked")
    assert res.ok, res.problems


def test_every_statistics_stage_of_a_one_round_run_is_masked(table, keys_dir, tmp_path):
    """Three statistics stages before a single round: the stages are mask rounds 1..3 of their own
    stream, while the run's round stays 0 (no stage is a round outside the charter's plan)."""
    _, _, ledger = _run(table, keys_dir, tmp_path / "run", privacy="dp+he", rounds=1, stats_stages=3, masks=True)
    stats = [line for line in ledger if line.get("kind") == "stats-masks"]
    assert [(s["round"], s["stage"], s["status"], s["summed"]) for s in stats] == [(0, k, "unmasked", 12) for k in (1, 2, 3)]
    assert not [line for line in ledger if line.get("kind") == "masks"]
    (rnd,) = [line for line in ledger if line.get("kind") == "round"]
    assert rnd["masks"]["status"] == rnd["metrics_masks"]["status"] == "unmasked"

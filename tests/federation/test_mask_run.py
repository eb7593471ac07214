"""Pairwise masks through the real Flower pipeline (issue 22): Ray simulation, real TenSEAL BFV,
real clients; a 15-party federated CSV (12 training clients, threshold 7 of 11 neighbours).

* clients whose uploads do not count after they shared (a third of them: a corrupt or wrong-length
  ciphertext, a NaN model) are dropped, their masks recovered in the seeds step, and the model
  equals the unmasked run's without their updates (the same faults): the masks cancel exactly;
* one more than a third dropped: the round is not unmasked, the ledger says why.

Masks are opt-in (``masks=True``). One dropout of 10 and of 131 clients, and exact sums for 2, 10 and
131, in ``tests/privacy/test_masks.py``.
"""

from __future__ import annotations

import pytest
import torch

from carbonfed.data.example import write_example_csv
from carbonfed.federation.client.masking import MASK_FAULTS
from carbonfed.federation.config import RunConfig
from carbonfed.federation.faults import FAULTS
from carbonfed.federation.report.build import build_report
from carbonfed.federation.report.statement import write_privacy_statement
from carbonfed.federation.run_data import with_data_schema
from carbonfed.federation.simulation import run_simulation
from carbonfed.privacy.ledger import read_ledger

pytestmark = pytest.mark.slow

TRAIN = ("Australia", "Barbados", "Chad", "Djibouti", "Kazakhstan", "Laos", "Mexico", "Mongolia",
         "Sao Tome and Principe", "Senegal", "Thailand", "Venezuela")      # the 15-party table's training clients
THIRD = "Barbados:corrupt,Chad:wrong-length,Djibouti:nan,Laos:corrupt"


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return write_example_csv(tmp_path_factory.mktemp("mask-csv") / "example.csv", parties=15)


def _run(table, keys_dir, out, report=True, **kw):
    cfg = with_data_schema(RunConfig(dataset="csv", data=str(table), client_col="site", label_col="level",
                                     privacy=kw.pop("privacy", "he"), keys_dir=str(keys_dir), out_dir=str(out), **kw))
    run_simulation(cfg)
    ledger = read_ledger(out / "ledger.jsonl")
    if not report:
        return None, None, ledger
    rep = build_report(cfg.out_dir, keys_dir)
    return torch.load(rep["model"]["path"], weights_only=False)["state_dict"], rep, ledger


def _same(a, b) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _masks(ledger) -> list[dict]:
    return [line["masks"] for line in ledger if line.get("kind") == "round"]


def test_a_third_dropped_after_sharing_is_recovered_exactly(table, keys_dir, tmp_path):
    """Four of the twelve shared their masks, then their uploads did not count: their masks are
    recovered, and the model is the unmasked run's, which sums the same eight updates."""
    masked, report, ledger = _run(table, keys_dir, tmp_path / "masked", rounds=1, fault_drill=THIRD, masks=True)
    plain, _, plain_ledger = _run(table, keys_dir, tmp_path / "plain", rounds=1, fault_drill=THIRD, masks=False)
    _same(masked, plain)
    (block,) = _masks(ledger)
    assert (block["status"], block["shared"], block["uploaded"], block["summed"]) == ("unmasked", 12, 8, 8)
    assert block["dropped"] == ["Barbados", "Chad", "Djibouti", "Laos"]
    assert block["key_holders"] == 8            # the eight summed: each dealer's T = 7 others; nobody else asked
    assert not [line for line in ledger if line.get("kind") == "masks"]      # nothing refused: all answered
    assert all("masks" not in line for line in plain_ledger if line.get("kind") == "round")
    he = report["he"]["masks"]
    assert (he["threshold"], he["neighbours"], he["max_dropped"], he["rounds_unmasked"]) == (7, 11, 4, 1)
    assert set(he["who_learns_what"]) == {"server_alone", "server_with_fewer_than_t_clients", "t_or_more_clients"}
    md = write_privacy_statement(tmp_path / "masked", report, None).read_text()      # the statement says the same
    assert "threshold t = 7" in md and "1 round(s) unmasked, 0 abandoned" in md
    assert f"| the server alone | {he['who_learns_what']['server_alone']} |" in md


def test_more_than_a_third_dropped_is_not_unmasked(table, keys_dir, tmp_path):
    _, _, ledger = _run(table, keys_dir, tmp_path / "run", report=False, rounds=1, fault_drill=THIRD + ",Mexico:nan",
                        masks=True)
    (block,) = _masks(ledger)
    assert block["status"] == "abandoned" and "5 of 12 clients are not summed" in block["reason"]
    (line,) = [line for line in ledger if line.get("kind") == "round"]
    assert line["model_terms"] == 0 and "model_round_001.bin" not in line["aggregates"]   # nothing kept


def test_forged_bad_and_replayed_mask_messages_are_ledgered_and_the_round_goes_on(table, keys_dir, tmp_path):
    assert set(MASK_FAULTS) <= set(FAULTS)                       # the drills are accepted by --fault-drill
    drill = "Laos:mask-impostor,Senegal:mask-bad-key,Thailand:mask-replay"
    _, _, ledger = _run(table, keys_dir, tmp_path / "run", report=False, rounds=2, fault_drill=drill, masks=True)
    for block in _masks(ledger):
        assert (block["status"], block["shared"], block["summed"]) == ("unmasked", 11, 11)   # the impostor sat out
        assert 8 <= block["key_holders"] < 11       # T + 1 = 8 asked, and one more for each bad key among them
    # round 2's training request went out while round 1's evaluation counts were unmasked; what its
    # making recorded (Laos not asked: no accepted bundle) still follows round 1's `round` line
    kinds = [(line["kind"], line["round"], line.get("country"), line.get("reason", "")) for line in ledger]
    end_1 = kinds.index(("round", 1, None, ""))
    not_asked = [i for i, (kind, rnd, country, why) in enumerate(kinds) if "not asked to train" in why]
    assert [kinds[i][1:3] for i in not_asked] == [(1, "Laos"), (2, "Laos")] and not_asked[0] < end_1 < not_asked[1]
    assert all(rnd == 2 for _, rnd, _, _ in kinds[end_1 + 1:kinds.index(("round", 2, None, ""))])
    why = {}
    for line in ledger:
        if line.get("kind") == "masks":
            why.setdefault(line["country"], []).append(f"{line['step']}: {line['reason']}")
    assert any("bundle: claims to be Australia but is not signed by Australia's key" in r for r in why["Laos"])
    assert any("does not open that share" in r for r in why["Senegal"])
    assert any("replayed: made for run" in r for r in why["Thailand"])

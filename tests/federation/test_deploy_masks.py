"""Masks on Flower's deployment engine (issue 22): ``carbonfed deploy local`` with ``masks`` on,
real SuperLink and SuperNode processes (TLS, node authentication), one training SuperNode
SIGKILLed while its ClientApp handles round 2.

The victim shared its round-2 masks (in round 1's unmask exchange) and then never uploaded: the
survivors reveal their pair seeds with it, and round 2's sum of the other two is unmasked. Restarted
after round 2, it has no round-3 bundle (it was down when they were collected): it sits round 3 out
(a ``masks`` line) and closes its signed history, so the run still verifies without the key.
Every statistics stage is masked too. About 6 minutes on an idle machine: marked ``drill``.
"""

import pytest

from carbonfed.federation.config import RunConfig
from carbonfed.federation.deploy.local import deploy_local
from carbonfed.federation.deploy.processes import marked_pids
from carbonfed.privacy.audit.verify import verify_run
from carbonfed.privacy.ledger import read_ledger

pytestmark = [pytest.mark.slow, pytest.mark.drill]

CFG = RunConfig(privacy="dp+he", rounds=3, local_epochs=1, batches_per_epoch=3, round_timeout=240.0,
                min_train_clients=2, masks=True)


def test_a_supernode_killed_mid_round_is_recovered_from_its_masks(tmp_path):
    events = {}
    out = deploy_local(CFG, 4, tmp_path / "run", kill_client_in_round=2,
                       on_event=lambda name, info: events.__setitem__(name, info))
    assert marked_pids(events["started"]["marker"]) == []                  # nothing left running
    victim, lines = events["killed"]["country"], read_ledger(out / "ledger.jsonl")
    stats = [line for line in lines if line["kind"] == "stats-masks"]
    assert stats and all((s["status"], s["summed"]) == ("unmasked", 3) for s in stats)
    rounds = {line["round"]: line for line in lines if line["kind"] == "round"}
    assert (rounds[1]["masks"]["status"], rounds[1]["masks"]["summed"]) == ("unmasked", 3)
    r2 = rounds[2]["masks"]
    assert (r2["status"], r2["shared"], r2["summed"], r2["dropped"]) == ("unmasked", 3, 2, [victim])
    assert rounds[2]["model_terms"] == 2 and "model_round_002.bin" in rounds[2]["aggregates"]
    mine = [line for line in lines if line["kind"] == "train" and line["round"] == 2 and line["country"] == victim]
    assert [line["status"] for line in mine] == ["missing"]
    assert (rounds[3]["masks"]["status"], rounds[3]["masks"]["summed"]) == ("unmasked", 2)
    assert any(line["kind"] == "masks" and line["round"] == 3 and line["country"] == victim
               and "not asked to train" in line["reason"] for line in lines)
    assert any(line["kind"] == "close" and line["country"] == victim and line["status"] == "accepted" for line in lines)
    res = verify_run(out)
    assert res.ok, res.problems

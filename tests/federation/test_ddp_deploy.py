"""``ddp+he`` on Flower's deployment engine (issue 19): ``carbonfed deploy local`` with real
SuperLink and SuperNode processes (TLS, node authentication), masks on as the mode's preset has
them. Each round's aggregate carries every training client's noise share: the ledger counts
them, verify recomputes the central ε on its own, and report.json states the same ε.
About 2 minutes on an idle machine: marked ``drill`` with the other deployments. A deployment's
noise floor counts the training SuperNodes it deployed (unit test)."""

import json

import pytest

from carbonfed.federation.config import RunConfig
from carbonfed.federation.deploy.deployment import choose_countries, with_deployed_noise_floor
from carbonfed.federation.deploy.local import deploy_local
from carbonfed.federation.deploy.processes import marked_pids
from carbonfed.privacy.audit.verify import verify_run
from carbonfed.privacy.ledger import read_ledger


ROUNDS = 2
CFG = RunConfig(privacy="ddp+he", rounds=ROUNDS, average_last=1, round_timeout=240.0, min_train_clients=2)


def test_the_noise_floor_of_a_deployment_counts_its_own_training_clients():
    """Only the SuperNodes deployed contribute shares: ⌈0.8 · 3⌉ = 3 of 3 (not 105 of the data set's
    131); a floor the user gave stays, and other modes are untouched."""
    countries = choose_countries(CFG, 4)
    assert with_deployed_noise_floor(CFG, countries).min_noise_clients == 3
    assert CFG.noise_floor(131) == 105
    given = RunConfig(privacy="ddp+he", min_noise_clients=2)
    assert with_deployed_noise_floor(given, countries) is given
    dp = RunConfig(privacy="dp+he")
    assert with_deployed_noise_floor(dp, countries) is dp


@pytest.mark.slow
@pytest.mark.drill
def test_a_ddp_run_on_a_local_deployment_releases_every_round_within_epsilon(tmp_path):
    events = {}
    out = deploy_local(CFG, 4, tmp_path / "run", on_event=lambda name, info: events.__setitem__(name, info))
    assert marked_pids(events["started"]["marker"]) == []                  # nothing left running
    lines = read_ledger(out / "ledger.jsonl")
    rounds = [line for line in lines if line["kind"] == "round"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for r in rounds:                                # 3 training SuperNodes, 1 held out
        assert (r["ddp"]["contributors"], r["ddp"]["released"], r["ddp"]["min_noise_clients"]) == (3, True, 3)
        assert (r["masks"]["status"], r["masks"]["summed"]) == ("unmasked", 3)
    res = verify_run(out)
    assert res.ok, res.problems
    assert res.epsilon_max_claimed <= CFG.epsilon and res.ddp["epsilon"] <= CFG.epsilon
    ddp = json.loads((out / "report.json").read_text())["privacy"]["ddp"]       # written with the run's keys
    assert abs(ddp["epsilon_central"] - res.ddp["epsilon"]) <= 0.01 * res.ddp["epsilon"]
    assert ddp["rounds_released"] == ROUNDS

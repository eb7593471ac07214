"""The empirical audit: the binomial bound and the loud failure (privacy/audit/empirical.py), the
canary data (federation/experiments/canaries.py). The real audits (federation/experiments/audit_attack.py,
Flower simulation: white-box and black-box lines, membership inference, the CLI's JSON) are in
test_audit_rerun.py."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom

from carbonfed.federation.experiments import audit_attack as audit
from carbonfed.federation.experiments.canaries import make_canaries, write_canary_data
from carbonfed.privacy.audit.empirical import (AuditFailure, canary_bound, check_claim, epsilon_lower_bound,
                                               mia_metrics, p_value)


def _q(eps):
    return math.exp(eps) / (1 + math.exp(eps))


# -- the bound ------------------------------------------------------------------------------------
def test_all_correct_matches_hand_computation():
    # 100/100 correct: P[Bin(100, q) >= 100] = q^100 = 0.05  =>  q = 0.05^(1/100), ε = log(q / (1 - q)).
    q = 0.05 ** (1 / 100)
    expected = math.log(q / (1 - q))
    assert expected == pytest.approx(3.49297, abs=1e-4)
    eps = epsilon_lower_bound(100, 100, 100, confidence=0.95)
    assert eps == pytest.approx(expected, abs=1e-5)
    assert binom.sf(99, 100, _q(eps)) == pytest.approx(0.05, rel=1e-4)


def test_partial_guesses_match_scipy_tail():
    eps = epsilon_lower_bound(1000, 100, 90, confidence=0.95)
    assert eps > 0
    assert binom.sf(89, 100, _q(eps)) == pytest.approx(0.05, rel=1e-4)       # the test is exactly at its level
    assert binom.sf(89, 100, _q(eps + 0.01)) > 0.05 > binom.sf(89, 100, _q(eps - 0.01))


def test_chance_level_gives_zero():
    assert epsilon_lower_bound(100, 100, 50, confidence=0.95) == 0.0
    assert epsilon_lower_bound(100, 100, 58, confidence=0.95) == 0.0          # P[Bin(100, 1/2) >= 58] = 0.067
    assert epsilon_lower_bound(100, 0, 0, confidence=0.95) == 0.0


def test_delta_term_only_weakens_the_bound():
    m, r, v, delta = 200, 40, 38, 1e-5
    for eps in (0.0, 1.0, 2.0):
        assert p_value(m, r, v, eps) <= p_value(m, r, v, eps, delta) <= p_value(m, r, v, eps) + 2 * m * delta
    assert epsilon_lower_bound(m, r, v, 0.95, delta) <= epsilon_lower_bound(m, r, v, 0.95)
    assert epsilon_lower_bound(m, r, v, 0.99) < epsilon_lower_bound(m, r, v, 0.95)


def test_canary_bound_with_perfect_attack_uses_bonferroni():
    m = 100
    included = np.arange(m) % 2 == 0
    res = canary_bound(included.astype(float), included, confidence=0.95, delta=0.0)
    # k = 5, 10, 20, 50 per side: four tests at level 0.05 / 4; the best uses all 100 guesses.
    assert [s["k_per_side"] for s in res["sweep"]] == [5, 10, 20, 50]
    assert res["guesses"] == 100 and res["correct"] == 100
    assert res["epsilon_lower_bound"] == pytest.approx(epsilon_lower_bound(m, 100, 100, 1 - 0.05 / 4), abs=1e-6)
    blind = canary_bound(np.zeros(m), included, confidence=0.95)
    assert blind["epsilon_lower_bound"] <= res["epsilon_lower_bound"]
    two = canary_bound({"a": included.astype(float), "b": np.zeros(m)}, included, confidence=0.95)
    assert two["tests"] == 8 and two["score"] == "a"
    assert two["epsilon_lower_bound"] == pytest.approx(epsilon_lower_bound(m, 100, 100, 1 - 0.05 / 8), abs=1e-6)


def test_mia_metrics_extremes():
    perfect = mia_metrics(np.array([2.0, 3.0, 4.0]), np.array([0.0, 1.0]))
    assert perfect == {"mia_auc": 1.0, "tpr_at_1pct_fpr": 1.0, "tpr_at_0_1pct_fpr": 1.0}
    worst = mia_metrics(np.array([0.0, 1.0]), np.array([2.0, 3.0]))
    assert worst["mia_auc"] == 0.0 and worst["tpr_at_1pct_fpr"] == 0.0


# -- the loud failure -----------------------------------------------------------------------------
def test_bound_above_claim_fails_loudly():
    with pytest.raises(AuditFailure, match="bug in the privacy accounting or in the DP implementation"):
        check_claim(3.49, 3.0)
    check_claim(2.5, 3.0)            # below the claim: fine
    check_claim(3.0, 3.0)            # equal: fine
    check_claim(50.0, None)          # no DP claimed: nothing to violate


def test_cli_exits_nonzero_on_failure(monkeypatch, capsys, tmp_path):
    result = {"epsilon_lower_bound": 3.49, "claimed_epsilon": 1.0}

    def fake(*a, **k):
        raise AuditFailure("AUDIT FAILED: ... bug in the privacy accounting ...", result)
    monkeypatch.setattr(audit, "audit_run", fake)
    assert audit.main([str(tmp_path), "--json"]) == 3
    out, err = capsys.readouterr()
    assert json.loads(out) == result and "AUDIT FAILED" in err


# -- the canary data ------------------------------------------------------------------------------
@pytest.mark.slow
def test_canary_data_adds_exactly_the_included_rows(tmp_path, seed_data):
    from carbonfed.data import load_dataset, split_countries
    from carbonfed.data.seed import SEED_LABEL_SOURCE

    part = split_countries(seed_data.countries(), 0)
    rng = np.random.default_rng(1)
    c = make_canaries(seed_data, part.train, 50, rng)
    assert set(c["country"]) <= set(part.train) and len(set(c["year"])) == 50 and min(c["year"]) >= 5000
    write_canary_data(Path(seed_data.source["path"]), tmp_path, c, seed_data.features, SEED_LABEL_SOURCE)
    ds = load_dataset("seed", tmp_path)
    assert ds.countries() == seed_data.countries()
    assert len(ds.frame) == len(seed_data.frame) + int(c["included"].sum())
    added = ds.frame[ds.frame["year"] >= 5000].sort_values("year")
    idx = np.flatnonzero(c["included"])
    assert added["year"].tolist() == [c["year"][i] for i in idx]
    assert added["label"].tolist() == [int(c["label"][i]) for i in idx]
    np.testing.assert_array_equal(added[list(ds.features)].to_numpy(), c["x"][idx])
    assert np.isfinite(c["x"]).all()

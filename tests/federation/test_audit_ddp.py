"""The ``ddp+he`` white-box audit (federation/experiments/audit_ddp.py) on the real distributed-DP
maths: real per-example gradients of a real model, the clients' canary hook
(privacy/canary_ddp.py), their Skellam shares and row-by-row rounding
(:func:`~carbonfed.privacy.distributed_dp.contribution`), the real ddp upload layout summed modulo
t, and the key holders' release. A correct mechanism at ε = 3 gives a bound below the claim;
the broken-noise drill (shares at a tenth of the plan's noise) gives one above it."""

import numpy as np
import pytest

from carbonfed.data.example import write_example_csv
from carbonfed.federation.client.ddp import per_example_grads
from carbonfed.federation.client.ddp_layout import ddp_plan, update_layout
from carbonfed.federation.config import RunConfig
from carbonfed.federation.experiments.audit_attack import verdict
from carbonfed.federation.experiments.audit_ddp import (FRACTIONS, aggregate_observation, canary_cap, ddp_scores,
                                                        ddp_whitebox_audit, read_observations)
from carbonfed.federation.experiments.audit_whitebox import plan_canaries
from carbonfed.federation.run_data import with_data_schema
from carbonfed.models.mlp import build_model
from carbonfed.privacy.audit.empirical import canary_bound, lmmse_scores
from carbonfed.privacy.canary_ddp import NO_DDP_CANARIES, DDPCanaries, ddp_canaries, embed, output_shape
from carbonfed.privacy.canary_grad import ENV_VAR, null_projection
from carbonfed.privacy.distributed_dp import contribution, sample_rows
from carbonfed.privacy.randomness import NoiseSource

F, K, ROUNDS, CLIENTS = 21, 5, 20, ("A", "B", "C", "D", "E")


def _setup():
    cfg = RunConfig(privacy="ddp+he", rounds=ROUNDS, hidden="32")
    plan_ = ddp_plan(cfg, F, K, len(CLIENTS))
    model = build_model(F, K, cfg.hidden_sizes, cfg.seed)
    rng = np.random.default_rng(7)
    rows = {c: (rng.normal(size=(20, F)).astype(np.float32), rng.integers(0, K, size=20)) for c in CLIENTS}
    return cfg, plan_, model, rows


def _observations(cfg, plan_, model, rows, plan):
    """Every client's contribution of every round (canaries in), summed modulo t as the server
    does, then observed as the key holders release it."""
    layout = update_layout(cfg, F, K)
    state = np.zeros(3 * layout.n_params)
    _, dim = output_shape(model)
    found = []
    for rnd in range(1, ROUNDS + 1):
        total = 0
        for country, (x, y) in rows.items():
            canaries = DDPCanaries(plan, country, rnd)
            canaries.rng = np.random.default_rng([rnd, len(country)])
            src = NoiseSource.derived(0, country, rnd)
            taken = sample_rows(len(y), plan_.sample_rate, src)
            grads = canaries.rows(model, per_example_grads(model, x[taken], y[taken]), plan_.sample_rate, plan_.clip)
            vec, _ = layout.pack(state, 1, contribution(canaries.mechanism(plan_), grads, src),
                                 np.random.default_rng(rnd))
            total = total + vec.astype(np.int64)
        obs, terms = aggregate_observation(np.mod(total, plan_.plain_modulus), plan_, layout, K, dim)
        assert terms == len(CLIENTS)
        found.append((rnd, obs, terms))
    return found


@pytest.mark.parametrize("noise_scale", [1.0, 0.1])
def test_the_audit_bounds_a_correct_mechanism_below_its_claim_and_refutes_the_drill(tmp_path, noise_scale):
    cfg, plan_, model, rows = _setup()
    claim = plan_.epsilon(cfg.delta)
    assert 2.9 < claim <= 3.0 and plan_.sample_rate == 1.0
    _, dim = output_shape(model)
    m = canary_cap(ROUNDS, dim)                    # 495 canaries, 20 rounds × 33 numbers observed
    plan = plan_canaries(cfg, list(CLIENTS), m, np.random.default_rng(3), "run", str(tmp_path), noise_scale)
    observations = _observations(cfg, plan_, model, rows, plan)
    scores, sigma2 = ddp_scores(plan, observations, plan_.sample_rate)
    inc = np.asarray(plan.included)
    nominal = np.sqrt(plan_.share_variance * len(CLIENTS)) / plan_.scale / plan_.clip
    # the noise the auditor estimates from the aggregates alone is the noise the clients drew
    assert 0.6 * nominal * noise_scale < np.sqrt(sigma2) < 1.5 * nominal * noise_scale
    res = canary_bound({"lmmse": scores["lmmse"]}, inc, confidence=0.95, delta=cfg.delta, fractions=FRACTIONS,
                       rng=np.random.default_rng(4))
    if noise_scale == 1.0:
        assert res["epsilon_lower_bound"] <= claim
    else:
        assert res["epsilon_lower_bound"] > claim, res
    auc = (scores["lmmse"][inc][:, None] > scores["lmmse"][~inc][None, :]).mean()
    assert auc > (0.99 if noise_scale < 1 else 0.6)


def test_a_canary_lives_where_no_real_gradient_does():
    cfg, plan_, model, rows = _setup()
    k, dim = output_shape(model)
    x, y = rows["A"]
    g = per_example_grads(model, x, y)
    assert (k, dim) == (K, 33)
    assert np.abs(np.stack([null_projection(r, k, dim) for r in g])).max() < 1e-5 * np.abs(g).max()
    u = np.random.default_rng(0).normal(size=(4, dim))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    e = embed(u, k, g.shape[1])
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0)
    np.testing.assert_allclose(np.stack([null_projection(r, k, dim) for r in e]), u, atol=1e-12)


def test_outside_an_audit_a_round_is_unchanged(tmp_path, monkeypatch):
    cfg, plan_, model, rows = _setup()
    monkeypatch.delenv(ENV_VAR, raising=False)
    canaries = ddp_canaries(str(tmp_path / "run"), "A", 1)
    g = np.ones((3, 7))
    assert canaries is NO_DDP_CANARIES and canaries.rows(model, g, 1.0, 2.0) is g and canaries.mechanism(plan_) is plan_
    plan = plan_canaries(cfg, ["A"], 4, np.random.default_rng(0), str(tmp_path / "other"), str(tmp_path), 0.1)
    monkeypatch.setenv(ENV_VAR, str(plan.save(tmp_path)))
    with pytest.raises(RuntimeError, match="refusing to plant canaries"):
        ddp_canaries(str(tmp_path / "run"), "A", 1)
    drill = ddp_canaries(str(tmp_path / "other"), "A", 1)
    assert drill.mechanism(plan_).noise_multiplier == pytest.approx(0.1 * plan_.noise_multiplier)
    assert drill.mechanism(plan_).share_variance == pytest.approx(0.01 * plan_.share_variance)


def test_the_score_is_the_projection_under_heavy_noise_and_the_fit_without(tmp_path):
    rng = np.random.default_rng(5)
    dirs = rng.normal(size=(30, 40, 10))
    dirs /= np.linalg.norm(dirs, axis=2, keepdims=True)
    x = rng.random(40) < 0.5
    clean = np.einsum("tmd,m->td", dirs, x.astype(float))
    fit, s2 = lmmse_scores(clean, dirs)
    assert s2 == pytest.approx(0.0, abs=0.2) and ((fit > 0) == x).all()     # 300 numbers, 40 coins: exact
    noisy = clean + 1e3 * rng.normal(size=clean.shape)
    score, s2 = lmmse_scores(noisy, dirs)
    proj = np.einsum("tmd,td->m", dirs, noisy)
    assert np.sqrt(s2) == pytest.approx(1e3, rel=0.1) and np.corrcoef(score, proj)[0, 1] > 0.999
    cfg = RunConfig(privacy="ddp+he", rounds=2)
    assert read_observations(tmp_path, cfg, None, ddp_plan(cfg, F, K, 5), F, K) == []   # no aggregate: no observation


@pytest.mark.slow
def test_a_real_ddp_federation_audit_stays_below_the_claim_and_catches_the_drill(tmp_path):
    """The whole white-box line on real ddp+he federations (Flower, BFV, the clients' hook in
    federation/client/ddp.py): the 15-party example CSV, 8 rounds, one hidden layer of 64 (the
    canary subspace has 65 dimensions: 520 numbers observed, 390 canaries). ~25 s per audit."""
    table = write_example_csv(tmp_path / "example.csv", parties=15)
    cfg = with_data_schema(RunConfig(dataset="csv", data=str(table), client_col="site", label_col="level",
                                     privacy="ddp+he", rounds=8, hidden="64", out_dir=str(tmp_path / "run")))
    correct = ddp_whitebox_audit(cfg, 10000, 0.95, np.random.default_rng())
    drill = ddp_whitebox_audit(cfg, 10000, 0.95, np.random.default_rng(), noise_scale=0.1)
    for res in (correct, drill):
        assert res["m"] == canary_cap(8, 65) == 390 and res["rounds_read"] == 8 and res["subspace_dim"] == 65
        assert res["claimed_epsilon_canary_run"] == pytest.approx(3.0, abs=0.01)
    claim = correct["claimed_epsilon_canary_run"]
    assert correct["epsilon_lower_bound"] <= claim and "fault_drill" not in correct
    assert 0.6 < correct["noise_sd_estimated"] / correct["noise_sd_accounted"] < 1.5
    assert drill["noise_sd_estimated"] / drill["noise_sd_accounted"] < 0.3         # the missing noise shows
    assert drill["epsilon_lower_bound"] > claim, drill["sweep"]
    assert verdict(claim, {"whitebox": drill}) == ("claim refuted", "whitebox")
    assert not (tmp_path / "run").exists()          # the audit re-runs the config in its own temporary folder

"""The client's protocol (federation/client/participant.py) on the real seed data: the
statistics releases against the pooled rows, the budget refusal, secret noise, the class-prior
start; and how RunConfig sizes the statistics noise."""

import numpy as np
import pytest
import torch

from carbonfed.data import split_countries
from carbonfed.federation.client.participant import BudgetExceeded, Participant, make_cipher
from carbonfed.federation.config import RunConfig
from carbonfed.federation.wire import stage_key
from carbonfed.models.mlp import build_model
from carbonfed.models.params import flatten_params
from carbonfed.data.features import transform
from carbonfed.privacy.accountant import calibrate_noise, epsilon_of
from carbonfed.privacy.dp_sgd import planned_mechanism
from carbonfed.privacy.he import HEParams
from carbonfed.privacy.stats_release import StatsLayout
from carbonfed.privacy.secure_sum import SecureSum


def test_statistics_noise_leaves_dp_sgd_half_of_a_small_budget():
    """At ε = 1 the releases (σ_s = 4) would spend more than the whole budget, and three of them
    (stats-stages 3) more than half of it at ε = 3; σ_s is raised (and only then) so that they
    spend at most half of ε, checked by the independent PLD accountant."""
    from carbonfed.privacy.audit.verify import pld_epsilon
    assert RunConfig(epsilon=8.0, stats_stages=3).stats_sigma == 4.0 == RunConfig(epsilon=3.0, stats_stages=2).stats_sigma
    assert pld_epsilon([(4.0, 1.0, 1)] * 3, 1e-5) > 3.0 / 2
    for eps in (1.0, 0.5):
        cfg = RunConfig(epsilon=eps, stats_stages=2)
        assert cfg.stats_releases == 2 and cfg.stats_sigma > 4.0
        assert eps / 2 - 0.02 <= pld_epsilon([(cfg.stats_sigma, 1.0, 1)] * 2, cfg.delta) <= eps / 2
    for eps in (3.0, 1.0, 0.5):
        cfg = RunConfig(epsilon=eps, stats_stages=3)
        assert cfg.stats_releases == 3 and cfg.stats_sigma > 4.0
        assert eps / 2 - 0.02 <= pld_epsilon([(cfg.stats_sigma, 1.0, 1)] * 3, cfg.delta) <= eps / 2
        sigma = calibrate_noise(eps, cfg.delta, 0.2, 300, prior=[(cfg.stats_sigma, 1.0, 1)] * 3)
        assert epsilon_of([(cfg.stats_sigma, 1.0, 1)] * 3 + [(sigma, 0.2, 300)], cfg.delta) <= eps
    assert RunConfig(privacy="he").stats_sigma == 0.0 == RunConfig(stats_noise_multiplier=0).stats_sigma


def test_two_stage_statistics_are_closer_to_the_pooled_ones(seed_data):
    """Against the exact pooled mean/std of the training rows (what the public seed project fit),
    with the noise of a real run (σ_s = 4 per client, 131 clients) in 5 draws: the second stage
    cuts the error of the std estimates and of the means."""
    from carbonfed.data.features import STD_FLOOR, Standardizer
    from carbonfed.privacy.stats_release import RefineLayout
    part = split_countries(seed_data.countries())
    arrays = [seed_data.client_arrays(c) for c in part.train]
    xt = transform(np.concatenate([x for x, _ in arrays]))
    mu, sd = xt.mean(0), np.maximum(xt.std(0), STD_FLOOR)
    t = HEParams().plain_modulus
    one = StatsLayout(21, 5, 512, 4.0, t, 256)
    two = RefineLayout(one)
    err = {1: [], 2: []}
    for draw in range(5):
        rng = np.random.default_rng(draw)
        s1 = sum(one.local_sums(x, y) + rng.normal(0, 4.0 * one.sensitivity, 26 + 21) for x, y in arrays)
        first = Standardizer.from_sums(s1, 21, 5)
        s2 = sum(two.local_sums(x, first) + rng.normal(0, 4.0 * two.sensitivity, 42) for x, _ in arrays)
        second = first.refined(s2)
        for k, est in ((1, first), (2, second)):
            err[k].append((np.abs(est.mean - mu) / sd, np.abs(np.log(est.std / sd))))
    mean_err = {k: np.array([m for m, _ in v]) for k, v in err.items()}
    log_ratio = {k: np.array([r for _, r in v]) for k, v in err.items()}
    assert log_ratio[2].mean() < 0.75 * log_ratio[1].mean()
    assert log_ratio[2].max() < log_ratio[1].max()
    assert np.exp(log_ratio[2].max()) < 2.5        # one stage: off by up to 3.6× on these data
    assert mean_err[2].max() < mean_err[1].max()


def _participants(cfg, ds, countries):
    part = split_countries(ds.countries(), cfg.holdout_offset)
    return [Participant(cfg, ds, part, c) for c in countries]


def _release_statistics(cfg, ps) -> list[tuple[bytes, int]]:
    """Every statistics stage of ``ps`` (plaintext twin of the cipher), as the strategy sums them."""
    stats = SecureSum(make_cipher(cfg, None, ps[0].layouts.stats.length))
    for p in ps:
        stats.add(p.setup()["stats"])
    agg = [(stats.serialize(), stats.terms)]
    for k, lay in enumerate(ps[0].layouts.stages[1:], 2):
        total = SecureSum(make_cipher(cfg, None, lay.length))
        for p in ps:
            total.add(p.refine(agg)[stage_key(k)])
        agg.append((total.serialize(), total.terms))
    return agg


def test_client_refuses_round_that_would_exceed_budget(seed_data):
    cfg = RunConfig(privacy="dp", epsilon=2.0, rounds=2, data_dir="", stats_stages=3)
    train = [c for c in seed_data.countries() if split_countries(seed_data.countries()).role(c) == "train"][:3]
    ps = _participants(cfg, seed_data, train)
    stats = _release_statistics(cfg, ps)
    p = ps[0]
    eps = []
    for rnd in (1, 2):
        out = p.train(rnd, None, 0, stats)
        eps.append(out["facts"]["epsilon"])
    assert eps[0] < eps[1] <= cfg.epsilon
    state_before = dict(p.state)
    with pytest.raises(BudgetExceeded, match="refusing to train"):
        p.train(3, None, 0, stats)
    assert p.state == state_before                       # nothing spent by the refusal
    assert p.accountant.epsilon(cfg.delta) == pytest.approx(eps[1])
    with pytest.raises(RuntimeError, match="already released"):
        p.setup()                                         # no second statistics release
    for k in (2, 3):
        with pytest.raises(RuntimeError, match="already released"):
            p.refine(stats[:k - 1])                       # nor a second stage-k release
    with pytest.raises(RuntimeError, match="no statistics stage 4"):
        p.refine(stats)
    # the three statistics stages were charged, each as one unsubsampled Gaussian step, then DP-SGD
    s = cfg.stats_sigma
    assert [tuple(h) for h in p.accountant.history[:3]] == [(s, 1.0, 1)] * 3
    assert sum(h[2] for h in p.accountant.history[3:]) == 2 * planned_mechanism(p.settings)[1]
    with pytest.raises(ValueError, match="makes 3 statistics stages, but only 2"):
        p.evaluate(None, 0, stats[:2])                    # a request without the last stage


def test_client_noise_is_secret_unless_the_run_asks_for_reproducible_noise(seed_data):
    """Two clients with the same country, config and global model: with DP their statistics
    releases and trained updates differ (the noise is keyed from OS entropy, not from the public
    seed); with reproducible-noise they are identical, and without DP too."""
    country = next(c for c in seed_data.countries() if split_countries(seed_data.countries()).role(c) == "train")

    def twice(cfg):
        out = []
        for _ in range(2):
            p, = _participants(cfg, seed_data, [country])
            stats = p.setup()["stats"]
            agg = [(stats, 1)]
            for k in range(2, len(p.layouts.stages) + 1):
                agg.append((p.refine(agg)[stage_key(k)], 1))
            out.append((stats, p.train(1, None, 0, agg)["update"]))
        return out

    (s1, u1), (s2, u2) = twice(RunConfig(privacy="dp", rounds=2, min_train_clients=1))
    assert s1 != s2 and u1 != u2
    for cfg in (RunConfig(privacy="dp", rounds=2, min_train_clients=1, reproducible_noise=True),
                RunConfig(privacy="none", rounds=2, min_train_clients=1)):
        (s1, u1), (s2, u2) = twice(cfg)
        assert s1 == s2 and u1 == u2


def test_initial_model_starts_at_the_released_class_prior(seed_data):
    """Before round 1 every client starts from the same public model: torch's weights for the
    run's seed and the output bias at the centred log class frequencies of the released counts,
    so its predicted class probabilities at zero input are the class prior."""
    from carbonfed.data.features import Standardizer

    part = split_countries(seed_data.countries())
    x, y = seed_data.all_arrays(part.train)
    counts = np.bincount(y, minlength=5).astype(np.float64)
    for hidden in ((), (32, 16)):
        plain, prior = build_model(21, 5, hidden, 0), build_model(21, 5, hidden, 0, class_counts=counts)
        assert np.array_equal(flatten_params(plain)[:-5], flatten_params(prior)[:-5])   # weights untouched
        bias = prior.net[-1].bias.detach().double()
        assert torch.softmax(bias, 0).numpy() == pytest.approx(counts / counts.sum(), rel=1e-5)
        assert float(bias.sum()) == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():      # the linear model at the scaler's mean row predicts the prior
        linear = build_model(21, 5, (), 0, class_counts=counts)
        assert torch.softmax(linear(torch.zeros(1, 21)), 1)[0].numpy() == pytest.approx(counts / counts.sum(), rel=1e-5)
    # a participant's round-1 model is exactly that, from its scaler's released counts
    scaler = Standardizer.exact(x, y, 5)
    p = Participant(RunConfig(privacy="none", hidden="linear"), seed_data, part, part.train[0])
    start = p._global_model(None, 0, scaler)
    assert np.array_equal(flatten_params(start), flatten_params(build_model(21, 5, (), 0, class_counts=scaler.class_counts)))
    assert int(start(torch.zeros(1, 21)).argmax()) == int(np.argmax(counts)) == 0

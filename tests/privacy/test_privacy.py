"""Differential privacy: the accountant, calibration, the budget, clipping, the statistics release."""

import numpy as np
import pytest
import torch

from carbonfed.data import split_countries
from carbonfed.data.features import transform
from carbonfed.privacy.stats_release import StatsLayout
from carbonfed.models.mlp import build_model
from carbonfed.models.params import flatten_params
from carbonfed.privacy.accountant import ClientAccountant, calibrate_noise, epsilon_of, stats_noise_floor
from carbonfed.privacy.dp_sgd import TrainSettings, planned_mechanism, train_local
from carbonfed.privacy.randomness import NoiseSource
from carbonfed.privacy.he import HEParams

# σ_s of the seed main job (ε = 3, δ = 1e-5, three statistics releases): 4, or more where the
# releases would otherwise spend more than half of ε (RunConfig.stats_sigma)
MAIN_JOB_STATS_SIGMA = max(4.0, stats_noise_floor(3.0, 1e-5, 3))


def test_accountant_state_round_trip_and_monotone():
    acc = ClientAccountant()
    acc.add(4.0, 1.0, 1)
    e0 = acc.epsilon(1e-5)
    acc.add(1.2, 0.2, 5)
    e1 = acc.epsilon(1e-5)
    acc.add(1.2, 0.2, 5)
    e2 = acc.epsilon(1e-5)
    assert 0 < e0 < e1 < e2
    again = ClientAccountant.from_state(acc.state_dict())
    assert again.history == acc.history and again.epsilon(1e-5) == e2
    assert acc.epsilon_after(1.2, 0.2, 5, 1e-5) > e2
    with pytest.raises(ValueError):
        ClientAccountant.from_state({"noise_multiplier": [1.0], "sample_rate": [], "steps": [1]})


def test_calibration_reaches_but_does_not_exceed_target():
    prior = [(4.0, 1.0, 1)]
    sigma = calibrate_noise(3.0, 1e-5, 0.2, 150, prior=prior)
    eps = epsilon_of(prior + [(sigma, 0.2, 150)], 1e-5)
    assert eps <= 3.0
    assert epsilon_of(prior + [(sigma - 0.01, 0.2, 150)], 1e-5) > 3.0 - 0.05  # tight, not wasteful
    with pytest.raises(ValueError, match="prior"):
        calibrate_noise(0.1, 1e-5, 0.2, 150, prior=[(0.5, 1.0, 1)])


def test_opacus_clips_per_sample_gradients(seed_data):
    x, y = seed_data.client_arrays("France")
    model = build_model(21, 5)
    before = flatten_params(model)
    s = TrainSettings(lr=1.0, momentum=0.0, batches_per_epoch=8, max_grad_norm=0.01, noise_multiplier=1e-6)
    out = train_local(model, transform(x).astype(np.float32), y, s, NoiseSource.derived(0))
    assert (out.sample_rate, out.steps) == planned_mechanism(s) == (1 / 8, 16)
    # a step moves the weights by lr * (sum of clipped grads) / (n q): at most C * (batch / (n q))
    moved = np.linalg.norm(flatten_params(model) - before)
    assert 0 < moved <= out.steps * 0.01 * 3
    # without clipping the same training moves much further
    free = build_model(21, 5)
    train_local(free, transform(x).astype(np.float32), y, TrainSettings(lr=1.0, momentum=0.0, batches_per_epoch=8),
                NoiseSource.derived(0))
    assert np.linalg.norm(flatten_params(free) - before) > 10 * moved


def test_empty_poisson_batches_are_noise_only_steps(seed_data):
    """A client with fewer rows than batches often draws an empty Poisson batch: that step still
    runs (noise only, as the accountant assumes) instead of failing inside Opacus."""
    x, y = seed_data.client_arrays("France")
    x, y = transform(x[:3]).astype(np.float32), y[:3]
    model = build_model(21, 5)
    before = flatten_params(model)
    s = TrainSettings(lr=0.1, momentum=0.0, batches_per_epoch=20, max_grad_norm=1.0, noise_multiplier=1.0)
    out = train_local(model, x, y, s, NoiseSource.derived(0))   # P(empty batch) = 0.95³ ≈ 0.86 per step
    assert (out.sample_rate, out.steps) == planned_mechanism(s) == (1 / 20, 40)
    after = flatten_params(model)
    assert np.all(np.isfinite(after)) and np.linalg.norm(after - before) > 0


def test_noise_source_draws_hardened_gaussians_and_poisson_masks():
    """Against scipy's normal CDF and the binomial: the hardened draws (sum of four / 2) are
    N(0, std²), the masks keep each row with the rate; derived keys repeat, OS-entropy keys do not."""
    from randomgen import ChaCha
    from scipy import stats

    src = NoiseSource.derived(0, "test")
    assert isinstance(src.generator.bit_generator, ChaCha) and not src.secret
    draws = src.normal(2.5, (40_000,))
    assert stats.kstest(draws / 2.5, "norm").pvalue > 1e-3
    assert abs(draws.std() / 2.5 - 1) < 0.03
    mask = src.poisson_mask(100_000, 0.2)
    assert stats.binomtest(int(mask.sum()), 100_000, 0.2).pvalue > 1e-3
    assert np.array_equal(NoiseSource.derived(0, "test").normal(1.0, (8,)), NoiseSource.derived(0, "test").normal(1.0, (8,)))
    a, b = NoiseSource.from_os_entropy(), NoiseSource.from_os_entropy()
    assert a.secret and not np.array_equal(a.normal(1.0, (8,)), b.normal(1.0, (8,)))
    assert np.array_equal(src.normal(0.0, (3,)), np.zeros(3))


def test_dp_sgd_noise_comes_from_the_noise_source_with_the_calibrated_std(seed_data):
    """One DP-SGD step (lr 1, no momentum) with σ = 1000: the clipped gradients (≤ C each) are
    negligible, so the step is −noise / (n·q), noise ~ N(0, (σC)²) per parameter. Checked against
    the normal CDF; torch's own generator (reseeded differently) changes nothing, the source does."""
    from scipy import stats

    x, y = seed_data.client_arrays("France")
    x = transform(x).astype(np.float32)
    s = TrainSettings(lr=1.0, momentum=0.0, local_epochs=1, batches_per_epoch=1, max_grad_norm=1.0,
                      noise_multiplier=1000.0)
    steps = []
    for torch_seed, key in ((1, "a"), (2, "a"), (1, "b")):
        torch.manual_seed(torch_seed)
        model = build_model(21, 5, (), seed=0)
        before = flatten_params(model)
        train_local(model, x, y, s, NoiseSource.derived(key))
        steps.append(flatten_params(model) - before)
    assert np.allclose(steps[0], steps[1]) and not np.allclose(steps[0], steps[2])
    z = -steps[0] * len(x) / (s.noise_multiplier * s.max_grad_norm)   # n·q = n rows at q = 1
    assert len(z) == 110 and stats.kstest(z, "norm").pvalue > 1e-3


def test_stats_release_sensitivity_bound(seed_data):
    x, y = seed_data.client_arrays("China")
    layout = StatsLayout(21, 5, 512, 4.0, HEParams().plain_modulus, 256)
    full = layout.local_sums(x, y)
    for i in range(len(x)):
        without = layout.local_sums(np.delete(x, i, axis=0), np.delete(y, i))
        assert np.linalg.norm(full - without) <= layout.sensitivity + 1e-9


@pytest.mark.parametrize("stage, country, clip", [(2, "China", "REFINE_CLIP"), (3, "Qatar", "ASINH_CLIP")])
def test_later_stage_sensitivity_bound(seed_data, stage, country, clip):
    """Removing any one of a country's rows moves its stage-2 (stage-3) sums by at most the
    layout's sensitivity, REFINE_CLIP (ASINH_CLIP), whatever the previous stage's scaler."""
    import carbonfed.privacy.stats_release as S
    x, y = seed_data.client_arrays(country)
    xt = transform(x)
    prev = S.Standardizer(mean=xt.mean(0) * 0.8, std=xt.std(0) * 1.3, class_counts=np.ones(5))
    layout = (S.RefineLayout, S.AsinhLayout)[stage - 2](StatsLayout(21, 5, 512, 4.0, HEParams().plain_modulus, 256))
    assert layout.sensitivity == getattr(S, clip) == 20
    full = layout.local_sums(x, prev)
    for i in range(len(x)):
        assert np.linalg.norm(full - layout.local_sums(np.delete(x, i, axis=0), prev)) <= layout.sensitivity + 1e-9


def test_third_stage_measures_the_asinh_features_of_the_pooled_rows(seed_data):
    """Stage 3 against an independent numpy computation on the pooled training rows, from the
    formulas of the docstring: c = expm1(10·(|m₂| + 3.5·s₂)) of the stage-2 scaler; z =
    clip((asinh(x / c) − 0.15) / 0.2, ±10); each row's (z, z²) clipped to L2 norm 20; mean
    0.15 + 0.2·mean(z), std 0.2·std(z). Without noise the scaler is exactly that. With the noise
    of the default ε = 3 run (σ_s per client, 131 clients, 5 draws) the model's inputs, on the
    pooled rows, have a std within a factor 3 of 1 (median within 1.5) and a mean within 1, except
    at most one feature whose noisy c lies so far above its tail (co2_including_luc: c up to 27×
    its 99th percentile) that its std, floored (at 0.093 here), is over-stated: that input's std is
    then 0.05–1/3."""
    from carbonfed.data.features import Standardizer
    from carbonfed.privacy.stats_release import AsinhLayout, RefineLayout
    part = split_countries(seed_data.countries())
    arrays = [seed_data.client_arrays(c) for c in part.train]
    x = np.concatenate([a for a, _ in arrays])
    for noise in (0.0, MAIN_JOB_STATS_SIGMA):
        one = StatsLayout(21, 5, 512, noise, HEParams().plain_modulus, 256)
        for draw in range(1 if noise == 0 else 5):
            rng = np.random.default_rng(draw)
            s = sum(one.local_sums(a, b) + rng.normal(0, noise * one.sensitivity, 26 + 21) for a, b in arrays)
            scaler = Standardizer.from_sums(s, 21, 5)
            for lay in (RefineLayout(one), AsinhLayout(one)):
                s = sum(lay.local_sums(a, scaler) + rng.normal(0, noise * lay.sensitivity, 42) for a, _ in arrays)
                prev, scaler = scaler, lay.scaler_from_sums(s, scaler, len(arrays))
            c = np.expm1(10 * (np.abs(prev.mean) + 3.5 * prev.std))
            assert np.allclose(scaler.scale, c)
            inputs = scaler.apply(x)
            if noise == 0:
                z = np.clip((np.arcsinh(x / c) - 0.15) / 0.2, -10, 10)
                r = np.hstack([z, z ** 2])
                r *= np.minimum(1, 20 / np.linalg.norm(r, axis=1, keepdims=True))
                mz = r[:, :21].mean(0)
                assert np.allclose(scaler.mean, 0.15 + 0.2 * mz)
                assert np.allclose(scaler.std, np.maximum(0.2 * np.sqrt(r[:, 21:].mean(0) - mz ** 2), 0.05))
                assert np.allclose(inputs, (np.arcsinh(x / c) - scaler.mean) / scaler.std, atol=1e-5)
            sd = inputs.std(0)
            assert np.all((sd > 0.05) & (sd < 3)) and ((sd < 1 / 3).sum() <= 1) and 1 / 1.5 < np.median(sd) < 1.5, sd
            assert np.all(np.abs(inputs.mean(0)) < 1)


def test_third_stage_variance_floor_is_two_noise_sds(seed_data):
    """Stage 3 floors each variance at 2 standard deviations of the noise that the release puts on
    its second-moment term ASINH_UNIT²·Σz²/n (at least 0.05²): against a Monte-Carlo of the
    estimator on the seed training clients' exact sums with the main job's noise (σ_s per client,
    131 clients). With noise on Σz² alone the spread of the variance estimate is the formula
    ASINH_UNIT²·σ_s·clip·√terms / n; the noise on Σz adds to it. Exact statistics keep 0.05."""
    from carbonfed.data.features import Standardizer
    from carbonfed.privacy.stats_release import AsinhLayout, RefineLayout
    part = split_countries(seed_data.countries())
    arrays = [seed_data.client_arrays(c) for c in part.train]
    sigma = MAIN_JOB_STATS_SIGMA
    one = StatsLayout(21, 5, 512, sigma, HEParams().plain_modulus, 256)
    scaler = Standardizer.from_sums(sum(one.local_sums(a, b) for a, b in arrays), 21, 5)
    scaler = RefineLayout(one).scaler_from_sums(sum(RefineLayout(one).local_sums(a, scaler) for a, _ in arrays),
                                                scaler, len(arrays))
    lay = AsinhLayout(one)
    exact = sum(lay.local_sums(a, scaler) for a, _ in arrays)
    rng = np.random.default_rng(0)
    draws = exact + rng.normal(0, sigma * lay.sensitivity * np.sqrt(len(arrays)), (2000, 42))
    n = scaler.count

    def variance(sums):
        return 0.2 ** 2 * (sums[:, 21:] / n - (sums[:, :21] / n) ** 2)
    noise_sd = 0.2 ** 2 * sigma * 20 * np.sqrt(len(arrays)) / n
    second_only = np.concatenate([np.broadcast_to(exact[:21], (2000, 21)), draws[:, 21:]], axis=1)
    assert np.allclose(variance(second_only).std(axis=0), noise_sd, rtol=0.1)
    assert np.all(variance(draws).std(axis=0) > 0.9 * noise_sd)
    assert lay.var_floor(len(arrays), n) == pytest.approx(2 * noise_sd)
    assert 0.09 < np.sqrt(lay.var_floor(len(arrays), n)) < 0.095            # the main job's std floor
    noisy = lay.scaler_from_sums(draws[0], scaler, len(arrays))
    assert noisy.floor == pytest.approx(np.sqrt(2 * noise_sd)) and noisy.std.min() >= noisy.floor
    assert Standardizer.from_dict(noisy.to_dict()).floor == noisy.floor
    exact_lay = AsinhLayout(StatsLayout(21, 5, 512, 0.0, HEParams().plain_modulus, 256))
    assert exact_lay.scaler_from_sums(exact, scaler, len(arrays)).floor == 0.05


def test_exact_asinh_scaler_standardises_the_pooled_rows(seed_data):
    """The centralized reference's scaler (no noise, no clipping): c from the exact log mean/std,
    then the pooled rows' own mean and std of asinh(x / c): inputs of mean 0 and std 1."""
    from carbonfed.data.features import Standardizer
    x, y = seed_data.all_arrays(split_countries(seed_data.countries()).train)
    xt = transform(x)
    exact = Standardizer.exact(x, y, 5, asinh=True)
    assert np.allclose(exact.scale, np.expm1(10 * (np.abs(xt.mean(0)) + 3.5 * np.maximum(xt.std(0), 0.02))))
    z, u = exact.apply(x), np.arcsinh(x / exact.scale)
    kept = u.std(0) > 0.05            # ASINH_STD_FLOOR: co2_including_luc's c lies far above its tail
    assert kept.sum() >= 19 and np.allclose(z.mean(0), 0, atol=1e-4) and np.allclose(z.std(0)[kept], 1, atol=1e-3)
    log = Standardizer.exact(x, y, 5)
    above = xt.std(0) > 0.02          # the std floor (STD_FLOOR) holds for two features here
    assert above.sum() == 19 and np.allclose(log.apply(x).std(0)[above], 1, atol=1e-3)

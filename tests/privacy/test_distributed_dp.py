"""Distributed DP (``ddp+he``): Skellam shares summed under real BFV, randomized rounding, the
Skellam accountant, its independent recomputation, the noise floor and the wrap bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.rdp import RdpAccountant

from carbonfed.data.features import Standardizer
from carbonfed.privacy.audit.ddp_epsilon import numeric_skellam_rdp, recompute_epsilon
from carbonfed.privacy.audit.ddp_verify import KEYS, extends
from carbonfed.privacy.distributed_dp import (DDPAccountant, DDPPlan, NoiseFloorError, calibrate, contribution, may_release,
                                              plan, release, spent, upload_epsilon)
from carbonfed.privacy.fixed_point import WrapError
from carbonfed.privacy.he import BFVCipher, HEParams, new_secret_context
from carbonfed.privacy.quantize import conditional_round, l1_bound, rounded_l2_bound, skellam_tail
from carbonfed.privacy.randomness import NoiseSource
from carbonfed.privacy.skellam import ORDERS, Release, epsilon_of, skellam_rdp, skellam_share, subsampled_rdp

T = HEParams().plain_modulus
DELTA = 1e-5


def _plan(min_clients=40, max_clients=60, q=1.0, rounds=30, dim=110, epsilon=3.0) -> DDPPlan:
    return plan(epsilon, DELTA, rounds, q, 1.0, dim, min_clients, max_clients, max_clients * 512, T)


def _bfv_sum(vectors: list[np.ndarray]) -> np.ndarray:
    """Encrypt each vector under one fresh key, add the ciphertexts, decrypt the sum only."""
    cipher = BFVCipher(new_secret_context(HEParams()), len(vectors[0]))
    total = cipher.load(cipher.encrypt(vectors[0]))
    for v in vectors[1:]:
        total += cipher.load(cipher.encrypt(v))
    return np.asarray(total.decrypt(), dtype=np.int64)


def _variance_matches(sample: np.ndarray, expected: float, sds: float = 4.0) -> bool:
    """Sample variance within ``sds`` standard errors (√(2/N), near-normal data) of ``expected``."""
    n = sample.size
    return abs(float(np.var(sample)) / expected - 1) <= sds * math.sqrt(2 / n)


def _share_sum(p: DDPPlan, clients: int, factor: float, length: int, tag: str) -> np.ndarray:
    shares = [skellam_share(NoiseSource.derived(tag, i), factor * p.share_variance, length) for i in range(clients)]
    return _bfv_sum(shares)


def test_decrypted_sum_of_shares_has_the_variance_the_accountant_assumed():
    """40 clients' shares, summed under BFV and decrypted: Sk(V) with the calibrated V (16,384
    coordinates: standard error 1.1 % of V); shares drawn 10 % too small or too large fail."""
    p = _plan(min_clients=40)
    agg = _share_sum(p, 40, 1.0, 4 * 4096, "share")
    assert agg.dtype == np.int64 and abs(agg.mean()) < 4 * math.sqrt(p.central_variance / agg.size)
    assert _variance_matches(agg, p.central_variance)
    for factor in (0.9, 1.1):
        assert not _variance_matches(_share_sum(p, 40, factor, 4 * 4096, f"off{factor}"), p.central_variance)


def test_shares_come_only_from_the_chacha_source():
    with pytest.raises(TypeError, match="NoiseSource"):
        skellam_share(np.random.default_rng(0), 10.0, 5)
    with pytest.raises(TypeError, match="NoiseSource"):
        conditional_round(np.zeros((1, 3)), 10.0, np.random.default_rng(0))
    a, b = (skellam_share(NoiseSource.derived("same"), 1e6, 8) for _ in range(2))
    assert np.array_equal(a, b) and not np.array_equal(a, skellam_share(NoiseSource.derived("other"), 1e6, 8))


def _seed_gradients(seed_data, countries, dim_classes=5):
    """Per-example gradients of the zero linear model on real seed rows, per country."""
    out = []
    for c in countries:
        x, y = seed_data.client_arrays(c)
        xb = np.concatenate([Standardizer.exact(x, y, dim_classes).apply(x), np.ones((len(x), 1))], 1)
        e = np.full((len(y), dim_classes), 1 / dim_classes)
        e[np.arange(len(y)), y] -= 1
        out.append((xb[:, :, None] * e[:, None, :]).reshape(len(y), -1))
    return out


def test_sums_of_quantized_uploads_are_exact_and_decode_to_the_gradient_sum(seed_data):
    countries = seed_data.countries()[:12]
    grads = _seed_gradients(seed_data, countries)
    p = _plan(min_clients=10, max_clients=12, dim=grads[0].shape[1])
    uploads = [contribution(p, g, NoiseSource.derived("upload", i)) for i, g in enumerate(grads)]
    agg = _bfv_sum(uploads)
    assert np.array_equal(agg, np.sum(uploads, axis=0))          # exact, no wrap
    noisy = release(p, agg, len(uploads))
    g_all = np.concatenate(grads)
    exact = (g_all * np.minimum(1.0, 1.0 / np.linalg.norm(g_all, axis=1))[:, None]).sum(axis=0)
    # the only differences: the Skellam noise (std √V'/s) and the rounding (≤ 1/s per row and coordinate)
    std = math.sqrt(p.share_variance * len(uploads)) / p.scale
    assert np.all(np.abs(noisy - exact) < 6 * std + sum(len(g) for g in grads) / p.scale)


def test_conditional_rounding_is_unbiased_and_always_within_the_bound():
    """Every row within the bound and the L1 bound, each entry rounded to a neighbouring integer;
    at the norms used (C·s ≫ √d) the redraws bias a row by a few 1e-4 of its norm at most."""
    src = NoiseSource.derived("round")
    small = np.array([[0.3, -1.7, 2.5, 0.0, 7.25]] * 2000)     # C·s ≈ √d: many redraws
    bound = rounded_l2_bound(float(np.linalg.norm(small[0])), 5)
    r = conditional_round(small, bound, src)
    assert r.dtype == np.int64 and np.all(np.linalg.norm(r, axis=1) <= bound)
    assert np.all(np.abs(r - small) < 1) and np.all(np.abs(r).sum(axis=1) <= l1_bound(bound, 5))
    y = NoiseSource.derived("direction").generator.standard_normal(110)
    y = np.tile(1000 * y / np.linalg.norm(y), (4000, 1))
    bound = rounded_l2_bound(1000.0, 110)
    r = conditional_round(y, bound, src)
    assert np.all(np.linalg.norm(r, axis=1) <= bound) and bound < 1000.6
    assert np.linalg.norm(r.mean(axis=0) - y[0]) < 0.3
    with pytest.raises(ValueError, match="clip"):
        conditional_round(np.array([[100.0, 0.5]]), 10.0, src)


@pytest.mark.parametrize("q, rounds, epsilon", [(1.0, 30, 3.0), (1.0, 100, 1.0), (0.3, 60, 3.0)])
def test_calibration_hits_the_target_and_the_independent_recomputation_agrees(q, rounds, epsilon):
    prior = (Release(2.0e8, 1450.0, 2900.0),)    # a statistics release before training
    cal = calibrate(epsilon, DELTA, rounds, q, 1.0, 1024.0, 50, 110, prior=prior)
    assert 0.99 * epsilon <= cal.epsilon <= epsilon
    l2 = rounded_l2_bound(1024.0, 110)
    history = list(prior) + [Release(cal.central_variance, l2, l1_bound(l2, 110), q, rounds)]
    assert epsilon_of(history, DELTA) == pytest.approx(cal.epsilon)
    again = recompute_epsilon([r.to_dict() for r in history], DELTA)
    assert again == pytest.approx(cal.epsilon, rel=0.01)
    # less noise than calibrated spends more than the target, by both accountants
    less = history[:-1] + [Release(0.9 * cal.central_variance, l2, l1_bound(l2, 110), q, rounds)]
    assert epsilon_of(less, DELTA) > epsilon and recompute_epsilon([r.to_dict() for r in less], DELTA) > epsilon


def test_the_accountant_counts_a_repeated_release_in_one_entry_and_verify_reads_it_as_grown():
    """A client's history holds one entry per run of identical releases (the steps counted there),
    so a 50-round history is three entries, not 53; ε is that of the releases one by one, by
    both accountants; along the statements, verify accepts the entry's steps growing, and
    refuses steps that fall or a mechanism changed behind the last entry."""
    stats = [Release(8.4e8, 1449.0, 10037.0), Release(1.05e10, 5121.0, 33577.0), Release(1.05e10, 5121.0, 33577.0)]
    train = Release(7.7e9, 8193.0, 85924.0, 0.9)
    acc, seen = DDPAccountant(), []
    for r in stats + [train] * 50:
        acc.add(r)
        seen.append([dict(zip(KEYS, m)) for m in acc.history])
    assert [m[-1] for m in acc.history] == [1, 2, 50] and acc.total_steps() == 53
    one_by_one = epsilon_of(stats + [train] * 50, DELTA)
    assert acc.epsilon(DELTA) == pytest.approx(one_by_one, rel=1e-12)
    assert recompute_epsilon([dict(zip(KEYS, m)) for m in acc.history], DELTA) == pytest.approx(one_by_one, rel=0.01)
    assert DDPAccountant.from_state(acc.state_dict()).history == acc.history
    assert all(extends(later, earlier) for earlier, later in zip(seen, seen[1:]))
    assert extends(seen[-1], seen[10]) and not extends(seen[10], seen[-1])          # steps never fall
    changed = [dict(m) for m in seen[-1]]
    changed[1]["variance"] *= 0.5
    assert not extends(changed, seen[10])                                         # an earlier entry rewritten


def test_closed_form_bounds_the_exact_renyi_divergence_of_the_skellam():
    """Theorem 3.5 (variance V per coordinate) is an upper bound on the Rényi divergence of a
    shifted Skellam computed from its mass function, and tends to the Gaussian's for large V."""
    for v in (2.0, 10.0, 200.0):
        for shift in (1, 3):
            for alpha in (2, 8, 32):
                exact = numeric_skellam_rdp(alpha, v, shift)
                bound = float(skellam_rdp(alpha, v, shift, shift))
                assert exact <= bound
    exact = numeric_skellam_rdp(8, 1e4, 100)
    assert exact <= float(skellam_rdp(8, 1e4, 100, 100)) and exact == pytest.approx(8 * 100 ** 2 / (2 * 1e4), rel=5e-3)


def test_a_round_below_the_noise_floor_is_not_released():
    p = _plan(min_clients=40)
    assert may_release(40, 40) and may_release(55, 40) and not may_release(39, 40) and not may_release(0, 0)
    with pytest.raises(NoiseFloorError):
        release(p, np.zeros(p.dim, dtype=np.int64), 39)
    with pytest.raises(NoiseFloorError):
        spent(p, [40, 39], DELTA)
    # each released round is accounted at the noise it carried: more contributors, less ε
    assert spent(p, [60] * p.rounds, DELTA) < spent(p, [40] * p.rounds, DELTA) == pytest.approx(p.epsilon(DELTA))
    contributors = [40, 47, 60] * 10      # what a ledger records; verify re-accounts it independently
    ledger = [r.to_dict() for r in list(p.prior) + [p.round_release(n) for n in contributors]]
    assert recompute_epsilon(ledger, DELTA) == pytest.approx(spent(p, contributors, DELTA), rel=0.01)


def test_scale_keeps_the_wrap_probability_negligible_and_implausible_sums_are_refused():
    p = _plan(min_clients=40, max_clients=60)
    assert p.wrap_probability <= 1e-12
    assert p.max_rows * p.coord_bound + 40 * math.sqrt(p.share_variance * p.max_clients) < T // 2
    with pytest.raises(WrapError):
        release(p, np.full(p.dim, T // 2 - 1, dtype=np.int64), 50)
    with pytest.raises(ValueError, match="too small"):
        plan(3.0, DELTA, 30, 1.0, 1.0, 110, 40, 60, 10 ** 9, T)
    # the tail bound holds for real draws
    z = skellam_share(NoiseSource.derived("tail"), 1e4, 200_000)
    for a in (200, 300, 400):
        assert np.mean(np.abs(z) >= a) <= skellam_tail(a, 1e4)


def test_per_upload_guarantee_is_that_of_one_share():
    p = _plan(min_clients=40)
    one = upload_epsilon(p, 1, DELTA)
    assert one > p.epsilon(DELTA)                          # one share is far less noise than the sum
    assert upload_epsilon(p, p.rounds, DELTA) > one
    direct = epsilon_of([Release(p.central_variance / 40, p.l2, p.l1, p.sample_rate, 1)], DELTA)
    assert one == pytest.approx(direct)


@pytest.mark.parametrize("sigma, q", [(1.0, 0.05), (2.0, 0.3)])
def test_subsampling_bound_lies_within_log3_of_the_exact_gaussian(sigma, q):
    """Zhu–Wang's general bound, fed the Gaussian's ε(α) = α/(2σ²), is at least the exact RDP of
    the subsampled Gaussian (dp_accounting) and at most log(3)/(α − 1) above it (their Theorem)."""
    base = np.array([a / (2 * sigma ** 2) for a in range(ORDERS[-1] + 1)])
    ours = subsampled_rdp(q, base)
    acc = RdpAccountant(list(ORDERS))
    acc.compose(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)))
    exact = np.asarray(acc.rdp)
    alphas = np.asarray(ORDERS, dtype=float)
    assert np.all(ours >= exact - 1e-9) and np.all(ours <= exact + np.log(3) / (alphas - 1) + 1e-9)

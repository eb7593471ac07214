"""Differential privacy: the accountant, calibration, the budget, clipping, the statistics release."""

import math

import numpy as np
import pytest
import torch

from data import split_countries
from data.standardize import StatsLayout, transform
from federation.config import RunConfig
from federation.participant import BudgetExceeded, Participant, make_cipher
from models.mlp import build_model
from models.params import flatten_params
from privacy.accountant import ClientAccountant, calibrate_noise, epsilon_of
from privacy.dp_sgd import TrainSettings, planned_mechanism, train_local
from privacy.he import HEParams
from privacy.secure_sum import SecureSum


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
    out = train_local(model, transform(x).astype(np.float32), y, s, seed=0)
    assert (out.sample_rate, out.steps) == planned_mechanism(s) == (1 / 8, 16)
    # a step moves the weights by lr * (sum of clipped grads) / (n q): at most C * (batch / (n q))
    moved = np.linalg.norm(flatten_params(model) - before)
    assert 0 < moved <= out.steps * 0.01 * 3
    # without clipping the same training moves much further
    free = build_model(21, 5)
    train_local(free, transform(x).astype(np.float32), y, TrainSettings(lr=1.0, momentum=0.0, batches_per_epoch=8), seed=0)
    assert np.linalg.norm(flatten_params(free) - before) > 10 * moved


def test_empty_poisson_batches_are_noise_only_steps(seed_data):
    """A client with fewer rows than batches often draws an empty Poisson batch: that step still
    runs (noise only, as the accountant assumes) instead of failing inside Opacus."""
    x, y = seed_data.client_arrays("France")
    x, y = transform(x[:3]).astype(np.float32), y[:3]
    model = build_model(21, 5)
    before = flatten_params(model)
    s = TrainSettings(lr=0.1, momentum=0.0, batches_per_epoch=20, max_grad_norm=1.0, noise_multiplier=1.0)
    out = train_local(model, x, y, s, seed=0)   # P(empty batch) = 0.95³ ≈ 0.86 per step
    assert (out.sample_rate, out.steps) == planned_mechanism(s) == (1 / 20, 40)
    after = flatten_params(model)
    assert np.all(np.isfinite(after)) and np.linalg.norm(after - before) > 0


def test_stats_release_sensitivity_bound(seed_data):
    x, y = seed_data.client_arrays("China")
    layout = StatsLayout(21, 5, 512, 4.0, HEParams().plain_modulus, 256)
    full = layout.local_sums(x, y)
    for i in range(len(x)):
        without = layout.local_sums(np.delete(x, i, axis=0), np.delete(y, i))
        assert np.linalg.norm(full - without) <= layout.sensitivity + 1e-9


def _participants(cfg, ds, countries):
    part = split_countries(ds.countries(), cfg.holdout_offset)
    return [Participant(cfg, ds, part, c) for c in countries]


def test_client_refuses_round_that_would_exceed_budget(seed_data):
    cfg = RunConfig(privacy="dp", epsilon=2.0, rounds=2, data_dir="")
    train = [c for c in seed_data.countries() if split_countries(seed_data.countries()).role(c) == "train"][:3]
    ps = _participants(cfg, seed_data, train)
    stats = SecureSum(make_cipher(cfg, None, ps[0].layouts.stats.length))
    for p in ps:
        stats.add(p.setup()["stats"])
    p = ps[0]
    eps = []
    for rnd in (1, 2):
        out = p.train(rnd, None, 0, stats.serialize(), stats.terms)
        eps.append(out["facts"]["epsilon"])
    assert eps[0] < eps[1] <= cfg.epsilon
    state_before = dict(p.state)
    with pytest.raises(BudgetExceeded, match="refusing to train"):
        p.train(3, None, 0, stats.serialize(), stats.terms)
    assert p.state == state_before                       # nothing spent by the refusal
    assert p.accountant.epsilon(cfg.delta) == pytest.approx(eps[1])
    with pytest.raises(RuntimeError, match="already released"):
        p.setup()                                         # no second statistics release

"""The white-box audit's scoring (federation/experiments/audit_whitebox.py) on uploads made by the
real DP-SGD (Opacus), the real packing and the plaintext cipher, without noise: the auditor
recovers exactly which canaries were included, and the bound is the closed-form one."""

import math

import numpy as np
import pytest

from carbonfed.federation.client.participant import Layouts, make_cipher
from carbonfed.federation.config import RunConfig
from carbonfed.federation.experiments.audit_whitebox import FRACTIONS, canary_scores, decode_upload, plan_canaries
from carbonfed.models.mlp import build_model
from carbonfed.models.params import flatten_params, load_flat_params
from carbonfed.privacy.audit.empirical import canary_bound
from carbonfed.privacy.canary_grad import ClientCanaries
from carbonfed.privacy.dp_sgd import TrainSettings, train_local
from carbonfed.privacy.randomness import NoiseSource

K, F = 5, 21


def _uploads(plan, cfg, layouts, rows):
    """Every client trains cfg.rounds rounds with its canaries and no noise; uploads captured."""
    for country, (x, y) in rows.items():
        flat = flatten_params(build_model(F, K, cfg.hidden_sizes, cfg.seed))
        for rnd in range(1, cfg.rounds + 1):
            model = build_model(F, K, cfg.hidden_sizes, cfg.seed)      # a fresh module per round, as a client
            load_flat_params(model, flat)
            canaries = ClientCanaries(plan, country, rnd)
            canaries.rng = np.random.default_rng([rnd, len(y)])       # the canaries' draws, fixed for the test
            settings = TrainSettings(lr=cfg.lr, noise_multiplier=1.0, batches_per_epoch=cfg.batches_per_epoch)
            train_local(model, x, y, settings, NoiseSource.derived(0, country, rnd), canaries)
            flat = flatten_params(model)
            vec, _ = layouts.update.pack(flat, len(y), np.random.default_rng(rnd))
            canaries.capture(make_cipher(cfg, None, len(vec)).encrypt(vec))


def test_noise_free_uploads_reveal_exactly_the_included_canaries(tmp_path):
    # q = 1 (one batch per epoch): every canary joins every step, so a canary's count is fixed
    cfg = RunConfig(privacy="dp", rounds=3, batches_per_epoch=1)
    layouts = Layouts.for_run(cfg, F, K)
    rng = np.random.default_rng(0)
    rows = {c: (rng.normal(size=(n, F)).astype(np.float32), rng.integers(0, K, size=n))
            for c, n in (("A", 40), ("B", 90), ("C", 7))}
    plan = plan_canaries(cfg, list(rows), 45, rng, str(tmp_path / "run"), str(tmp_path / "cap"), noise_scale=0.0)
    assert sorted(plan.client_order) == ["A", "B", "C"] and len(plan.clients) == 45
    _uploads(plan, cfg, layouts, rows)
    scores, read = canary_scores(plan, cfg, F, K, None)
    assert read == 3 * cfg.rounds
    inc = np.asarray(plan.included)
    reg = scores["regression"]
    # the real data move nothing in the canary subspace: an excluded canary's fit is 0 (up to the
    # fixed-point rounding), an included one's is its momentum-weighted count per round
    steps = cfg.local_epochs * cfg.batches_per_epoch
    weighted = sum(sum(cfg.momentum ** j for j in range(steps - t)) for t in range(steps))
    np.testing.assert_allclose(reg, np.where(inc, weighted, 0.0), atol=0.1)
    res = canary_bound(scores, inc, confidence=0.95, delta=0.0, fractions=FRACTIONS, rng=rng)
    r = res["guesses"]
    assert res["correct"] == r == 2 * max(k for k in (round(f * 45) for f in FRACTIONS) if 2 * k <= 45)
    # all r guesses right: P[Bin(r, p) = r] = p^r = (1 - confidence) / tests  =>  ε = log(p / (1 - p))
    p = (0.05 / res["tests"]) ** (1 / r)
    assert res["epsilon_lower_bound"] == pytest.approx(math.log(p / (1 - p)), abs=1e-5)


def test_decode_reads_a_tagged_upload(tmp_path):
    cfg = RunConfig(privacy="dp", rounds=1)
    layouts = Layouts.for_run(cfg, F, K)
    params = np.random.default_rng(1).normal(size=layouts.update.n_params)
    vec, _ = layouts.update.pack(params, 33, np.random.default_rng(2))
    vec[::4096] = 123456                        # a client's tag in the check slots
    got, count = decode_upload(make_cipher(cfg, None, len(vec)).decrypt(make_cipher(cfg, None, len(vec)).encrypt(vec)),
                               layouts)
    assert count == 33
    np.testing.assert_allclose(got, params, atol=layouts.update.max_client_samples / 33 / layouts.update.codec.scale)
    with pytest.raises(ValueError, match="row count"):
        decode_upload(np.zeros_like(vec), layouts)


def test_canaries_go_to_clients_without_a_fault_drill(tmp_path):
    cfg = RunConfig(privacy="dp", rounds=1, fault_drill="A:nan")
    plan = plan_canaries(cfg, ["A", "B", "C"], 1000, np.random.default_rng(0), "o", "c")
    assert set(plan.clients) == {"B", "C"} and len(plan.clients) == 400          # capped per client
    assert abs(sum(plan.included) - 200) < 50

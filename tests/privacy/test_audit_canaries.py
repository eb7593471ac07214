"""Gradient canaries (privacy/canary_grad.py) in real Opacus DP-SGD (privacy/dp_sgd.py): the real
data move nothing in the canary subspace, a canary's gradient has norm C and lies in it, the
hook is off without a plan, and a plan is honoured only in its own run."""

import numpy as np
import pytest

from carbonfed.models.mlp import build_model
from carbonfed.models.params import flatten_params
from carbonfed.privacy import canary_grad
from carbonfed.privacy.canary_grad import (ENV_VAR, NO_CANARIES, CanaryPlan, ClientCanaries, audit_canaries,
                                           null_projection, round_directions)
from carbonfed.privacy.dp_sgd import TrainSettings, train_local
from carbonfed.privacy.randomness import NoiseSource

K, F = 5, 21


def _plan(tmp_path, included, noise_scale=1.0, clients=None) -> CanaryPlan:
    clients = clients or ("A",) * len(included)
    return CanaryPlan(seed=7, clients=tuple(clients), included=tuple(included), out_dir=str(tmp_path / "run"),
                      capture_dir=str(tmp_path / "cap"), noise_scale=noise_scale)


def _data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, F)).astype(np.float32), rng.integers(0, K, size=n)


@pytest.mark.parametrize("hidden", [(), (8,)])
def test_real_gradients_and_noise_free_steps_leave_the_canary_subspace_alone(tmp_path, hidden):
    x, y = _data()
    model = build_model(F, K, hidden, seed=1)
    before = flatten_params(model)
    canaries = ClientCanaries(_plan(tmp_path, [False, False], noise_scale=0.0), "A", 1)   # none included, no noise
    settings = TrainSettings(noise_multiplier=1.0, class_weights=(1.0, 2.0, 0.5, 1.0, 3.0))
    train_local(model, x, y, settings, NoiseSource.derived(0, "t"), canaries)
    after = flatten_params(model)
    dim = (hidden[-1] if hidden else F) + 1
    assert np.abs(after - before).max() > 1e-3                           # the model did train
    np.testing.assert_allclose(null_projection(after, K, dim), null_projection(before, K, dim), atol=1e-6)
    np.testing.assert_allclose(np.load(canaries.plan.start_file("A", 1)), null_projection(before, K, dim), atol=1e-6)


def test_a_canary_gradient_has_norm_c_inside_the_subspace(tmp_path):
    model = build_model(F, K, (), seed=0)
    canaries = ClientCanaries(_plan(tmp_path, [True, False, True]), "A", 3)
    canaries.start(model, sample_rate=1.0)                               # every included canary taken
    params = list(model.parameters())
    extra = canaries.step_gradients(params, clip=2.0)
    flat = np.concatenate([extra[id(p)].numpy().ravel() for p in params]).astype(np.float64)
    dirs = round_directions(7, 0, 3, 3, F + 1)
    np.testing.assert_allclose(null_projection(flat, K, F + 1), 2.0 * (dirs[0] + dirs[2]), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(flat), 2.0 * np.linalg.norm(dirs[0] + dirs[2]), rtol=1e-5)
    one = ClientCanaries(_plan(tmp_path, [True]), "A", 1)
    one.start(model, sample_rate=1.0)
    g = one.step_gradients(params, clip=1.5)
    assert np.sqrt(sum(float((t.double() ** 2).sum()) for t in g.values())) == pytest.approx(1.5, rel=1e-6)


def test_the_drill_scales_the_noise_and_the_canaries_move_the_subspace(tmp_path):
    x, y = _data()
    moved = []
    for scale in (1.0, 0.0):
        model = build_model(F, K, (), seed=1)
        before = null_projection(flatten_params(model), K, F + 1)
        canaries = ClientCanaries(_plan(tmp_path, [True] * 4, noise_scale=scale), "A", 1)
        settings = TrainSettings(noise_multiplier=1.0, batches_per_epoch=1)     # q = 1: every canary, every step
        train_local(model, x, y, settings, NoiseSource.derived(0, "t"), canaries)
        moved.append(null_projection(flatten_params(model), K, F + 1) - before)
    dirs = round_directions(7, 0, 1, 4, F + 1)
    # without noise the step is a descent along the taken canaries only: against their directions
    assert (dirs @ moved[1] < 0).all() and np.abs(moved[0] - moved[1]).max() > 1e-3


def test_no_plan_no_canaries_and_a_plan_only_in_its_run(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert audit_canaries(str(tmp_path / "run"), "A", 1) is NO_CANARIES and not NO_CANARIES
    assert NO_CANARIES.capture(b"abc") == b"abc" and NO_CANARIES.noise_scale == 1.0
    plan = _plan(tmp_path, [True, False], clients=("A", "B"))
    monkeypatch.setenv(ENV_VAR, str(plan.save(tmp_path)))
    canary_grad._plan.cache_clear()
    got = audit_canaries(str(tmp_path / "run"), "B", 2)
    assert isinstance(got, ClientCanaries) and got.members.tolist() == [1] and got.included.tolist() == [False]
    assert audit_canaries(str(tmp_path / "run"), "C", 2) is NO_CANARIES
    with pytest.raises(RuntimeError, match="refusing to plant canaries in another run"):
        audit_canaries(str(tmp_path / "other"), "A", 1)
    assert got.capture(b"xyz") == b"xyz" and plan.upload_file("B", 2).read_bytes() == b"xyz"
    canary_grad._plan.cache_clear()


def test_canaries_need_dp(tmp_path):
    x, y = _data()
    with pytest.raises(ValueError, match="without DP"):
        train_local(build_model(F, K, (), 0), x, y, TrainSettings(), NoiseSource.derived(0), ClientCanaries(
            _plan(tmp_path, [True]), "A", 1))

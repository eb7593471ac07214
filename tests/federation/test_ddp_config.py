"""The ``ddp+he`` mode in the run config and the presets (federation/config.py, presets.py):
``ddp`` alone is refused in one line, each data set has its ddp preset (bench/ddp_twin.py's
validation choices), the noise floor defaults to ⌈0.8 · training clients⌉, and the configs of
the other modes keep their digests."""

from __future__ import annotations

import numpy as np
import pytest

from carbonfed.federation.config import RunConfig
from carbonfed.federation.presets import DDP_PRESETS


def test_ddp_without_he_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^invalid run config: privacy 'ddp' is refused: distributed DP needs HE "
                                         r"\(a plaintext sum would expose each client's noise share\); use 'ddp\+he'$"):
        RunConfig(privacy="ddp")


def test_each_data_set_has_its_ddp_preset_and_an_explicit_value_wins():
    seed = RunConfig(privacy="ddp+he")
    assert (seed.server_opt, seed.lr, seed.ddp_clip, seed.stats_sigma, seed.stats_stages, seed.average_last) == \
        ("adam", 0.1, 2.0, 20.0, 3, 5)
    owid = RunConfig(privacy="ddp+he", dataset="owid")
    assert (owid.server_opt, owid.lr, owid.ddp_clip, owid.stats_sigma, owid.stats_stages) == ("momentum", 3.0, 2.0, 10.0, 2)
    assert (seed.rounds, owid.rounds, owid.log_bound) == (50, 50, 14.0)
    assert set(DDP_PRESETS) == {"seed", "owid", "csv"}
    mine = RunConfig(privacy="ddp+he", lr=0.3, server_opt="momentum", ddp_clip=1.0, ddp_stats_sigma=5.0)
    assert (mine.lr, mine.server_opt, mine.ddp_clip, mine.stats_sigma) == (0.3, "momentum", 1.0, 5.0)
    assert RunConfig().lr == 0.1 and RunConfig(dataset="owid", privacy="dp+he").lr == 0.1   # the other modes: unchanged
    assert RunConfig(privacy="ddp+he").dp and RunConfig(privacy="ddp+he").he and RunConfig(privacy="ddp+he").ddp
    with pytest.raises(ValueError, match="server-opt must be adam or momentum"):
        RunConfig(privacy="ddp+he", server_opt="sgd")
    with pytest.raises(ValueError, match=r"ddp-sample-rate must be in \(0, 1\]"):
        RunConfig(privacy="ddp+he", ddp_sample_rate=0.0)


def test_noise_floor_and_release_floor():
    cfg = RunConfig(privacy="ddp+he")
    assert cfg.noise_floor(105) == 84 and cfg.noise_floor(100) == 80 and cfg.noise_floor(1) == 1
    assert RunConfig(privacy="ddp+he", min_noise_clients=50).noise_floor(105) == 50
    assert RunConfig(privacy="ddp+he", min_train_clients=90).release_floor(105) == 90
    assert RunConfig(privacy="dp+he").release_floor(105) == 2         # min-train-clients only


def test_other_modes_keep_their_digest():
    """The ddp-only settings are outside the digest of every other mode (state files, run.json)."""
    assert RunConfig(min_noise_clients=7, ddp_clip=3.0).digest() == RunConfig().digest()
    assert RunConfig(privacy="ddp+he", min_noise_clients=7).digest() != RunConfig(privacy="ddp+he").digest()


def test_a_sweep_gives_each_mode_its_own_preset():
    """`carbonfed sweep --modes dp+he,ddp+he`: the ddp+he jobs take the ddp preset (owid: momentum,
    lr 3, mean of 5, 50 rounds), the dp+he jobs the local one (lr 0.1, mean of 10, 30 rounds), ε = inf the plain `he`;
    a value the user set stays in both."""
    from pathlib import Path

    from carbonfed.federation.experiments.sweep_plan import parse_epsilons, plan, run_config

    jobs = plan(parse_epsilons("3,inf"), [0], ["dp+he", "ddp+he"])
    assert [j.mode for j in jobs] == ["centralized", "dp+he", "ddp+he", "he"]
    for base in (RunConfig(dataset="owid"), RunConfig(dataset="owid", privacy="ddp+he")):
        cfgs = {j.mode: run_config(j, base, Path("/tmp/sweep"), Path("/tmp/keys")) for j in jobs[1:]}
        assert (cfgs["ddp+he"].server_opt, cfgs["ddp+he"].lr, cfgs["ddp+he"].average_last) == ("momentum", 3.0, 5)
        assert (cfgs["dp+he"].lr, cfgs["dp+he"].average_last) == (0.1, 10) and cfgs["he"].lr == 0.1
        assert (cfgs["ddp+he"].rounds, cfgs["dp+he"].rounds) == (50, 30)
        assert all(c.keys_dir == "/tmp/keys" for c in cfgs.values())
    mine = {j.mode: run_config(j, RunConfig(dataset="owid", lr=0.5), Path("/tmp/s"), None) for j in jobs[1:]}
    assert mine["ddp+he"].lr == mine["dp+he"].lr == 0.5


def test_adams_step_is_capped_where_noise_dominates():
    """lr = min(lr, ddp-lr-z / z): at ε = 3 the seed preset keeps its validated 0.1, at ε = 1 (about
    three times the noise) the step shrinks in proportion; momentum and an explicit large cap keep lr."""
    from carbonfed.federation.client.ddp import server_lr
    from carbonfed.federation.server.ddp import server_plan

    def lr_at(**kw) -> tuple[float, float]:
        cfg = RunConfig(privacy="ddp+he", **kw)
        plan = server_plan(cfg, 131)
        return server_lr(cfg, plan), plan.noise_multiplier

    lr3, z3 = lr_at(epsilon=3.0)
    lr1, z1 = lr_at(epsilon=1.0)
    assert RunConfig(privacy="ddp+he").ddp_lr_z == 1.27 and lr3 == 0.1 and 1.27 / z3 >= 0.1
    assert z1 > 2.5 * z3 and abs(lr1 - 1.27 / z1) < 1e-12 and 0.04 < lr1 < 0.045     # 50 rounds: z 30.56
    assert lr_at(epsilon=1.0, ddp_lr_z=1000.0)[0] == 0.1                        # no cap
    assert lr_at(epsilon=1.0, server_opt="momentum", lr=3.0)[0] == 3.0          # Adam only
    assert RunConfig().digest() == RunConfig(ddp_lr_z=5.0).digest()             # other modes: not a setting


def test_weight_decay_pulls_toward_the_public_start_and_is_a_preset_setting():
    """Decoupled decay: with no gradient (Adam's and momentum's steps are 0) a step moves w by
    -lr·decay·(w - start) exactly; decay 0 is the plain optimizer; the seed preset sets 0.1 (chosen
    on validation folds), OWID's 0; an explicit value wins, and -2 is one error."""
    from carbonfed.federation.client.ddp import ServerOptimizer
    w, start, zero = np.array([1.0, -2.0, 0.5]), np.array([0.0, 0.0, 0.5]), np.zeros(3)
    for kind in ("adam", "momentum"):
        out = ServerOptimizer(kind, 0.1, 0.9, 0.5, start).step(w, zero, zero, 3, zero)[0]
        np.testing.assert_allclose(out, w - 0.1 * 0.5 * (w - start), rtol=0, atol=1e-15)
        g = np.array([0.3, -0.1, 0.2])
        plain = ServerOptimizer(kind, 0.1, 0.9).step(w, zero, zero, 3, g)[0]
        decayed = ServerOptimizer(kind, 0.1, 0.9, 0.5, start).step(w, zero, zero, 3, g)[0]
        np.testing.assert_allclose(decayed, plain - 0.05 * (w - start), rtol=0, atol=1e-12)
        assert not np.allclose(plain, w)
    assert RunConfig(privacy="ddp+he").ddp_weight_decay == 0.1
    assert RunConfig(privacy="ddp+he", dataset="owid").ddp_weight_decay == 0.0
    assert RunConfig(privacy="ddp+he", ddp_weight_decay=0.0).ddp_weight_decay == 0.0
    assert RunConfig(privacy="ddp+he").digest() != RunConfig(privacy="ddp+he", ddp_weight_decay=0.0).digest()
    with pytest.raises(ValueError, match="ddp-weight-decay must be finite and >= 0"):
        RunConfig(privacy="ddp+he", ddp_weight_decay=-2.0)

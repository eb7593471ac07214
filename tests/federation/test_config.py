"""The Flower app config in pyproject.toml and RunConfig must describe the same job."""

import tomllib
from pathlib import Path

import pytest

from carbonfed.federation.config import APP_COMPONENTS, RunConfig, flower_app_toml

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_mirrors_runconfig_defaults():
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "carbonfed.federation.server.app:app", "clientapp": "carbonfed.federation.client.app:app"}
    assert flwr["config"] == RunConfig().to_flower()
    # what the simulation and the deployment write for Flower is the same app
    assert flower_app_toml(RunConfig())["tool"]["flwr"]["app"] == flwr and APP_COMPONENTS == flwr["components"]


def test_flower_is_the_version_its_internals_were_checked_against():
    """carbonfed.federation.flower_compat wraps the Flower internals carbonfed uses; an upgrade
    must re-check them (pyproject pins flwr; this fails if the installed one differs)."""
    import flwr

    from carbonfed.federation.flower_compat import FLOWER_VERSION_CHECKED

    assert flwr.__version__ == FLOWER_VERSION_CHECKED
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"flwr[simulation]=={FLOWER_VERSION_CHECKED}" in pins


def test_from_flower_round_trip_and_errors():
    cfg = RunConfig(privacy="dp", epsilon=1.5, rounds=7, hidden="64,32")
    assert RunConfig.from_flower(cfg.to_flower()) == cfg
    assert cfg.hidden_sizes == (64, 32)
    assert RunConfig(hidden="linear").hidden_sizes == ()     # multinomial logistic regression
    with pytest.raises(ValueError, match="hidden"):
        RunConfig(hidden="32,-1")
    with pytest.raises(ValueError, match="privacy must be one of"):
        RunConfig(privacy="dp+tee")
    with pytest.raises(ValueError, match="holdout-offset"):
        RunConfig(holdout_offset=5)
    with pytest.raises(ValueError, match="epsilon"):
        RunConfig(privacy="dp", epsilon=float("inf"))
    with pytest.raises(ValueError, match="fault-drill"):
        RunConfig(fault_drill="Albania:explode")
    with pytest.raises(ValueError, match="rounds"):
        RunConfig.from_flower({"rounds": "many"})


def test_digest_ignores_paths_but_not_settings():
    a = RunConfig(out_dir="/x", keys_dir="/k")
    assert a.digest() == RunConfig().digest()
    assert RunConfig(epsilon=1.0).digest() != RunConfig().digest()


def test_command_line_options_parse_every_setting_type():
    """``carbonfed run``'s options: numbers and text by type, a boolean as a flag (a typed
    ``bool("false")`` would be True); options not given keep the RunConfig default."""
    import argparse

    p = argparse.ArgumentParser()
    RunConfig.add_options(p, skip=("data_dir",))
    given = RunConfig.options_given(p.parse_args(["--lr", "0.3", "--hidden", "linear", "--reproducible-noise"]),
                                    skip=("data_dir",))
    assert given == {"lr": 0.3, "hidden": "linear", "reproducible_noise": True}
    assert RunConfig.options_given(p.parse_args([]), skip=("data_dir",)) == {}
    with pytest.raises(SystemExit):
        p.parse_args(["--reproducible-noise", "false"])
    assert RunConfig(**given).reproducible_noise is True


def test_statistics_releases_per_mode():
    """Noisy statistics make stats-stages releases; exact ones (no DP, or σ_s = 0) need no
    refinement and make one, except that the asinh features (stats-stages 3) need all three, so
    `none` and `he` train on the main job's features."""
    for privacy in ("none", "he"):
        assert [RunConfig(privacy=privacy, stats_stages=k).stats_releases for k in (1, 2, 3)] == [1, 1, 3]
        assert RunConfig(privacy=privacy, stats_stages=3).stats_sigma == 0.0
    assert [RunConfig(privacy="dp+he", stats_stages=k).stats_releases for k in (1, 2, 3)] == [1, 2, 3]
    assert [RunConfig(stats_noise_multiplier=0, stats_stages=k).stats_releases for k in (1, 2, 3)] == [1, 1, 3]

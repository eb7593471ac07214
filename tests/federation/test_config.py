"""The Flower app config in pyproject.toml and RunConfig must describe the same job."""

import tomllib
from dataclasses import fields, replace
from pathlib import Path

import pytest

from carbonfed.federation.config import APP_COMPONENTS, RunConfig, flower_app_toml

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_mirrors_runconfig_defaults():
    """pyproject's run config holds RunConfig's defaults as written (the preset-governed ones at
    "auto", so `flwr run . --run-config dataset='owid'` gets the owid preset); read back, it is
    RunConfig() with the seed preset resolved."""
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "carbonfed.federation.server.app:app", "clientapp": "carbonfed.federation.client.app:app"}
    assert flwr["config"] == {f.name.replace("_", "-"): f.default for f in fields(RunConfig)}
    assert RunConfig.from_flower(flwr["config"]) == RunConfig()
    assert RunConfig.from_flower({**flwr["config"], "dataset": "owid"}) == RunConfig(dataset="owid")
    # what the simulation and the deployment write for Flower is the same app, with the resolved config
    app = flower_app_toml(RunConfig())["tool"]["flwr"]["app"]
    assert {k: v for k, v in app.items() if k != "config"} == {k: v for k, v in flwr.items() if k != "config"}
    assert app["config"] == RunConfig().to_flower() and APP_COMPONENTS == flwr["components"]


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


def test_version_is_the_installed_distributions(capsys):
    """`carbonfed --version` prints the installed version, which is pyproject's."""
    from carbonfed.federation import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"carbonfed {version}"


def test_csv_settings_round_trip_through_flower():
    """A CSV run's config (file, columns, resolved features and the JSON list of classes) reaches
    the server and the clients through Flower's run config unchanged."""
    cfg = RunConfig(dataset="csv", data="/d/t.csv", client_col="site", label_col="level", features="a,b",
                    classes='["low, rural", "high"]')
    assert RunConfig.from_flower(cfg.to_flower()) == cfg
    assert cfg.digest() != replace(cfg, classes='["low, rural", "medium"]').digest()   # another table, another job

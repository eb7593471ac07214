"""The recommended settings are the defaults (federation/presets.py): each data set's preset is
resolved when a RunConfig is made, an explicit value wins, and every reader (to_flower, digest,
run.json, the command line, --help) sees the resolved values."""

from __future__ import annotations

import argparse
import json

import pytest

from carbonfed.federation.config import RunConfig
from carbonfed.federation.presets import AUTO, PRESETS, preset_record
from carbonfed.federation.run import RUN_FILE, Lifecycle, add_run_options, settings_from

MAIN_JOB = {"hidden": "linear", "stats_stages": 3, "average_last": 10, "lr": 0.1}   # the seed main job's flags


def _settings(*argv: str) -> dict:
    p = argparse.ArgumentParser()
    add_run_options(p)
    return settings_from(p.parse_args(list(argv)))


def test_no_option_is_the_main_job_and_each_data_set_has_its_own():
    assert RunConfig() == RunConfig(**MAIN_JOB)
    assert {k: getattr(RunConfig(), k) for k in AUTO} == MAIN_JOB
    owid = RunConfig(dataset="owid")
    assert (owid.hidden, owid.stats_stages, owid.average_last, owid.lr) == ("linear", 2, 10, 0.1)
    assert owid.hidden_sizes == () and owid.stats_releases == 2        # no asinh stage on OWID
    assert set(PRESETS) == {"seed", "owid", "csv"} and PRESETS["csv"] == PRESETS["owid"]


def test_an_explicit_value_wins_and_auto_asks_for_the_preset():
    cfg = RunConfig(dataset="owid", stats_stages=3, hidden="32,16", average_last=1, lr=0.2)
    assert (cfg.stats_stages, cfg.hidden_sizes, cfg.average_last, cfg.lr) == (3, (32, 16), 1, 0.2)
    assert RunConfig(hidden="AUTO", stats_stages=0, average_last=0, lr=0.0) == RunConfig()
    assert RunConfig(dataset="owid", hidden="auto").hidden == "linear"


def test_readers_see_resolved_values():
    """to_flower (server.json, run.json, Flower's run config) and the digest carry the concrete
    values: a default run and the same run spelled out are one job."""
    flower = RunConfig().to_flower()
    assert {k: flower[k.replace("_", "-")] for k in AUTO} == MAIN_JOB
    assert RunConfig().digest() == RunConfig(**MAIN_JOB).digest()
    assert RunConfig(dataset="owid").digest() != RunConfig(dataset="owid", stats_stages=3).digest()
    assert RunConfig.from_flower(RunConfig(dataset="owid").to_flower()) == RunConfig(dataset="owid")


def test_an_unknown_data_set_is_one_error():
    with pytest.raises(ValueError, match=r"^invalid run config: dataset must be one of \('seed', 'owid', 'csv'\), "
                                         r"got 'mars'$"):
        RunConfig(dataset="mars")


def test_command_line_gets_the_preset_and_explicit_options_win():
    assert RunConfig(**_settings()) == RunConfig()
    assert RunConfig(**_settings("--dataset", "owid")).stats_stages == 2
    assert RunConfig(**_settings("--dataset", "owid", "--stats-stages", "3")).stats_stages == 3
    assert RunConfig(**_settings("--hidden", "32,16")).hidden_sizes == (32, 16)


def test_help_names_each_data_sets_preset(capsys):
    p = argparse.ArgumentParser(prog="carbonfed run")
    add_run_options(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: the data set's preset (seed: linear; owid: linear; csv: linear)" in text
    assert "default: the data set's preset (seed: 3; owid: 2; csv: 2)" in text
    assert "default: the data set's preset (seed: 10; owid: 10; csv: 10)" in text


def test_run_json_records_the_resolved_values(tmp_path):
    run = Lifecycle.start(tmp_path / "run", {"dataset": "owid", "privacy": "dp"}, keys=None)
    saved = json.loads((tmp_path / "run" / RUN_FILE).read_text())["config"]
    assert (saved["hidden"], saved["stats-stages"], saved["average-last"], saved["lr"]) == ("linear", 2, 10, 0.1)
    assert Lifecycle.resume(run.folder.path).cfg == run.cfg


def test_report_preset_record_names_what_was_overridden():
    cfg = RunConfig(dataset="owid", lr=0.2)
    record = preset_record(cfg.dataset, {k: getattr(cfg, k) for k in AUTO})
    assert record["name"] == "owid" and record["overridden"] == ["lr"]
    assert record["used"] == {"hidden": "linear", "stats_stages": 2, "average_last": 10, "lr": 0.2}
    assert record["preset"]["lr"] == 0.1

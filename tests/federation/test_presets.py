"""The recommended settings are the defaults (federation/presets.py): each data set's preset is
resolved when a RunConfig is made, an explicit value wins, and every reader (to_flower, digest,
run.json, the command line, --help) sees the resolved values."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import pytest

from carbonfed.federation.config import RunConfig
from carbonfed.federation.presets import AUTO, DDP_AUTO, PRESETS, preset_record
from carbonfed.federation.run import RUN_FILE, Lifecycle, add_run_options, settings_from

MAIN_JOB = {"hidden": "linear", "stats_stages": 3, "average_last": 10, "lr": 0.1,   # the seed main job's flags
            "log_bound": 10.0, "rounds": 30, "privacy": "dp+he", "masks": False}


def _settings(*argv: str) -> dict:
    p = argparse.ArgumentParser()
    add_run_options(p)
    return settings_from(p.parse_args(list(argv)))


def test_no_option_is_the_main_job_and_each_data_set_has_its_own():
    assert RunConfig() == RunConfig(**MAIN_JOB)
    assert {k: getattr(RunConfig(), k) for k in AUTO} == MAIN_JOB
    owid = RunConfig(dataset="owid", privacy="dp+he")
    assert (owid.hidden, owid.stats_stages, owid.average_last, owid.lr) == ("linear", 2, 10, 0.1)
    assert (owid.log_bound, owid.rounds, owid.masks) == (14.0, 30, False)   # OWID's log range (data/owid.py)
    assert owid.hidden_sizes == () and owid.stats_releases == 2        # no asinh stage on OWID
    assert set(PRESETS) == {"seed", "owid", "csv"}
    # a user's units are unknown: the default range; parties of unknown size: the main job's mode
    assert PRESETS["csv"] == replace(PRESETS["owid"], log_bound=10.0, privacy="dp+he")


def test_owid_recommends_distributed_dp_with_masks():
    """OWID's parties hold 4-27 rows: local DP noise swamps their gradients, so its recommended
    mode is ddp+he (noise in shares, central DP for the sum), with masks on so that no key holder
    with the server sees one client's update (each carries only a share of the noise)."""
    owid = RunConfig(dataset="owid")
    assert (owid.privacy, owid.masks, owid.masked, owid.rounds, owid.lr) == ("ddp+he", True, True, 50, 3.0)
    assert RunConfig(dataset="owid", masks=False).masked is False
    assert RunConfig(privacy="ddp+he").masked and not RunConfig(privacy="he").masked   # local DP / no DP: masks opt-in
    assert RunConfig(privacy="he", masks=True).masked and RunConfig(privacy="he", masks="TRUE").masks is True
    with pytest.raises(ValueError, match=r"^invalid run config: masks must be true, false or auto, got 'yes'$"):
        RunConfig(masks="yes")
    assert RunConfig(**_settings("--dataset", "owid", "--no-masks")).masked is False
    assert RunConfig(**_settings("--privacy", "he", "--masks")).masked is True


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
    assert RunConfig(dataset="owid").to_flower()["masks"] is True          # the resolved value, not "auto"


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
    assert "default: the data set's preset (seed: 10.0; owid: 14.0; csv: 10.0)" in text
    assert "default: the data set's preset (seed: 30; owid: 30; csv: 30), with ddp+he (seed: 50; owid: 50; csv: 50)" in text


def test_run_json_records_the_resolved_values(tmp_path):
    run = Lifecycle.start(tmp_path / "run", {"dataset": "owid", "privacy": "dp"}, keys=None)
    saved = json.loads((tmp_path / "run" / RUN_FILE).read_text())["config"]
    assert (saved["hidden"], saved["stats-stages"], saved["average-last"], saved["lr"]) == ("linear", 2, 10, 0.1)
    assert Lifecycle.resume(run.folder.path).cfg == run.cfg


def test_report_preset_record_names_what_was_overridden():
    cfg = RunConfig(dataset="owid", lr=0.2)
    record = preset_record(cfg.dataset, {k: getattr(cfg, k) for k in (*AUTO, *DDP_AUTO)})
    assert record["name"] == "owid" and record["overridden"] == ["lr"]
    assert record["used"] == {"hidden": "linear", "stats_stages": 2, "average_last": 5, "lr": 0.2, "log_bound": 14.0,
                              "rounds": 50, "privacy": "ddp+he", "masks": True, "server_opt": "momentum",
                              "ddp_clip": 2.0, "ddp_stats_sigma": 10.0, "ddp_lr_z": 1.27, "ddp_weight_decay": 0.0}
    assert record["preset"]["lr"] == 3.0          # the ddp preset, the one the run's mode follows
    local = RunConfig(dataset="owid", privacy="dp+he")
    record = preset_record("owid", {k: getattr(local, k) for k in (*AUTO, *DDP_AUTO)})
    assert record["overridden"] == ["privacy"] and record["preset"]["lr"] == 0.1 and "server_opt" not in record["used"]


def test_the_log_range_is_a_preset_setting():
    """``log_bound`` resolves per data set, an explicit value wins, and it is part of a run's
    identity (the digest) except at the range every run had before it was a setting (10)."""
    assert RunConfig(dataset="owid", log_bound=20.0).log_bound == 20.0
    assert RunConfig(dataset="owid", log_bound=0.0).log_bound == 14.0
    with pytest.raises(ValueError, match=r"log-bound must be a finite number > 0"):
        RunConfig(log_bound=-1.0)
    assert RunConfig(log_bound=14.0).digest() != RunConfig().digest()
    assert RunConfig(dataset="owid").digest() != RunConfig(dataset="owid", log_bound=10.0).digest()


def test_rounds_are_a_preset_setting():
    """The local-DP presets train 30 rounds, the ddp+he ones their own (fewer rounds of one clipped
    gradient sum, chosen on validation folds); an explicit --rounds wins in every mode."""
    assert RunConfig().rounds == RunConfig(dataset="owid", privacy="dp+he").rounds == 30
    assert RunConfig(privacy="ddp+he").rounds == 50 and RunConfig(privacy="ddp+he", dataset="owid").rounds == 50
    assert RunConfig(privacy="ddp+he", rounds=100).rounds == 100 and RunConfig(rounds=5).rounds == 5
    assert RunConfig(**_settings("--privacy", "ddp+he", "--rounds", "12")).rounds == 12

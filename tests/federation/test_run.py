"""The run lifecycle that `carbonfed run` and `deploy local` share: folder rules, own keys,
run.json and resume rules, the one parser of the run options, and the command dispatch.
No federation is built here (the slow end-to-end runs are in test_cli.py and test_deploy.py)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pytest

from carbonfed.federation import cli
from carbonfed.federation.config import RunConfig
from carbonfed.federation.deploy.local import _parser as deploy_parser
from carbonfed.federation.run import (CLIENT_STATE, RUN_FILE, Lifecycle, RunError, RunFolder, add_run_options,
                                      delete_private_keys, settings_from)


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The system temp dir of this test alone (other processes may make keys at the same time)."""
    tmp = tmp_path / "systemp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_run_options(p)
    return p


def test_run_and_deploy_parse_the_same_options():
    """`deploy local` takes the run options of `carbonfed run`, with a boolean as a flag:
    `--reproducible-noise False` is refused instead of parsing as true (the copy it had used type=bool)."""
    argv = ["--privacy", "dp", "--epsilon", "1.5", "--hidden", "linear", "--reproducible-noise", "--rounds", "4"]
    run_args = _run_parser().parse_args(argv)
    deploy_args = deploy_parser().parse_args(["local", "--clients", "4", *argv])
    assert settings_from(run_args) == settings_from(deploy_args) == {
        "dataset": "seed", "data_dir": "", "privacy": "dp", "epsilon": 1.5, "hidden": "linear",
        "reproducible_noise": True, "rounds": 4}
    assert RunConfig(**settings_from(deploy_args)).reproducible_noise is True
    assert RunConfig(**settings_from(deploy_parser().parse_args(["local", "--clients", "4"]))) == RunConfig()
    for parse in (lambda a: _run_parser().parse_args(a), lambda a: deploy_parser().parse_args(["local", "--clients", "4", *a])):
        with pytest.raises(SystemExit):
            parse(["--reproducible-noise", "False"])
        with pytest.raises(SystemExit):
            parse(["--dataset", "mars"])


def test_a_folder_that_holds_a_run_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ledger.jsonl").write_text("{}\n")
    with pytest.raises(RunError, match="already holds a run.*choose another --out") as exc:
        RunFolder.at(out).check_new()
    assert "--resume" not in str(exc.value)
    (out / RUN_FILE).write_text(json.dumps({"config": RunConfig().to_flower(), "own_keys": True}))
    with pytest.raises(RunError, match=f"carbonfed run --resume --out {out}"):
        RunFolder.at(out).check_new()
    with pytest.raises(RunError, match="already holds a run"):
        Lifecycle.start(out, {"privacy": "none"}, keys=None)
    assert sorted(p.name for p in out.iterdir()) == ["ledger.jsonl", RUN_FILE]    # nothing touched
    (out / "report.json").write_text("{}")
    with pytest.raises(RunError, match="choose another --out$"):
        RunFolder.at(out).check_new()


def test_an_invalid_setting_creates_nothing(tmp_path, private_tmp):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        Lifecycle.start(out, {"privacy": "dp+he", "rounds": -1}, keys=None)   # 0: the preset
    assert not out.exists() and list(private_tmp.iterdir()) == []     # no folder, no keys


def test_own_keys_are_private_recorded_and_resumable(tmp_path, private_tmp):
    out = tmp_path / "run"
    run = Lifecycle.start(out, {"privacy": "dp+he", "rounds": 2}, keys=None)
    keys = Path(run.cfg.keys_dir)
    assert run.own_keys and (keys / "secret.ctx").is_file() and keys.is_relative_to(private_tmp)
    assert keys.parent.stat().st_mode & 0o077 == 0 and not keys.is_relative_to(out)
    state = out / CLIENT_STATE
    assert run.cfg.state_dir == str(state) and state.stat().st_mode & 0o777 == 0o700
    assert run.cfg.out_dir == str(out.resolve()) and run.cfg.data_dir          # resolved to absolute paths
    saved = json.loads((out / RUN_FILE).read_text())
    assert saved == {"config": run.cfg.to_flower(), "own_keys": True}
    again = Lifecycle.resume(out)
    assert again == run
    delete_private_keys(run.cfg.keys_dir)
    assert not keys.parent.exists()
    with pytest.raises(RunError, match="keys .* are gone"):
        Lifecycle.resume(out)


def test_resume_needs_an_unfinished_run(tmp_path):
    with pytest.raises(RunError, match="--resume needs --out"):
        Lifecycle.resume(None)
    with pytest.raises(RunError, match="holds no run started by `carbonfed run`"):
        Lifecycle.resume(tmp_path)
    run = Lifecycle.start(tmp_path / "run", {"privacy": "dp", "rounds": 2, "epsilon": 8.0}, keys=None)
    assert not run.cfg.keys_dir and Lifecycle.resume(run.folder.path).cfg.epsilon == 8.0
    (run.folder.path / "report.json").write_text("{}")
    with pytest.raises(RunError, match="finished run .*nothing to resume"):
        Lifecycle.resume(run.folder.path)


def test_every_command_is_dispatched_the_same_way(capsys):
    """Each command is a `module:function` taking its argv; its own --help is its parser's."""
    for name, (target, _) in cli.COMMANDS.items():
        module, _, func = target.partition(":")
        assert callable(getattr(__import__(module, fromlist=[func]), func)), name
    with pytest.raises(SystemExit) as exc:
        cli.main(["deploy", "local", "--help"])
    assert exc.value.code == 0 and "--reproducible-noise" in capsys.readouterr().out
    assert cli.main(["run", "--resume"]) == 2
    assert capsys.readouterr().err.strip() == "error: --resume needs --out, the folder of the interrupted run"
    with pytest.raises(SystemExit):
        cli.main(["teleport"])

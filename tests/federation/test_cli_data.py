"""A user's federated CSV (``--data FILE.csv --client-col C --label-col L``) is accepted by
``sweep``, ``deploy local`` and ``audit-attack`` as by ``run``: read and checked whole before
anything is made (a bad table is one line on stderr, exit code 2), and used where they read data
(the sweep's centralized ceiling, the deployment's parties, the audit's canary table). These
tests stop before any federation runs; ``carbonfed run --data`` end to end is test_csv_run.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from carbonfed.data import split_countries
from carbonfed.data.example import write_example_csv
from carbonfed.federation.cli import main
from carbonfed.federation.config import RunConfig
from carbonfed.federation.deploy.deployment import choose_countries
from carbonfed.federation.experiments.audit_attack import with_canaries
from carbonfed.federation.experiments.canaries import make_canaries
from carbonfed.federation.experiments.centralized import run_centralized
from carbonfed.federation.experiments.sweep import sweep_base
from carbonfed.federation.experiments.sweep_plan import CENTRALIZED, Job, run_config
from carbonfed.federation.run import print_summary
from carbonfed.federation.run_data import load_run_data, with_data_schema

CSV_ARGS = ("--client-col", "site", "--label-col", "level")


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    return write_example_csv(tmp_path_factory.mktemp("data") / "example.csv", parties=20, rows=12)


@pytest.fixture(scope="module")
def bad_table(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "bad.csv"
    path.write_text("site,a,level\n" + "".join(f"{s},{i},{'xy'[i % 2]}\n" for s in "ABCDE" for i in range(3))
                    + "F,oops,x\n")
    return path


def cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", [("sweep", "--epsilons", "3", "--seeds", "0"), ("deploy", "local", "--clients", "3")])
def test_a_bad_table_stops_sweep_and_deploy_before_anything_is_made(capsys, tmp_path, bad_table, command):
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, *command, "--out", out, "--data", bad_table, *CSV_ARGS)
    assert code == 2 and stdout == "" and err.count("\n") == 1 and "Traceback" not in err
    assert f"{bad_table}: column 'a' is numeric but for 1 cell(s) (line 17: 'oops')" in err
    assert not out.exists()


def test_sweep_data_resolves_the_tables_schema_and_runs_its_ceiling(tmp_path, example, monkeypatch):
    monkeypatch.setenv("CARBONFED_DATA_DIR", str(tmp_path / "nowhere"))      # a CSV sweep needs no data folder
    base = sweep_base(None, None, 2, {"data": str(example), "client_col": "site", "label_col": "level"})
    assert (base.dataset, base.data_dir, base.rounds, base.stats_stages) == ("csv", "", 2, 2)   # the csv preset
    assert len(base.features.split(",")) == 10 and "note" not in base.features and "site" not in base.features
    cfg = run_config(Job(CENTRALIZED, math.inf, 0), base, tmp_path, None)
    report = run_centralized(cfg, tmp_path / "runs" / "centralized")
    ds = load_run_data(base)
    assert np.array(report["confusion_matrix"]).shape == (len(ds.classes),) * 2 and 0 < report["metrics"]["accuracy"]
    assert report["clients"] == {"train": 16, "test": 4}
    assert report["provenance"]["data"]["path"] == str(example.resolve())
    assert report["provenance"]["config"]["data"] == str(example.resolve())
    with pytest.raises(ValueError, match="label column 'grade' not found"):
        sweep_base(None, None, None, {"data": str(example), "client_col": "site", "label_col": "grade"})


def test_deploy_chooses_its_nodes_among_the_tables_parties(example):
    cfg = with_data_schema(RunConfig(dataset="csv", data=str(example), client_col="site", label_col="level"))
    part = split_countries(load_run_data(cfg).countries(), cfg.holdout_offset)
    nodes = choose_countries(cfg, 5)
    assert len(nodes) == 5 and set(nodes) <= set(part.countries)
    assert len(set(nodes) & set(part.test)) == 1
    with pytest.raises(ValueError, match="only 20 parties"):
        choose_countries(cfg, 30)


def test_the_audit_of_a_csv_run_adds_its_canaries_to_a_copy_of_the_table(tmp_path, example):
    cfg = with_data_schema(RunConfig(dataset="csv", data=str(example), client_col="site", label_col="level"))
    ds = load_run_data(cfg)
    part = split_countries(ds.countries(), cfg.holdout_offset)
    canaries = make_canaries(ds, part.train, 30, np.random.default_rng(0))
    before = example.read_bytes()
    audit_cfg = with_canaries(cfg, ds, canaries, tmp_path / "audit")
    assert Path(audit_cfg.data).parent == tmp_path / "audit" and example.read_bytes() == before
    audited = load_run_data(audit_cfg)             # same features and classes as the run recorded
    idx = np.flatnonzero(canaries["included"])
    assert audited.countries() == ds.countries() and len(audited.frame) == len(ds.frame) + len(idx)
    for i in idx:
        rows = audited.frame[audited.frame["country"] == canaries["country"][i]]
        match = rows[np.isclose(rows[list(ds.features)].to_numpy(), canaries["x"][i], rtol=1e-12).all(1)]
        assert match["label"].tolist() == [int(canaries["label"][i])]


def test_the_run_summary_of_a_csv_run_speaks_of_clients(capsys, tmp_path):
    report = {"dataset": "csv", "metrics": {"accuracy": 0.9, "macro_f1": 0.8}, "privacy": None, "he": None,
              "clients": {"train": 16, "test": 4}, "timing": {"total_s": 10.0, "per_round_s": 5.0}}
    print_summary(report, tmp_path)
    csv_text = capsys.readouterr().out
    assert "(4 test clients, 16 training)" in csv_text and "countr" not in csv_text
    print_summary({**report, "dataset": "seed"}, tmp_path)
    assert "(4 test countries, 16 training)" in capsys.readouterr().out

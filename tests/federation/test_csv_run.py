"""Any federated CSV (`carbonfed run --data FILE.csv --client-col C --label-col L`): the whole table
is checked before a folder or a key is made (each problem one line on stderr, exit code 2), the
run's config carries the features and classes the server needs, and the example CSV runs end to
end (slow) with hold-out, statistics release, DP, HE, ledger, report and audit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from carbonfed.data import DataError
from carbonfed.data.example import write_example_csv
from carbonfed.federation import cli
from carbonfed.federation.config import RunConfig
from carbonfed.federation.run import Lifecycle
from carbonfed.federation.run_data import data_schema, load_run_data, with_data_schema

BIN = Path(sys.executable).parent / "carbonfed"
ROWS = [(site, i) for site in "ABCDE" for i in range(4)]


def _table(path: Path, header="site,a,b,note,level", row=lambda site, i: f"{site},{i},{i * 2.5},n{i},{'xy'[i % 2]}"):
    """A small valid federated table (5 parties, 4 rows each, two classes) unless ``row`` says otherwise."""
    path.write_text("\n".join([header, *[r for r in (row(s, i) for s, i in ROWS) if r is not None]]) + "\n")
    return path


CSV_ARGS = ("--client-col", "site", "--label-col", "level")
BAD = {   # what is wrong -> (the table, extra options, what the one-line error says)
    "header only": (lambda p: _table(p, row=lambda s, i: None), (), "has a header but no data rows"),
    "missing label column": (lambda p: _table(p, header="site,a,b,note,grade"), (), "label column 'level' not found"),
    "text feature asked for": (_table, ("--features", "a,note"), "feature column 'note' is not numeric (line 2"),
    "NaN value": (lambda p: _table(p, row=lambda s, i: f"{s},{'nan' if (s, i) == ('C', 2) else i},1,n,{'xy'[i % 2]}"),
                  (), "feature column 'a' has an empty, NaN or infinite value at line 12"),
    "client with one row": (lambda p: _table(p, row=lambda s, i: None if s == "E" and i else f"{s},{i},1,n,{'xy'[i % 2]}"),
                            (), "client 'E' has 1 row(s)"),
    "one class": (lambda p: _table(p, row=lambda s, i: f"{s},{i},1,n,x"), (), "has one class only ('x')"),
    "two clients": (lambda p: _table(p, row=lambda s, i: f"{s},{i},1,n,{'xy'[i % 2]}" if s in "AB" else None),
                    (), "2 client(s) in column 'site'; at least 3"),
}


@pytest.fixture
def system_tmp(tmp_path, monkeypatch):
    """This test's own system temp dir, where a run's own keys would be made."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return tmp_path / "tmp"


@pytest.mark.parametrize("case", BAD)
def test_a_bad_table_is_one_line_exit_2_and_nothing_made(case, tmp_path, system_tmp, capsys):
    make, extra, message = BAD[case]
    csv, out = make(tmp_path / "t.csv"), tmp_path / "run"
    assert cli.main(["run", "--data", str(csv), *CSV_ARGS, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("carbonfed: error: ") and message in err, err
    assert "Traceback" not in err and not out.exists() and list(system_tmp.iterdir()) == []   # no folder, no key


def test_the_config_carries_the_tables_schema(tmp_path):
    cfg = with_data_schema(RunConfig(dataset="csv", data=str(_table(tmp_path / "t.csv")), client_col="site",
                                     label_col="level"))
    assert cfg.dataset == "csv" and Path(cfg.data).is_absolute()
    assert cfg.features == "a,b" and json.loads(cfg.classes) == ["x", "y"]     # every numeric column; `note` is text
    assert data_schema(cfg) == (2, 2)                                        # the server's vector lengths, no data read
    assert (cfg.stats_stages, cfg.hidden, cfg.average_last) == (2, "linear", 10)   # the csv preset
    ds = load_run_data(cfg)
    assert ds.countries() == list("ABCDE") and ds.classes == ("x", "y")
    assert RunConfig.from_flower(cfg.to_flower()) == cfg
    _table(tmp_path / "t.csv", row=lambda s, i: f"{s},{i},1,n,{'xyz'[i % 3]}")   # the file changes under the run
    with pytest.raises(DataError, match="changed since the run started"):
        load_run_data(cfg)


def test_csv_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="needs client-col .*needs label-col"):
        RunConfig(dataset="csv", data="x.csv")
    with pytest.raises(ValueError, match="data, client-col: only for a CSV run .* the seed data set"):
        RunConfig(data="x.csv", client_col="site")
    with pytest.raises(ValueError, match="classes must be a JSON list"):
        RunConfig(dataset="csv", data="x.csv", client_col="s", label_col="l", classes="a,b")
    with pytest.raises(ValueError, match="needs its features and classes"):
        data_schema(RunConfig(dataset="csv", data="x.csv", client_col="s", label_col="l"))
    csv = _table(tmp_path / "t.csv")
    assert cli.main(["run", "--dataset", "owid", "--data", str(csv), *CSV_ARGS, "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


def test_a_csv_run_needs_no_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CARBONFED_DATA_DIR", str(tmp_path / "nowhere"))
    run = Lifecycle.start(tmp_path / "run", {"dataset": "csv", "data": str(_table(tmp_path / "t.csv")),
                                             "client_col": "site", "label_col": "level", "privacy": "dp"}, keys=None)
    assert run.cfg.data_dir == "" and run.cfg.features == "a,b"


@pytest.mark.slow
def test_the_example_csv_runs_end_to_end(tmp_path):
    csv = write_example_csv(tmp_path / "example.csv")
    out = tmp_path / "run"
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    res = subprocess.run([str(BIN), "run", "--data", str(csv), *CSV_ARGS, "--rounds", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "audit: passed" in res.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "csv" and report["privacy_mode"] == "dp+he" and report["he"]["scheme"]
    assert report["metrics"]["classes"] == sorted({line.split(",")[0] for line in csv.read_text().splitlines()[1:]})
    assert 0 <= report["metrics"]["accuracy"] <= 1 and report["metrics"]["macro_f1"] is not None
    assert report["privacy"]["epsilon_max"] <= 3.0 and report["preprocessing"]["covered_by_epsilon"]
    assert report["preset"]["name"] == "csv" and report["preset"]["overridden"] == ["rounds"]   # --rounds 2 given
    assert report["preset"]["used"]["stats_stages"] == 2 == report["preprocessing"]["stages"]
    assert report["clients"]["partition"] == {"train": 48, "test": 12}
    config = report["provenance"]["config"]
    assert config["client-col"] == "site" and "note" not in config["features"].split(",")
    assert (out / "report.html").exists() and (out / "privacy_statement.md").exists()

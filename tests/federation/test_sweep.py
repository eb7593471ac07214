"""A tiny real sweep (Flower simulation, Opacus): outputs, centralized ceiling, resume/skip."""

import json
import math

import pandas as pd
import pytest

from carbonfed.federation.experiments.sweep import main, run_sweep
from carbonfed.federation.experiments.sweep_plan import CSV_COLUMNS, parse_epsilons, plan

# Settings other than mode, ε, seed and rounds reach every run (here the model: no hidden layer).
ARGS = dict(epsilons="inf,3", seeds="0", modes=("dp",), rounds=2, settings={"hidden": "linear", "lr": 0.4})
CLI = ["--epsilons", "inf,3", "--seeds", "0", "--rounds", "2", "--modes", "dp", "--hidden", "linear", "--lr", "0.4"]
RUNS = {"centralized-epsinf-seed0", "none-epsinf-seed0", "dp-eps3-seed0"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    df = run_sweep(out=out, progress=False, **ARGS)
    return out, df, None


def test_plan_maps_modes_to_their_dp_and_plain_counterparts():
    jobs = plan(parse_epsilons("inf,8,1"), [0, 1], ["dp+he", "he"])
    names = [j.name for j in jobs]
    assert names[:2] == ["centralized-epsinf-seed0", "centralized-epsinf-seed1"]
    assert names.count("he-epsinf-seed0") == 1                       # dp+he and he both map to he: deduped
    assert {j.mode for j in jobs if not math.isinf(j.epsilon)} == {"dp+he"}
    assert len(jobs) == 2 * (1 + 1 + 2)
    with pytest.raises(ValueError):
        parse_epsilons("3,-1")


@pytest.mark.slow   # builds whole federations
def test_outputs(sweep):
    out, df, _ = sweep
    csv = pd.read_csv(out / "sweep.csv")
    assert list(csv.columns) == CSV_COLUMNS
    assert len(csv) == 3 and set(csv["mode"]) == {"centralized", "none", "dp"}
    by = {(r.mode, r.epsilon): r for r in csv.itertuples()}
    assert math.isinf(by[("centralized", math.inf)].epsilon) and math.isinf(by[("none", math.inf)].epsilon)
    dp = by[("dp", 3.0)]
    assert 0 < dp.epsilon_max <= 3.0 and math.isnan(by[("none", math.inf)].epsilon_max)
    for r in csv.itertuples():
        assert 0 <= r.accuracy <= 1 and 0 <= r.macro_f1 <= 1 and r.seconds > 0
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "tradeoff.md").read_text()
    for row in ("| centralized | ∞ |", "| none | ∞ |", "| dp | 3 |"):
        assert row in md
    for name in RUNS:                                                # provenance: every run's config hash
        assert f"`runs/{name}`" in md
    assert "hidden layers 'linear'; other settings lr=0.4" in md
    for name in ("none-epsinf-seed0", "dp-eps3-seed0"):
        rep = json.loads((out / "runs" / name / "report.json").read_text())
        assert rep["provenance"]["config"]["hidden"] == "linear" and rep["provenance"]["config"]["lr"] == 0.4
        assert rep["model"]["architecture"].startswith("linear 21→5") and rep["model"]["parameters"] == 21 * 5 + 5
    assert {p.name for p in (out / "runs").iterdir()} == RUNS
    assert df.attrs["ran"] and not df.attrs["skipped"]


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_redoes_half_finished(sweep, capsys):
    out, df, _ = sweep
    reports = {p.name: (p / "report.json").stat().st_mtime_ns for p in (out / "runs").iterdir()}
    again = run_sweep(out=out, progress=False, **ARGS)
    assert again.attrs["ran"] == [] and set(again.attrs["skipped"]) == RUNS
    assert {p.name: (p / "report.json").stat().st_mtime_ns for p in (out / "runs").iterdir()} == reports
    pd.testing.assert_frame_equal(again, df)

    # A half-finished run (ledger, no report.json) is wiped and run again; the others stay skipped.
    half = out / "runs" / "centralized-epsinf-seed0"
    (half / "report.json").unlink()
    (half / "ledger.jsonl").write_text("{}\n")
    capsys.readouterr()
    assert main([*CLI, "--out", str(out)]) == 0
    assert (half / "report.json").is_file() and not (half / "ledger.jsonl").exists()
    # stderr is not a terminal here: the progress display is one plain line per job.
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("sweep ")]
    assert lines[0].startswith("sweep 1/3: centralized-epsinf-seed0: accuracy ")
    assert lines[1:] == ["sweep 2/3: none-epsinf-seed0: done earlier, skipped",
                         "sweep 3/3: dp-eps3-seed0: done earlier, skipped"]
    assert (out / "runs" / "dp-eps3-seed0" / "report.json").stat().st_mtime_ns == reports["dp-eps3-seed0"]

    # Other settings into the same folder are refused, not mixed in.
    with pytest.raises(ValueError, match="other settings"):
        run_sweep(out=out, progress=False, **{**ARGS, "rounds": 3})
    with pytest.raises(ValueError, match="other settings"):
        run_sweep(out=out, progress=False, **{**ARGS, "settings": {}})      # the default MLP

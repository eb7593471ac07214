"""``carbonfed run`` as a user runs it: a subprocess, output to a pipe (not a terminal)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from carbonfed.data import resolve_data_dir

BIN = Path(sys.executable).parent / "carbonfed"
pytestmark = pytest.mark.slow


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    return subprocess.run([str(BIN), "run", *args], capture_output=True, text=True, timeout=600, env=env)


def test_run_prints_one_line_per_round_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "run"
    data = str(resolve_data_dir(None))
    res = _run("--data-dir", data, "--rounds", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    rounds = [ln for ln in lines if ln.startswith("round ")]
    # Not a terminal: plain lines, one per round, with the round's ledger summary.
    assert [ln.split(":")[0] for ln in rounds] == ["round 1/2", "round 2/2"]
    assert all("131 accepted, 0 rejected, ε_max=" in ln and "kB/client" in ln for ln in rounds)
    assert any(ln.startswith("held-out accuracy") for ln in lines) and "audit: passed" in res.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["privacy_mode"] == "dp+he" and report["rounds"] == 2
    assert f"ε_max={report['privacy']['epsilon_max']:.3f}" in rounds[-1]

    again = _run("--data-dir", data, "--rounds", "2", "--out", str(out))
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert json.loads((out / "report.json").read_text()) == report       # nothing recorded was touched


def test_run_with_a_missing_data_dir_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    res = _run("--data-dir", str(missing), "--rounds", "1", "--out", str(tmp_path / "run"))
    assert res.returncode != 0
    assert str(missing) in res.stderr and "Traceback" not in res.stderr


def test_interrupted_run_resumes_from_its_last_round(tmp_path):
    """Killed after round 1, `carbonfed run --resume` finishes the same run: rounds 1..3 once each,
    the ledger chain continued, ε within budget, the run's model still the mean of rounds 1..3
    (``--average-last 3``: the killed server's global models came back from the checkpoint), and
    the run's own keys deleted at the end."""
    from carbonfed.privacy.ledger import check_chain, read_ledger
    from carbonfed.privacy.audit.verify import verify_run

    out = tmp_path / "run"
    args = ["--data-dir", str(resolve_data_dir(None)), "--rounds", "3", "--local-epochs", "1",
            "--batches-per-epoch", "2", "--average-last", "3", "--out", str(out)]
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    temp_before = set(Path(tempfile.gettempdir()).glob("*carbonfed-app-*"))
    proc = subprocess.Popen([str(BIN), "run", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "checkpoint.json").exists() and json.loads((out / "checkpoint.json").read_text())["round"] >= 1:
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)          # the whole run: CLI, Ray workers, server
        proc.wait()
    keys = Path(json.loads((out / "run.json").read_text())["config"]["keys-dir"])
    assert not (out / "report.json").exists() and (keys / "secret.ctx").exists()
    # the killed run's Flower app folder stayed inside its own run folder, not in the system temp dir
    assert set(Path(tempfile.gettempdir()).glob("*carbonfed-app-*")) == temp_before
    assert len(list(out.glob(".carbonfed-app-*"))) == 1
    assert keys.parent.stat().st_mode & 0o077 == 0 and not keys.is_relative_to(out)   # private temp dir

    again = _run("--data-dir", str(resolve_data_dir(None)), "--rounds", "3", "--out", str(out))
    assert again.returncode == 2 and "--resume" in again.stderr      # not overwritten, told how to go on
    res = subprocess.run([str(BIN), "run", "--resume", "--out", str(out)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    ledger = read_ledger(out / "ledger.jsonl")
    assert check_chain(ledger) == []
    assert [l["round"] for l in ledger if l["kind"] == "round"] == [1, 2, 3]
    assert [l["model_rounds"] for l in ledger if l["kind"] == "round"] == [[1], [1, 2], [1, 2, 3]]
    assert [l["kind"] for l in ledger].count("resume") == 1
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["averaged_rounds"] == [1, 2, 3]
    assert report["rounds"] == 3 and report["privacy"]["epsilon_max"] <= 3.0
    assert verify_run(out).ok
    assert not keys.parent.exists() and not (out / ".client-state").exists()

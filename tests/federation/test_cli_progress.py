"""Progress of runs, sweeps and audits: a live rich bar when the output is a terminal, one plain
line per round (run, audit-attack's canary run) or per job (sweep) otherwise (logs, CI, pipes).
``TTY_COMPATIBLE`` is rich's own switch for "this output is (not) a terminal"."""

from __future__ import annotations

import pytest

from carbonfed.federation.config import RunConfig
from carbonfed.federation.experiments.sweep import _progress_display
from carbonfed.federation.run import round_progress

ROUND = {"round": 1, "accepted": 4, "rejected": 1, "epsilon_max": 1.25, "seconds": 2.5}


def test_a_run_not_on_a_terminal_prints_one_plain_line_per_round(capsys, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    display, on_round = round_progress(RunConfig(rounds=3))
    with display:
        on_round(ROUND)
    out = capsys.readouterr().out
    assert out == "round 1/3: 4 accepted, 1 rejected, ε_max=1.250, 2.5s\n"
    assert display.disable


def test_a_run_on_a_terminal_shows_a_bar_instead(capsys, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    display, on_round = round_progress(RunConfig(rounds=3))
    assert not display.disable
    with display:
        on_round(ROUND)
    task = display.tasks[0]
    assert (task.completed, task.total) == (1, 3) and "4 accepted" in task.fields["info"]
    assert "round 1/3:" not in capsys.readouterr().out


@pytest.mark.parametrize("terminal, lines", [("0", ["sweep 1/2: none-epsinf-seed0: done"]), ("1", [])])
def test_a_sweep_logs_plain_lines_only_when_not_on_a_terminal(capsys, monkeypatch, terminal, lines):
    monkeypatch.setenv("TTY_COMPATIBLE", terminal)
    display, log = _progress_display(enabled=True)
    assert display.disable is (terminal == "0")
    log("sweep 1/2: none-epsinf-seed0: done")
    assert capsys.readouterr().err.splitlines() == lines
    display, log = _progress_display(enabled=False)         # --no-progress: neither
    log("anything")
    assert display.disable and capsys.readouterr().err == ""

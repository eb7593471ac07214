"""A new user's mistakes: each is one line on stderr with a non-zero exit code and no traceback,
and nothing is overwritten or left behind (no folder, no temporary secret key, no process).

The fast tests call ``carbonfed.federation.cli.main`` in this process; the slow ones start
``carbonfed run`` as a subprocess and stop it with a signal.
"""

from __future__ import annotations

import hashlib
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
from carbonfed.federation.cli import main
from carbonfed.federation.config import RunConfig
from carbonfed.federation.run import Lifecycle
from carbonfed.privacy.he import key_fingerprint, keygen, load_secret_context
from carbonfed.privacy.ledger import read_ledger

BIN = Path(sys.executable).parent / "carbonfed"
ENV = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0"}


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch):
    """Temporary key folders of this test go to its own folder, so that 'none left' is exact."""
    tmp = tmp_path / "system-tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``carbonfed ARGV`` run in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:        # argparse and `verify` end with SystemExit
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and ("error:" in lines[0] or "interrupted" in lines[0])
    for needle in needles:
        assert needle in lines[0], lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and its SHA-256: 'nothing overwritten, nothing added'."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- keygen ---------------------------------------------------------------------------------------

def test_keygen_refuses_a_folder_with_keys_unless_forced(capsys, tmp_path, private_tmp):
    keys = tmp_path / "keys"
    keygen(keys)
    before = snapshot(keys)
    code, _, err = cli(capsys, "keygen", "--out", keys)
    assert code == 2
    one_line_error(err, str(keys), "already holds HE keys", "--force")
    assert snapshot(keys) == before                                   # secret.ctx not replaced
    code, _, _ = cli(capsys, "keygen", "--out", keys, "--force")
    assert code == 0
    assert snapshot(keys)["secret.ctx"] != before["secret.ctx"]
    assert list(private_tmp.iterdir()) == []


# -- run: the output folder -----------------------------------------------------------------------

@pytest.mark.parametrize("files, needle", [
    ({"report.json": "{}", "report.html": "<html>mine</html>", "notes.txt": "keep"}, "holds no carbonfed run"),
    ({"ledger.jsonl": ""}, "already holds a run (ledger.jsonl)"),
    ({"run.json": "{}"}, "carbonfed run --resume --out"),
])
def test_run_refuses_a_folder_that_is_not_empty(capsys, tmp_path, private_tmp, files, needle):
    out = tmp_path / "mine"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    before = snapshot(out)
    code, _, err = cli(capsys, "run", "--data-dir", resolve_data_dir(None), "--out", out)
    assert code == 2
    one_line_error(err, needle)
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted(files)
    assert list(private_tmp.iterdir()) == []


# -- run: settings -------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value, key", [
    ("--lr", "nan", "lr"), ("--delta", "0.5", "delta must be below 1/max-client-samples"),
    ("--max-grad-norm", "-1", "max-grad-norm"), ("--param-clip", "0", "param-clip"),
    ("--epsilon", "inf", "epsilon"), ("--momentum", "1", "momentum"), ("--round-timeout", "nan", "round-timeout"),
    ("--stats-noise-multiplier", "-inf", "stats-noise-multiplier"), ("--min-train-clients", "0", "min-train-clients"),
    ("--lr", "abc", "--lr"),                                        # not a number at all: argparse's error
])
def test_an_invalid_setting_is_one_line_and_creates_nothing(capsys, tmp_path, private_tmp, option, value, key):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "run", "--data-dir", resolve_data_dir(None), option, value, "--out", out)
    assert code == 2
    one_line_error(err, key)
    assert not out.exists() and list(private_tmp.iterdir()) == []


def test_delta_bound_is_one_over_the_largest_client():
    """δ < 1/max-client-samples with DP (a mechanism publishing each row with probability δ is
    (0, δ)-DP): 1e-3 passes at 512 rows per client, not at 2048; without DP δ is not used."""
    assert RunConfig(delta=1e-3).delta == 1e-3
    with pytest.raises(ValueError, match=r"delta must be below 1/max-client-samples = 0.000488"):
        RunConfig(delta=1e-3, max_client_samples=2048)
    assert RunConfig(privacy="none", delta=0.5).delta == 0.5


def test_a_failed_start_leaves_no_key_and_no_folder(tmp_path, private_tmp):
    """The run's keys exist once it has started; an engine failure before the first checkpoint
    removes them, and the folder the run made (nothing to resume)."""
    out = tmp_path / "run"
    run = Lifecycle.start(out, {"dataset": "seed", "data_dir": "", "privacy": "dp+he"}, None)
    keys = Path(run.cfg.keys_dir)
    assert (keys / "secret.ctx").exists() and keys.is_relative_to(private_tmp)

    def engine(cfg):
        raise RuntimeError("the engine failed in its setup")
    with pytest.raises(RuntimeError, match="engine failed"):
        run.complete(engine)
    assert not out.exists() and list(private_tmp.iterdir()) == []


def test_a_run_that_fails_in_its_setup_says_why_in_one_line(capsys, tmp_path, private_tmp):
    """The engine's error, with the clients' most common rejection reason from the ledger (read
    before the run, which has no checkpoint, is removed), exit code 1, nothing left."""
    from carbonfed.federation.run import run_in_console
    from carbonfed.privacy.ledger import Ledger

    out = tmp_path / "run"
    run = Lifecycle.start(out, {"dataset": "seed", "data_dir": "", "privacy": "dp+he"}, None)

    def engine(cfg, on_round, verbose):
        ledger = Ledger(out / "ledger.jsonl")
        for country in ("Aland", "Borduria", "Carpania"):
            ledger.append({"kind": "setup", "round": 0, "country": country, "status": "rejected",
                           "reason": "client error: Traceback (most recent call last):\n  ...\nValueError: bad column"})
        raise RuntimeError("only 0 training clients answered the setup (min-train-clients=2)")
    assert run_in_console(run, engine, verbose=False) == 1
    one_line_error(capsys.readouterr().err, "the run failed: only 0 training clients answered the setup",
                   "3 client replies rejected; 3 with: ValueError: bad column", "nothing was kept")
    assert not out.exists() and list(private_tmp.iterdir()) == []


# -- run --resume --------------------------------------------------------------------------------

def test_resume_refuses_options_that_differ_from_the_run(capsys, tmp_path, private_tmp):
    out = tmp_path / "run"
    run = Lifecycle.start(out, {"dataset": "seed", "data_dir": "", "privacy": "none"}, None)
    before = snapshot(out)
    code, _, err = cli(capsys, "run", "--resume", "--out", out, "--epsilon", "1", "--rounds", "30", "--privacy", "dp")
    assert code == 2
    one_line_error(err, "--epsilon 1.0 (the run's: 3.0)", "--privacy dp (the run's: 'none')")
    assert "--rounds" not in err                                     # the same as recorded: fine
    assert snapshot(out) == before
    assert Lifecycle.resume(out, {"rounds": 30, "data_dir": run.cfg.data_dir}).cfg == run.cfg


# -- report and verify: whose keys ---------------------------------------------------------------

def he_run_folder(folder: Path, keys_dir: Path, fingerprint: str, own_keys: bool) -> Path:
    """The records ``report`` reads first: server.json (config, key fingerprint), run.json, report.json."""
    folder.mkdir()
    cfg = RunConfig(privacy="dp+he", keys_dir=str(keys_dir), out_dir=str(folder))
    (folder / "server.json").write_text(json.dumps({"config": cfg.to_flower(), "he": {"key_fingerprint": fingerprint}}))
    (folder / "run.json").write_text(json.dumps({"config": cfg.to_flower(), "own_keys": own_keys}))
    (folder / "report.json").write_text(json.dumps({"written": "at the run's end"}))
    return folder


def test_report_of_a_run_whose_temporary_keys_are_gone(capsys, tmp_path):
    gone = tmp_path / "carbonfed-keys-abc" / "keys"
    run = he_run_folder(tmp_path / "run", gone, "ab" * 32, own_keys=True)
    before = snapshot(run)
    code, _, err = cli(capsys, "report", run)
    assert code == 2
    one_line_error(err, "were temporary", "cannot be decrypted again", "report.json", f"carbonfed verify {run}")
    assert "create one with" not in err
    assert snapshot(run) == before


def test_report_with_another_runs_keys(capsys, tmp_path):
    ours, other = tmp_path / "ours", tmp_path / "other"
    keygen(ours)
    keygen(other)
    fingerprint = key_fingerprint(load_secret_context(ours / "secret.ctx"))
    run = he_run_folder(tmp_path / "run", ours, fingerprint, own_keys=False)
    before = snapshot(run)
    code, _, err = cli(capsys, "report", run, "--keys", other)
    assert code == 2
    one_line_error(err, "these are not this run's keys", fingerprint[:16], str(other / "secret.ctx"))
    assert snapshot(run) == before
    code, _, err = cli(capsys, "verify", run, "--keys", other)      # verify needs no keys at all
    assert code == 2
    one_line_error(err, "--keys")
    assert snapshot(run) == before


# (--help of every command: test_cli_help.py)


# -- a run stopped by a signal (subprocess, Linux /proc) -----------------------------------------

def processes() -> dict[int, tuple[int, int, str]]:
    """pid → (parent pid, start time, command line) of every process (from /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z":                                 # zombies are dead
                table[int(entry.name)] = (int(fields[1]), int(fields[19]), cmd or stat[stat.index("("):])
    return table


def descendants(root: int) -> dict[int, tuple[int, int, str]]:
    table, found, frontier = processes(), {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, info in table.items():
            if info[0] == parent and pid not in found:
                found[pid] = info
                frontier.append(pid)
    return found


def still_alive(snapshot: dict, wait_s: float = 30.0) -> list[str]:
    """The command lines of ``snapshot``'s processes still running after up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        table = processes()
        alive = [info[2] for pid, info in snapshot.items() if pid in table and table[pid][1] == info[1]]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def start_run(out: Path, log: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    args = ["--data-dir", str(resolve_data_dir(None)), "--rounds", "2", "--local-epochs", "1",
            "--batches-per-epoch", "2", "--out", str(out), *extra]
    return subprocess.Popen([str(BIN), "run", *args], stdout=subprocess.DEVNULL, stderr=log.open("w"), env=ENV,
                            start_new_session=True)


def wait_for(proc: subprocess.Popen, ready, timeout: float = 400.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the run ended or stalled before the signal (exit {proc.poll()})")
        time.sleep(0.2)


def checkpoint_round(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint.json").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return -1


def stop(proc: subprocess.Popen, sig: int) -> tuple[int, dict]:
    """Send ``sig`` to the ``carbonfed run`` process alone; its exit code and its process tree as it was."""
    tree = descendants(proc.pid)
    assert any("raylet" in cmd for _, _, cmd in tree.values()), "Ray is not running"
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=120), tree
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the run did not end within 120 s of the signal")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--privacy", "ddp+he")], ids=["dp+he", "ddp+he-masked"])
def test_sigterm_after_round_1_shuts_ray_down_and_the_run_resumes(tmp_path, extra):
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    proc = start_run(out, log, extra)
    wait_for(proc, lambda: checkpoint_round(out) >= 1)
    code, tree = stop(proc, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, log.read_text()[-3000:]
    one_line_error(log.read_text(), "interrupted (SIGTERM)", "round 1",
                   f"carbonfed run --resume --out {out}")
    assert still_alive(tree) == []                                   # no raylet, gcs_server or ray:: worker
    assert list(out.glob(".carbonfed-app-*")) == []
    keys = Path(json.loads((out / "run.json").read_text())["config"]["keys-dir"])
    assert checkpoint_round(out) == 1 and (keys / "secret.ctx").exists()

    res = subprocess.run([str(BIN), "run", "--resume", "--out", str(out)], capture_output=True, text=True,
                         timeout=900, env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr == ""                                          # no third-party warning on a normal run
    assert not keys.parent.exists()
    if extra:              # the resumed ddp+he run masks again (new adverts) and releases round 2 (audit: exit 0)
        rounds = {r["round"]: r for r in read_ledger(out / "ledger.jsonl") if r["kind"] == "round"}
        assert sorted(rounds) == [1, 2]
        assert all(r["ddp"]["released"] and r["masks"]["status"] == "unmasked" for r in rounds.values())
    report = (out / "report.json").read_bytes()
    res = subprocess.run([str(BIN), "report", str(out)], capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 2
    one_line_error(res.stderr, "were temporary", "cannot be decrypted again", f"carbonfed verify {out}")
    assert (out / "report.json").read_bytes() == report


@pytest.mark.slow
def test_sigint_before_the_first_checkpoint_leaves_nothing(tmp_path):
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    proc = start_run(out, log)
    wait_for(proc, lambda: (out / "run.json").exists() and any("raylet" in c for _, _, c in descendants(proc.pid).values()))
    keys = Path(json.loads((out / "run.json").read_text())["config"]["keys-dir"])
    assert (keys / "secret.ctx").exists() and checkpoint_round(out) == -1
    time.sleep(1.5)             # while the raylet still starts its agents (they outlived it before the fix)
    code, tree = stop(proc, signal.SIGINT)
    assert code == 128 + signal.SIGINT, log.read_text()[-3000:]
    one_line_error(log.read_text(), "interrupted (SIGINT)", "nothing was kept")
    assert still_alive(tree) == []
    assert not out.exists() and not keys.parent.exists()

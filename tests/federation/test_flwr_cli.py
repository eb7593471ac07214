"""End to end through Flower's own CLI: ``flwr run .`` (Flower 1.42) runs the app, then
``carbonfed report`` decrypts/verifies it.

Runs in a temporary copy of the repository with a temporary ``FLWR_HOME`` and its own local
SuperLink ports, so it neither touches the working tree nor ``~/.flwr`` nor a SuperLink the user
may already have running. ``flwr run`` starts a detached local SuperLink (plus SuperExec,
``flwr-simulation`` and a Ray cluster) that outlives the command: every process started here
carries a unique marker in its environment, and the ``finally`` block kills each of them by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from carbonfed.privacy.audit.verify import verify_run
from carbonfed.privacy.ledger import read_ledger

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MARKER = "CARBONFED_FLWR_CLI_TEST"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked_pids(token: str) -> list[int]:
    """PIDs of live processes whose environment holds ``MARKER=token`` (all started here)."""
    needle = f"{MARKER}={token}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":  # zombies are already dead
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _kill_marked(token: str, grace: float = 10.0) -> list[int]:
    """SIGTERM every marked process (SuperLink first), then SIGKILL whatever is left."""
    pids = _marked_pids(token)
    for pid in sorted(pids, key=lambda p: "flower-superlink" not in _cmdline(p)):
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _marked_pids(token):
        time.sleep(0.2)
    for pid in _marked_pids(token):
        _signal(pid, signal.SIGKILL)
    time.sleep(0.5)
    return _marked_pids(token)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _copy_repo(dst: Path) -> None:
    """The files git would see (tracked and untracked-but-not-ignored), else a filtered copy."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            check=True, capture_output=True, timeout=30,
        ).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        files = []
    if files:
        for rel in files:
            src = REPO / rel
            if src.is_file():
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst / rel)
    else:
        shutil.copytree(REPO, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", "runs", "out", "keys"))


@pytest.mark.parametrize("privacy", ["dp", "ddp+he"])     # ddp+he: HE keys, masks on (its preset), issue 19
def test_flwr_run_dot_end_to_end(tmp_path, seed_data, privacy):
    n_countries = len(seed_data.countries())
    from carbonfed.data.locate import resolve_data_dir

    data_dir = str(resolve_data_dir(None))  # absolute: the SuperLink runs the app elsewhere

    app = tmp_path / "app"
    app.mkdir()
    _copy_repo(app)
    out = tmp_path / "out"
    token = uuid.uuid4().hex
    env = {
        **os.environ,
        MARKER: token,
        "FLWR_HOME": str(tmp_path / "flwrhome"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    # the clients act only under a charter they endorsed: keygen writes their keys and the job's charter
    keys = tmp_path / "keys"
    kg = subprocess.run([str(BIN / "carbonfed"), "keygen", "--out", str(keys), "--privacy", privacy, "--rounds", "2",
                         "--data-dir", data_dir], capture_output=True, text=True, timeout=300)
    assert kg.returncode == 0, kg.stdout[-2000:] + kg.stderr[-2000:]
    run_config = (f"privacy='{privacy}' rounds=2 data-dir='{data_dir}' out-dir='{out}' keys-dir='{keys}' "
                  f"charter='{keys / 'charter.json'}'")
    cmd = [str(BIN / "flwr"), "run", ".", "--stream",
           "--federation-config", f"num-supernodes={n_countries}",
           "--run-config", run_config]
    try:
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=app, env=env, capture_output=True, text=True, timeout=480)
        elapsed = time.monotonic() - t0
        log = proc.stdout[-4000:] + proc.stderr[-4000:]
        assert proc.returncode == 0, log
        assert "Successfully started run" in proc.stdout, log
        # the marker must find the detached SuperLink, or the cleanup below would miss it
        assert any("flower-superlink" in _cmdline(p) for p in _marked_pids(token)), log
        # `--stream` returns when the run is over; server.json is the ServerApp's last write.
        assert (out / "server.json").exists(), log
        assert (out / "ledger.jsonl").stat().st_size > 0
        server = json.loads((out / "server.json").read_text())
        assert server["rounds_completed"] == 2
        assert server["config"]["privacy"] == privacy

        rep = subprocess.run([str(BIN / "carbonfed"), "report", str(out)],
                             cwd=REPO, env={**os.environ, MARKER: token},
                             capture_output=True, text=True, timeout=120)
        assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
        report = json.loads((out / "report.json").read_text())
        assert report["rounds"] == 2 and report["privacy_mode"] == privacy
        assert set(report["metrics"]) >= {"accuracy", "macro_f1"}
        clients = report["clients"]
        assert clients["train"] + clients["test"] == n_countries  # one SuperNode per country
        if privacy == "ddp+he":     # every round released with all training clients' shares; verify agrees
            rounds = [r for r in read_ledger(out / "ledger.jsonl") if r["kind"] == "round"]
            assert all(r["ddp"]["contributors"] == clients["train"] and r["masks"]["status"] == "unmasked"
                       for r in rounds) and len(rounds) == 2
            res = verify_run(out)
            assert res.ok, res.problems
            assert abs(report["privacy"]["ddp"]["epsilon_central"] - res.ddp["epsilon"]) <= 0.01 * res.ddp["epsilon"]
        print(f"flwr run: {elapsed:.1f}s")
    finally:
        left = _kill_marked(token)
        assert not left, f"processes still alive after SIGKILL: {[_cmdline(p) for p in left]}"

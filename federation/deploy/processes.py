"""A process supervisor: start the processes of a deployment, find them again and stop them, by PID.

Guarantees
----------
* Every process started through :class:`Processes` carries ``CARBONFED_DEPLOY_MARKER=<marker>/<role>``
  in its environment, and so does everything it spawns (the environment is inherited):
  :func:`marked_pids` finds them all, grandchildren included, by reading ``/proc``.
* :meth:`Processes.kill` signals only marked processes, each by PID; what is still alive after
  the grace period gets SIGKILL; if anything survives SIGKILL it raises :class:`DeployError`.
  :meth:`Processes.close` stops every marked process and closes the log files.
* Inside :func:`signals_raise`, SIGTERM and SIGHUP raise ``SystemExit`` (as SIGINT raises
  ``KeyboardInterrupt``), so that the ``finally`` that stops the processes runs.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("carbonfed.deploy")

MARKER_ENV = "CARBONFED_DEPLOY_MARKER"  # environment marker of every process started here
CWD_ENV = "CARBONFED_DEPLOY_CWD"        # the working folder of every process started here


class DeployError(RuntimeError):
    """The deployment could not be brought up or the run did not finish."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:``port`` now (as uvicorn and gRPC bind: with
    SO_REUSEADDR, so a closed listener's TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _proc_marker(pid: int, env_name: str = MARKER_ENV) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = fh.read().split(b"\0")
    except OSError:
        return None
    prefix = env_name.encode() + b"="
    for item in env:
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace")
    return None


def _alive(pid: int) -> bool:
    """Running (a zombie, already dead and only waiting to be reaped, does not count)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def marked_pids(marker: str, env_name: str = MARKER_ENV) -> list[int]:
    """PIDs of the live processes (this one excepted) whose environment carries ``env_name=marker``
    (exactly, or as ``marker/<role>``): every process a deployment started, including grandchildren."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            m = _proc_marker(int(entry), env_name)
            if m is not None and (m == marker or m.startswith(marker + "/")) and _alive(int(entry)):
                out.append(int(entry))
    return sorted(out)


def stop_pids(find, sig: int = signal.SIGTERM, grace: float = 5.0, reap=lambda: None) -> None:
    """Send ``sig`` to every PID ``find()`` returns, by PID, until it returns none; what is still
    alive ``grace`` seconds later gets SIGKILL. ``reap`` collects exited children of this process.
    Raises :class:`DeployError` if a process survives SIGKILL for 10 s."""
    deadline = time.monotonic() + grace
    sent: set[int] = set()
    while pids := find():
        late = time.monotonic() > deadline
        for pid in pids:
            if late or pid not in sent:
                try:
                    os.kill(pid, signal.SIGKILL if late else sig)
                except ProcessLookupError:
                    pass
                sent.add(pid)
        reap()
        time.sleep(0.2)
        if time.monotonic() > deadline + 10:
            raise DeployError(f"processes {pids} survive SIGKILL")
    reap()


def _start_times() -> dict[int, tuple[int, int]]:
    """``pid -> (parent pid, start time in clock ticks)`` of every live process (zombies excepted)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] not in (b"Z", b"X"):
                table[int(entry)] = (int(fields[1]), int(fields[19]))
    return table


def marked_tree(marker: str, env_name: str) -> dict[int, int]:
    """``pid -> start time`` of the processes whose environment carries ``env_name=marker`` and of all
    their descendants. A descendant may no longer show the marker: a process that sets its title
    (``setproctitle``, as Ray's agents and workers do) overwrites the memory ``/proc/PID/environ`` reads."""
    table = _start_times()
    found = {pid: table[pid][1] for pid in marked_pids(marker, env_name) if pid in table}
    frontier = list(found)
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def stop_marked(marker: str, env_name: str, grace_s: float = 5.0, known: dict[int, int] | None = None) -> None:
    """Stop (SIGTERM, then SIGKILL after ``grace_s``) every live process of :func:`marked_tree`, and those
    of ``known`` (an earlier :func:`marked_tree`: children orphaned since) that still run with the same
    start time (so a reused PID is never signalled); waits until none is left."""
    known = dict(known or {})

    def find() -> list[int]:
        known.update(marked_tree(marker, env_name))
        table = _start_times()
        return sorted(pid for pid, start in known.items() if pid in table and table[pid][1] == start
                      and pid != os.getpid())

    stop_pids(find, signal.SIGTERM, grace_s)


class Processes:
    """The processes of one deployment, each tagged ``<marker>/<role>`` in its environment; the
    long-running ones log to ``log_dir/<role>.log``."""

    def __init__(self, marker: str, env: dict[str, str], log_dir: Path):
        self.marker, self.env, self.log_dir = marker, env, log_dir
        self.popen: dict[str, subprocess.Popen] = {}
        self._logs: list = []
        self._lock = threading.Lock()

    def env_for(self, role: str) -> dict[str, str]:
        return {**self.env, MARKER_ENV: f"{self.marker}/{role}"}

    @property
    def cwd(self) -> str | None:
        return self.env.get(CWD_ENV)

    def start(self, role: str, argv: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.log_dir / f"{role}.log", "ab")
        self._logs.append(fh)
        p = subprocess.Popen(argv, env=self.env_for(role), stdout=fh, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.cwd)
        with self._lock:
            self.popen[role] = p
        log.debug("started %s (pid %d): %s", role, p.pid, " ".join(argv))
        return p

    def run(self, role: str, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        """A short-lived command (the flwr CLI), marked like the others."""
        return subprocess.run(argv, env=self.env_for(role), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, cwd=self.cwd)

    def run_all(self, role: str, argvs: list[list[str]], timeout: float = 120) -> list[subprocess.CompletedProcess]:
        """Short-lived commands run concurrently, marked like the others; in the order given."""
        running = [subprocess.Popen(argv, env=self.env_for(role), text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=self.cwd)
                   for argv in argvs]
        done = []
        for p in running:
            stdout, stderr = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
        return done

    def pids(self, role: str | None = None) -> list[int]:
        tag = self.marker if role is None else f"{self.marker}/{role}"
        return [p for p in marked_pids(self.marker) if role is None or _proc_marker(p) == tag]

    def exited(self, role: str) -> int | None:
        """The exit code of the process last started as ``role``, None if it runs (or never ran)."""
        p = self.popen.get(role)
        return None if p is None else p.poll()

    def kill(self, role: str | None = None, sig: int = signal.SIGKILL, grace: float = 5.0) -> None:
        """Send ``sig`` to every live process of ``role`` (all roles if None), by PID; what is
        still alive ``grace`` seconds later gets SIGKILL. Reaps the direct children."""
        stop_pids(lambda: self.pids(role), sig, grace, self._reap)

    def _reap(self) -> None:
        with self._lock:
            for p in self.popen.values():
                p.poll()

    def close(self) -> None:
        self.kill(None, signal.SIGTERM)
        for fh in self._logs:
            fh.close()


@contextmanager
def signals_raise():
    """SIGTERM/SIGHUP raise SystemExit (SIGINT raises KeyboardInterrupt anyway), so that the
    ``finally`` that stops every process runs. Only possible in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)

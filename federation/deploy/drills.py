"""Fault drills of a local deployment, and following its run through the ledger.

Guarantees
----------
* ``kill_client_in_round=k`` SIGKILLs one training SuperNode (the last in order) and its ClientApp
  as soon as that ClientApp runs for round k (after round k-1 is recorded; for k = 1, after the
  statistics release), and starts the node again once round k is recorded, with the same key
  and state folder (on another port if its own was taken meanwhile): its ε continues, it is not reset.
* ``restart_server_after_round=k`` SIGKILLs the SuperLink and the ServerApp right after round k
  is recorded, starts a new SuperLink on the same database, stops the dead run and submits the
  run again with the same out-dir: the ServerApp resumes from its checkpoint of round k.
* Each drill fires at most once; with neither set, :meth:`Drills.step` does nothing.
  :meth:`Drills.check` refuses a round outside the run before anything starts.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from carbonfed.federation.deploy.deployment import Deployment, Node
from carbonfed.federation.deploy.processes import free_port, port_free


def say(msg: str) -> None:
    """One timestamped progress line of ``carbonfed deploy`` on stdout."""
    print(f"[deploy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def round_lines(ledger: Path) -> list[dict]:
    """The ledger's round summaries so far (a line being written is skipped)."""
    if not ledger.exists():
        return []
    out = []
    for line in ledger.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue                # a line being written
        if rec.get("kind") == "round":
            out.append(rec)
    return out


def show_rounds(rounds: list[dict], seen: int) -> int:
    """Say each round after the first ``seen``; returns how many are shown in all."""
    for r in rounds[seen:]:
        say(f"round {r['round']}: {r['accepted']} accepted, {r['rejected']} rejected, "
            f"{r['evaluated']} evaluated, {r['seconds']:.1f}s"
            + (f", ε_max={r['epsilon_max']:.3f}" if r.get("epsilon_max") is not None else ""))
    return len(rounds)


def setup_done(ledger: Path) -> bool:
    """The statistics release is recorded."""
    if not ledger.exists():
        return False
    return any('"kind": "stats"' in line for line in ledger.read_text().splitlines())


@dataclass
class Drills:
    """The fault drills of one run; ``emit(name, info)`` is told of each (``"killed"``,
    ``"restarted-server"``, ``"restarted-client"``)."""

    kill_client_in_round: int | None = None
    restart_server_after_round: int | None = None
    emit: Callable[[str, dict], None] = field(default=lambda name, info: None)
    victim: Node | None = None
    killed: bool = False
    back: bool = False
    restarted: bool = False

    def check(self, rounds: int) -> None:
        for what, k, last in (("kill-client-in-round", self.kill_client_in_round, rounds),
                              ("restart-server-after-round", self.restart_server_after_round, rounds - 1)):
            if k is not None and not 1 <= k <= last:
                raise ValueError(f"{what}={k}: must lie in 1..{last} for a run of {rounds} rounds")

    def step(self, dep: Deployment, done: set[int], run_id: int, app_dir: Path) -> int:
        """Fire the drills due now that the rounds ``done`` are recorded; returns the run id (a
        new one after a server restart)."""
        if self.victim is None:
            self.victim = next((n for n in reversed(dep.nodes) if n.role == "train"), None)
        k = self.kill_client_in_round
        if k and not self.killed and self.victim is not None and (
                (k - 1) in done or (k == 1 and setup_done(dep.out / "ledger.jsonl"))):
            self._kill_client(dep, k)
        if self.restart_server_after_round and not self.restarted and self.restart_server_after_round in done:
            run_id = self._restart_server(dep, run_id, app_dir)
        if self.killed and not self.back and k in done:
            if not port_free(self.victim.port):    # taken meanwhile (an ephemeral port, on a busy machine)
                self.victim.port = free_port()      # its identity is its key, not its port
            dep.start_node(self.victim)
            self.back = True
            say(f"restarted the SuperNode of {self.victim.country} (same key and state folder)")
            self.emit("restarted-client", {"country": self.victim.country, "node_id": self.victim.node_id})
        return run_id

    def _kill_client(self, dep: Deployment, k: int) -> None:
        """SIGKILL the victim's SuperNode while round k is under way."""
        victim = self.victim
        working = dep.wait_clientapp(victim, timeout=60)   # its ClientApp got the round's message
        dep.procs.kill(victim.process, signal.SIGKILL)
        self.killed = True
        say(f"SIGKILLed the SuperNode of {victim.country} (node {victim.node_id}) "
            + ("and its running ClientApp " if working else "") + f"during round {k}")
        self.emit("killed", {"country": victim.country, "node_id": victim.node_id, "round": k})

    def _restart_server(self, dep: Deployment, run_id: int, app_dir: Path) -> int:
        """Kill the SuperLink and the ServerApp, restart the SuperLink, resubmit (the run resumes)."""
        k = self.restart_server_after_round
        dep.procs.kill("superlink", signal.SIGKILL)
        say(f"SIGKILLed the SuperLink and the ServerApp after round {k}")
        dep.start_superlink()
        dep.stop_run(run_id)            # it died with its ServerApp: no node should work for it
        dep.wait_online([n for n in dep.nodes if n is not self.victim or not self.killed or self.back], timeout=180)
        old, run_id = run_id, dep.submit(app_dir)
        self.restarted = True
        say(f"SuperLink restarted on the same database; run {run_id} submitted (resumes from the "
            f"checkpoint of round {k})")
        self.emit("restarted-server", {"old_run": old, "run_id": run_id})
        return run_id

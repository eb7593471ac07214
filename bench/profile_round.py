"""CPU profile of one carbonfed round, clients and server apart, in one process (no Ray).

Usage: python bench/profile_round.py [--mode none|dp|he|dp+he] [--masks] [--rounds 3] [--profile-round 2]
       [--top 25] [--out DIR]

The seed main job (``--hidden linear --stats-stages 3 --average-last 10``, as
``bench/round_time.py``) runs with carbonfed's own ServerApp pieces (setup, then
:class:`~carbonfed.federation.server.loop.ResumableRun` rounds: courier, recorder, ledger,
checkpoint) and its own ClientApp (``carbonfed.federation.client.app.app``, state on disk in
``.client-state`` as ``carbonfed run`` keeps it), every message delivered in this process by
:class:`InProcessGrid` (a ``flwr.serverapp.Grid``: what the simulation's SuperLink and Ray
actors would carry, without them). Every round's CPU and wall milliseconds per message kind
are printed; one round (``--profile-round``, default 2: warm caches, as rounds 2..R of
``bench/round_time.py``) is also profiled with ``cProfile`` on CPU time (``time.process_time``: what
other load on a shared machine does not change), one profile for the ClientApp calls and one for
the server's own work (the profiler's overhead inflates that round's figures: compare the round
before it), with the pickled sizes of a message and a node context (what Ray would carry per
message).

With ``--masks`` (HE modes) the run is masked (issue 22): after the setup the server's
:class:`~carbonfed.federation.server.masking.ServerMasks` collects the adverts and the first
bundles (as ``ResumableRun.start`` does), and every round carries its ``query.masks`` exchanges,
timed and profiled like the rest.

Prints the top functions of both profiles by own time and by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pickle
import pstats
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from carbonfed.data import resolve_data_dir
from carbonfed.federation.client.app import app as client_app
from carbonfed.federation.config import RunConfig
from carbonfed.federation.enrolment import sealed_simulation
from carbonfed.federation.flower_compat import act_as_server_app
from carbonfed.federation.keys import keygen_for
from carbonfed.federation.run_data import load_run_data
from carbonfed.federation.server.app import build_strategy
from carbonfed.federation.server.masking import ServerMasks
from carbonfed.federation.server.setup import setup

MAIN_JOB = {"hidden": "linear", "stats_stages": 3, "average_last": 10}


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process: ``pull_messages`` answers every
    pending message (each node keeps its own Context, as a SuperNode does), timed per message
    kind and, while ``client_prof`` is set, profiled apart from the server (whose profiler
    ``server_prof`` is paused meanwhile)."""

    def __init__(self, app, run_config: dict, num_nodes: int):
        self.app = app
        self.contexts = {pid + 1: Context(run_id=1, node_id=pid + 1, node_config={"partition-id": pid},
                                          state=RecordDict(), run_config=dict(run_config)) for pid in range(num_nodes)}
        self.pending: dict[str, Message] = {}
        self.client_prof: cProfile.Profile | None = None
        self.server_prof: cProfile.Profile | None = None
        self.times: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])   # kind -> [n, wall, cpu]
        self.sizes: dict[str, tuple[int, int]] = {}        # kind -> (pickled request, pickled context)

    @property
    def run(self):
        raise NotImplementedError("not needed by the pieces this bench runs")

    def set_run(self, run_id: int) -> None:
        pass

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            # as Flower 1.42.0's InMemoryGrid.push_messages: a pushed message has an id
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for mid in list(message_ids):
            msg = self.pending.pop(mid, None)
            if msg is not None:
                replies.append(self._deliver(msg))
        return replies

    def _deliver(self, msg: Message) -> Message:
        kind, ctx = msg.metadata.message_type, self.contexts[msg.metadata.dst_node_id]
        if kind not in self.sizes:
            self.sizes[kind] = (len(pickle.dumps(msg)), len(pickle.dumps(ctx)))
        if self.server_prof is not None:
            self.server_prof.disable()
        if self.client_prof is not None:
            self.client_prof.enable()
        t, c = time.perf_counter(), time.process_time()
        reply = self.app(msg, ctx)
        t, c = time.perf_counter() - t, time.process_time() - c
        if self.client_prof is not None:
            self.client_prof.disable()
        if self.server_prof is not None:
            self.server_prof.enable()
        entry = self.times[kind]
        entry[0] += 1
        entry[1] += t
        entry[2] += c
        reply.metadata.__dict__["_reply_to_message_id"] = msg.metadata.message_id
        return reply

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def _per_kind(grid: InProcessGrid) -> list[str]:
    out = []
    for kind, (n, wall, cpu) in sorted(grid.times.items()):
        req, ctx = grid.sizes.get(kind, (0, 0))
        out.append(f"  {kind}: {n} messages, {1e3 * wall / n:.1f} ms wall, {1e3 * cpu / n:.1f} ms CPU each; "
                   f"pickled request {req} B, node context {ctx} B")
    return out


def _top(prof: cProfile.Profile, sort: str, n: int) -> str:
    out = io.StringIO()
    pstats.Stats(prof, stream=out).strip_dirs().sort_stats(sort).print_stats(n)
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    return "\n".join(lines[start - 3:])


def profile(mode: str, rounds: int, profiled: int, out: Path, top: int, masks: bool = False) -> str:
    data_dir = str(resolve_data_dir(None))
    keys = out / "keys"
    cfg = RunConfig(privacy=mode, rounds=rounds, data_dir=data_dir, out_dir=str(out / "run"),
                    state_dir=str(out / "run" / ".client-state"), keys_dir=str(keys), reproducible_noise=True,
                    masks=masks, **MAIN_JOB)
    keygen_for([cfg], keys)
    num_nodes = len(load_run_data(cfg).countries())
    with sealed_simulation(replace(cfg, min_nodes=num_nodes)) as cfg:
        act_as_server_app(run_id=1)
        grid = InProcessGrid(client_app, cfg.to_flower(), num_nodes)
        run, _ = build_strategy(cfg, Path(cfg.out_dir))
        run.fedavg.state.charter = run.charter_sha256()
        t0 = time.perf_counter()
        setup(grid, run.courier, run.recorder)
        run.checkpoint()
        run.fedavg.masks = ServerMasks.for_run(run.fedavg, run.recorder, grid, run.courier)
        run.fedavg.metric_masks = ServerMasks.for_run(run.fedavg, run.recorder, grid, run.courier, "metrics")
        for masks in (run.fedavg.masks, run.fedavg.metric_masks):
            if masks is not None:
                masks.begin(1)                  # adverts, then round 1's bundles (as ResumableRun.start)
        report = [f"mode {mode}{' masked' if masks else ''}: setup {time.perf_counter() - t0:.2f} s wall"]
        report += _per_kind(grid)
        for rnd in range(1, rounds + 1):
            grid.times.clear()
            if rnd == profiled:
                grid.client_prof, grid.server_prof = (cProfile.Profile(time.process_time),
                                                      cProfile.Profile(time.process_time))
                grid.server_prof.enable()
            t, c = time.perf_counter(), time.process_time()
            run._round(grid, rnd, Result(), ConfigRecord(), ConfigRecord(), last=rnd == rounds)
            if rnd == profiled:
                grid.server_prof.disable()
                profiles = (grid.client_prof, grid.server_prof)
                grid.client_prof = grid.server_prof = None
            report.append(f"round {rnd}{' (profiled)' if rnd == profiled else ''}: {time.perf_counter() - t:.2f} s "
                          f"wall, {time.process_time() - c:.2f} s CPU (every client's work and the server's; the "
                          "courier's poll sleeps are wall only)")
            report += _per_kind(grid)
    client, server = profiles
    return "\n".join(report + [
        "", f"== ClientApp calls of round {profiled}, by own CPU time ==", _top(client, "tottime", top),
        f"== ClientApp calls of round {profiled}, by cumulative CPU time ==", _top(client, "cumulative", top),
        f"== server of round {profiled} (without the ClientApp calls), by own CPU time ==",
        _top(server, "tottime", top),
        f"== server of round {profiled}, by cumulative CPU time ==", _top(server, "cumulative", top)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default="none", choices=("none", "dp", "he", "dp+he", "ddp+he"))
    ap.add_argument("--masks", action="store_true", help="mask the run (issue 22; HE modes only)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile-round", type=int, default=2,
                    help="the round to profile (default 2: warm caches; the last round's ε was computed by the "
                         "noise calibration already)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not 1 <= args.profile_round <= args.rounds:
        ap.error("--profile-round must be one of the rounds run")
    out = Path(args.out or tempfile.mkdtemp(prefix="profile-round-"))
    print(profile(args.mode, args.rounds, args.profile_round, out, args.top, args.masks))


if __name__ == "__main__":
    main()

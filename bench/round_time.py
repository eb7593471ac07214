"""Seconds per round of every privacy mode against stock Flower FedAvg, in one run, side by side.

Usage: python bench/round_time.py [--rounds 8] [--modes none,dp,he,dp+he] [--out DIR] [--repeat 1]

Every line runs the seed data's countries as simulated SuperNodes (164: 131 train, 33 held out)
in Flower's simulation engine, with the same Ray backend settings, one after the other in this
process (``--repeat N`` runs the whole sequence N times, interleaved, and reports every pass):

``stock``
    plain ``flwr.serverapp.strategy.FedAvg`` through Flower's public ``run_simulation``, the same
    model (linear 21→5) and local schedule on the same nodes
    (:mod:`carbonfed.federation.experiments.stock_fedavg`).
``none``, ``dp``, ``he``, ``dp+he``
    ``carbonfed`` runs of the seed main job (``--hidden linear --stats-stages 3 --average-last
    10``) in each mode, as ``carbonfed run`` makes them (the clients' state on disk in the run's
    ``.client-state``); HE keys of the run's ring (:func:`carbonfed.federation.keys.keygen_for`).

Per line, ``seconds_per_round``: the mean wall time between consecutive round ends over rounds
2..R, measured in the ServerApp (round 1 carries the actors' warm-up, so it is reported apart as
``first_round_s``; carbonfed's setup round 0 is not a round); ``cpu_seconds_per_round``: the CPU
time (user + system) of this process and all its descendants (Ray's processes and the ClientApp
actors) over the same rounds, read from ``/proc``: what a round costs, which other load on a
shared machine does not change (``cpu_ratio_to_stock``). For carbonfed also the server's own
figure (the ledger's round ``seconds``, which ends before the round's checkpoint), the upload per
client per round and the accuracy. ``ratio_to_stock`` divides by the stock line of the same pass;
``targets``: ``none`` ≤ 1.5× and ``dp+he`` ≤ 2× stock (issue 21). Prints one JSON object.
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from carbonfed.federation.config import RunConfig
from carbonfed.federation.experiments.stock_fedavg import run_stock
from carbonfed.federation.keys import keygen_for
from carbonfed.federation.report.build import build_report
from carbonfed.federation.simulation import run_simulation
from carbonfed.privacy.ledger import read_ledger

MAIN_JOB = {"hidden": "linear", "stats_stages": 3, "average_last": 10}
MODES = ("none", "dp", "he", "dp+he")
TARGETS = {"none": 1.5, "dp+he": 2.0}
REFERENCE_UPLOAD = 1.41e6      # NVFlare-style CKKS upload of the seed MLP, bytes per client-round


def _tree_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and every descendant still running (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:          # the process ended meanwhile
                continue
            stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)   # ppid, utime + stime
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0.0))[1]
        todo += children.get(pid, [])
    return total


def _mark() -> tuple[float, float]:
    return time.monotonic(), _tree_cpu_seconds()


def _per_round(ends: list[tuple[float, float]]) -> dict:
    """Round figures from (time, CPU) at the round ends (``ends[0]``: the end of round 1)."""
    n = len(ends) - 1
    if n < 1:
        return {"seconds_per_round": None, "cpu_seconds_per_round": None, "rounds_timed": 0}
    return {"seconds_per_round": (ends[-1][0] - ends[0][0]) / n,
            "cpu_seconds_per_round": (ends[-1][1] - ends[0][1]) / n, "rounds_timed": n}


def measure_stock(rounds: int) -> dict:
    cfg = RunConfig(privacy="none", rounds=rounds, **MAIN_JOB)
    t0 = time.monotonic()
    ends, result = run_stock(cfg, mark=_mark)
    acc = result.evaluate_metrics_clientapp.get(rounds, {}) if result is not None else {}
    return {**_per_round(ends[1:]), "first_round_s": ends[1][0] - ends[0][0], "total_s": time.monotonic() - t0,
            "accuracy": acc.get("eval_acc")}


def measure(mode: str, rounds: int, out: Path, keys: Path) -> dict:
    cfg = RunConfig(privacy=mode, rounds=rounds, keys_dir=str(keys) if "he" in mode else "",
                    out_dir=str(out), state_dir=str(out / ".client-state"), **MAIN_JOB)   # as `carbonfed run`
    ends: list[tuple[float, float]] = []
    t0 = time.monotonic()
    run_simulation(cfg, on_round=lambda summary: ends.append(_mark()))
    total = time.monotonic() - t0
    rep = build_report(cfg.out_dir, keys if cfg.he else None)
    lines = [r for r in read_ledger(Path(cfg.out_dir) / "ledger.jsonl") if r.get("kind") == "round"]
    uploads = [r["upload_bytes_per_client"] for r in lines if r.get("upload_bytes_per_client")]
    server = [r["seconds"] for r in lines[1:]]
    return {**_per_round(ends), "first_round_s": lines[0]["seconds"], "total_s": total,
            "server_seconds_per_round": sum(server) / len(server) if server else None,
            "upload_bytes_per_client_round": sum(uploads) / len(uploads) if uploads else None,
            "accuracy": rep["metrics"]["accuracy"], "macro_f1": rep["metrics"]["macro_f1"],
            "epsilon_max": (rep["privacy"] or {}).get("epsilon_max")}


def one_pass(modes: list[str], rounds: int, out: Path, keys: Path) -> dict:
    res = {"stock": measure_stock(rounds)}
    for mode in modes:
        res[mode] = measure(mode, rounds, out / mode.replace("+", ""), keys)
        print(f"{mode}: {res[mode]['seconds_per_round']:.3f} s/round, {res[mode]['cpu_seconds_per_round']:.3f} "
              "CPU s/round", file=sys.stderr, flush=True)
    stock, stock_cpu = res["stock"]["seconds_per_round"], res["stock"]["cpu_seconds_per_round"]
    for mode in modes:
        res[mode]["ratio_to_stock"] = res[mode]["seconds_per_round"] / stock
        res[mode]["cpu_ratio_to_stock"] = res[mode]["cpu_seconds_per_round"] / stock_cpu
    res["targets"] = {m: {"ratio": res[m]["ratio_to_stock"], "cpu_ratio": res[m]["cpu_ratio_to_stock"], "at_most": limit,
                          "met": res[m]["ratio_to_stock"] <= limit} for m, limit in TARGETS.items() if m in res}
    if "dp+he" in res and res["dp+he"]["upload_bytes_per_client_round"]:
        res["reference upload / dp+he upload"] = REFERENCE_UPLOAD / res["dp+he"]["upload_bytes_per_client_round"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, among {MODES}")
    ap.add_argument("--repeat", type=int, default=1, help="passes over stock and the modes, one after the other")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if args.rounds < 3 or not set(modes) <= set(MODES):
        ap.error(f"--rounds must be >= 3 and --modes among {MODES}")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    out = Path(args.out or tempfile.mkdtemp(prefix="round-time-"))
    keys = out / "keys"
    keygen_for([RunConfig(privacy=m, **MAIN_JOB) for m in modes if "he" in m] or [RunConfig(**MAIN_JOB)], keys)
    passes = [one_pass(modes, args.rounds, out / f"pass{i}", keys) for i in range(args.repeat)]
    print(json.dumps({"rounds": args.rounds, "job": MAIN_JOB, "passes": passes} if args.repeat > 1
                     else {"rounds": args.rounds, "job": MAIN_JOB, **passes[0]}, indent=2))


if __name__ == "__main__":
    main()

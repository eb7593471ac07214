"""Issue 19's acceptance figures from real runs: ``ddp+he`` (and, side by side, ``dp+he``) through
Flower's simulation engine, one run per seed, held-out offset 0; prints one JSON object.

Usage: python bench/ddp_accuracy.py [--dataset seed] [--epsilon 3] [--seeds 0,1,2] [--rounds N]
       [--compare dp+he] [--masks auto|on|off] [--out DIR]

Per run: held-out accuracy and macro-F1 (``report.json``), ε_max that the clients charged, the
central ε of the released aggregates and the per-upload ε (``privacy.ddp``), whether the keyless
``carbonfed verify`` passed and how far its recomputation is from the claim, and the wall time of
the whole run (keys to report). ``--compare MODE`` runs MODE with its own defaults (the main job:
30 rounds) for the same seeds, one after the other, so that the wall-time ratio is measured on the
same machine in one invocation; ``--masks on|off`` puts both modes on the same footing (default:
each mode's preset). Means are over the seeds. Settings come from the data set's ddp
preset (:data:`carbonfed.federation.presets.DDP_PRESETS`, chosen on validation folds by
``bench/ddp_twin.py``; its rounds too unless ``--rounds`` is given); nothing here is tuned.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from carbonfed.federation.config import RunConfig
from carbonfed.federation.keys import keygen_for
from carbonfed.federation.run import write_results
from carbonfed.federation.simulation import run_simulation


def one_run(mode: str, dataset: str, epsilon: float, seed: int, rounds: int | None, out: Path,
            masks: str = "auto") -> dict:
    """One real run of ``mode`` (keys of its own ring, then report and keyless verify)."""
    settings = {"rounds": rounds} if rounds else {}
    settings["masks"] = {"on": True, "off": False}.get(masks, "auto")
    cfg = RunConfig(dataset=dataset, privacy=mode, epsilon=epsilon, seed=seed, out_dir=str(out / "run"),
                    keys_dir=str(out / "keys"), state_dir=str(out / "state"), **settings)
    t0 = time.monotonic()
    keygen_for(cfg, out / "keys")
    run_simulation(cfg)
    res = write_results(cfg.out_dir, cfg.keys_dir)
    seconds = time.monotonic() - t0
    rep, privacy = res.report, res.report["privacy"] or {}
    ddp = privacy.get("ddp") or {}
    return {"mode": mode, "seed": seed, "rounds": cfg.rounds, "masks": cfg.masks, "accuracy": rep["metrics"]["accuracy"],
            "macro_f1": rep["metrics"]["macro_f1"], "epsilon_max": privacy.get("epsilon_max"),
            "central_epsilon": ddp.get("epsilon_central"), "upload_epsilon": ddp.get("epsilon_per_upload"),
            "verify_central_epsilon": (res.audit.ddp or {}).get("epsilon"), "verify_ok": res.audit.ok, "verify_problems": res.audit.problems[:3], "seconds": round(seconds, 1)}


def mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return round(statistics.fmean(values), 4) if values else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="seed", help="seed or owid (default seed)")
    ap.add_argument("--epsilon", type=float, default=3.0, help="target ε (default 3)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--rounds", type=int, default=0, help="rounds of the ddp+he runs (default 0: the ddp preset's)")
    ap.add_argument("--compare", default="", help="a mode to run beside it with its own defaults (e.g. dp+he)")
    ap.add_argument("--masks", choices=("auto", "on", "off"), default="auto",
                    help="masks of every run: auto (each mode's preset: ddp+he on, dp+he off), on or off")
    ap.add_argument("--out", default="", help="folder for the runs (default: a temporary one)")
    args = ap.parse_args(argv)
    root = Path(args.out or tempfile.mkdtemp(prefix="ddp-bench-"))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    runs = {"ddp+he": [], **({args.compare: []} if args.compare else {})}
    for seed in seeds:
        for mode in runs:
            rounds = args.rounds if mode == "ddp+he" else None
            row = one_run(mode, args.dataset, args.epsilon, seed, rounds, root / f"{mode}-{seed}", args.masks)
            runs[mode].append(row)
            print(json.dumps(row), flush=True)
    summary = {mode: {k: mean(rows, k) for k in ("accuracy", "macro_f1", "epsilon_max", "central_epsilon",
                                                 "upload_epsilon", "seconds")} for mode, rows in runs.items()}
    if args.compare:
        summary["wall_time_ratio"] = round(summary["ddp+he"]["seconds"] / summary[args.compare]["seconds"], 2)
    print(json.dumps({"dataset": args.dataset, "epsilon": args.epsilon, "seeds": seeds, "mean": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

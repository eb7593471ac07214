"""Run the README's main job N times (secret DP noise, so each run differs) and summarise: prints
figures, no asserts.

Each run is a fresh ``carbonfed run`` process, as a user starts it, into ``OUT/run-K``; a run dir
that already holds a ``report.json`` is read, not run again, so an interrupted series resumes.
Prints each run's held-out accuracy, macro-F1, ε_max and run time, then the mean ± std and how
many runs meet issue 2's thresholds (accuracy ≥ 0.95 and macro-F1 ≥ 0.70), with a Wilson 95 %
interval for that rate.

Usage: python bench/repeat.py --runs 5 --out runs/repeat [--data-dir DIR] [-- extra run options]
(about 2 minutes per run on 2 cores)
"""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

MAIN_JOB = ["--hidden", "linear", "--stats-stages", "3"]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, mid - half), min(1.0, mid + half)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("extra", nargs="*", help="more `carbonfed run` options (after --)")
    args = ap.parse_args()
    carbonfed = Path(sys.executable).with_name("carbonfed")
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    rows = []
    for k in range(1, args.runs + 1):
        out = Path(args.out) / f"run-{k}"
        if not (out / "report.json").exists():
            cmd = [str(carbonfed), "run", *MAIN_JOB, *args.extra, "--out", str(out)]
            if args.data_dir:
                cmd += ["--data-dir", args.data_dir]
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        rep = json.loads((out / "report.json").read_text())
        m = rep["metrics"]
        row = (m["accuracy"], m["macro_f1"], (rep.get("privacy") or {}).get("epsilon_max"), rep["timing"]["total_s"])
        rows.append(row)
        print(f"run {k}: accuracy {row[0]:.4f}, macro-F1 {row[1]:.4f}, ε_max {row[2]}, {row[3]:.1f} s", flush=True)
    acc = [r[0] for r in rows]
    ok = sum(1 for a, f, _, _ in rows if a >= 0.95 and f >= 0.70)
    mean = sum(acc) / len(acc)
    std = math.sqrt(sum((a - mean) ** 2 for a in acc) / max(len(acc) - 1, 1))
    lo, hi = wilson(ok, len(rows))
    print(f"{len(rows)} runs: accuracy {mean:.4f} ± {std:.4f} (sample std), {min(acc):.3f}–{max(acc):.3f}; "
          f"both thresholds in {ok} of {len(rows)} (Wilson 95 % interval {lo:.2f}–{hi:.2f})")


if __name__ == "__main__":
    main()

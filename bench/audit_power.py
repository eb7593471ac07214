"""Issue 23's acceptance figures: the white-box canary audit of a correct ``dp+he`` run at ε = 3
(seed data, the main job) never refutes the claim, and its broken-noise drill (the clients
secretly draw a tenth of the noise they account; the ledger still claims ε = 3) always does.

Runs the main job once into ``OUT/run`` (``carbonfed run``, or reads it if it holds a
``report.json``), then ``--correct`` audits and ``--drills`` drill audits of it, white-box line only
(``audit_run(..., blackbox=False)``), one at a time. Each audit's record is kept in
``OUT/audits.jsonl`` (a series resumes where it stopped) and printed: bound, guesses, verdict, time.
Then the summary: how many correct audits stayed at or below the claim (all must), how many drills
refuted it (all must), and the range of the bounds. Prints figures; the exit code is 1 if an
acceptance line fails.

``--mode ddp+he`` does the same for the seed data's ``ddp+he`` main job (``carbonfed run --privacy
ddp+he``, its preset: 50 rounds; ``OUT/run-ddp+he``, ``OUT/audits-ddp+he.jsonl``): record canaries in
the clients' clipped sums, scored from every round's decrypted aggregate
(:mod:`carbonfed.federation.experiments.audit_ddp`); its drill draws the Skellam shares at a tenth
of the plan's noise. ``--rounds R`` passes ``--rounds R`` to ``carbonfed run`` (a shorter job).

Usage: python bench/audit_power.py --out runs/audit-power [--correct 10] [--drills 5]
       [--wb-canaries 10000] [--mode dp+he|ddp+he] [--rounds R]
       (dp+he: about 2-4 minutes per audit on an idle 2-core machine)
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from carbonfed.federation.experiments.audit_attack import audit_run
from carbonfed.federation.experiments.audit_whitebox import DEFAULT_CANARIES
from carbonfed.privacy.audit.empirical import AuditFailure


MODES = ("dp+he", "ddp+he")


def main_job(out: Path, mode: str = "dp+he", rounds: int = 0) -> Path:
    run = out / ("run" if mode == "dp+he" else f"run-{mode}")
    if not (run / "report.json").is_file():
        cmd = [str(Path(sys.executable).parent / "carbonfed"), "run", "--out", str(run)]   # the main job, fresh keys
        cmd += (["--privacy", mode] if mode != "dp+he" else []) + (["--rounds", str(rounds)] if rounds else [])
        subprocess.run(cmd, check=True, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    return run


def one_audit(run: Path, kind: str, m: int) -> dict:
    scale = 0.1 if kind == "drill" else 1.0
    try:
        res = audit_run(run, whitebox_canaries=m, blackbox=False, noise_scale=scale)
    except AuditFailure as exc:
        res = exc.result
    wb = res["whitebox"]
    return {"kind": kind, "verdict": res["verdict"], "claim": res["claim_tested"],
            "bound": wb["epsilon_lower_bound"], "bound_pure": wb["epsilon_lower_bound_pure"],
            "guesses": wb["guesses"], "correct": wb["correct"], "k": wb["k_per_side"], "score": wb["score"],
            "m": wb["m"], "canary_auc": wb["canary_auc"], "seconds": wb["seconds"],
            **{k: wb[k] for k in ("noise_sd_estimated", "noise_sd_accounted", "rounds_read") if k in wb}}


def summary(records: list[dict]) -> bool:
    ok = True
    for kind, want in (("correct", "consistent"), ("drill", "claim refuted")):
        rs = [r for r in records if r["kind"] == kind]
        if not rs:
            continue
        good = sum(r["verdict"] == want for r in rs)
        bounds = [r["bound"] for r in rs]
        print(f"{kind}: {good}/{len(rs)} {want}; bound min {min(bounds):.3f} mean {sum(bounds) / len(bounds):.3f} "
              f"max {max(bounds):.3f} (claim {rs[0]['claim']:.4f}); seconds per audit "
              f"{sum(r['seconds'] for r in rs) / len(rs):.0f}")
        ok &= good == len(rs)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the main job's run and the audit records")
    ap.add_argument("--correct", type=int, default=10, help="audits of the correct run (default 10)")
    ap.add_argument("--drills", type=int, default=5, help="audits with a tenth of the noise (default 5)")
    ap.add_argument("--wb-canaries", type=int, default=DEFAULT_CANARIES,
                    help=f"white-box canaries per audit (default {DEFAULT_CANARIES})")
    ap.add_argument("--mode", choices=MODES, default="dp+he", help="the main job's privacy mode (default dp+he)")
    ap.add_argument("--rounds", type=int, default=0, help="rounds of the main job (default: its preset's)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = main_job(out, args.mode, args.rounds)
    log = out / ("audits.jsonl" if args.mode == "dp+he" else f"audits-{args.mode}.jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    plan = ["drill"] * args.drills + ["correct"] * args.correct
    for kind in plan[len(records):]:
        rec = one_audit(run, kind, args.wb_canaries)
        records.append(rec)
        with open(log, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)
    return 0 if summary(records) else 1


if __name__ == "__main__":
    sys.exit(main())

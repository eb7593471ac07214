"""dp vs dp+he side by side on the seed run (131 training clients): seconds per round and upload.

Usage: python bench/round_time.py [--rounds 30] [--out /tmp/round-time]
Prints one JSON object: per mode the mean seconds per round (from the ledger's round lines,
measured by the server), upload bytes per client per round, accuracy; and the ratio dp+he / dp.
The reference's CKKS upload (NVFlare-style, one ciphertext per tensor) is 1.41 MB per client-round.
"""

import argparse
import json
import tempfile
from pathlib import Path

from carbonfed.federation.config import RunConfig
from carbonfed.federation.report.build import build_report
from carbonfed.federation.simulation import run_simulation
from carbonfed.privacy.he import keygen
from carbonfed.privacy.ledger import read_ledger

REFERENCE_UPLOAD = 1.41e6


def measure(mode: str, rounds: int, out: Path, keys: Path) -> dict:
    cfg = RunConfig(privacy=mode, rounds=rounds, keys_dir=str(keys), out_dir=str(out / mode.replace("+", "")))
    run_simulation(cfg)
    rep = build_report(cfg.out_dir, keys)
    lines = [r for r in read_ledger(Path(cfg.out_dir) / "ledger.jsonl") if r.get("kind") == "round"]
    uploads = [r["upload_bytes_per_client"] for r in lines if r.get("upload_bytes_per_client")]
    return {"seconds_per_round": sum(r["seconds"] for r in lines) / len(lines),
            "upload_bytes_per_client_round": sum(uploads) / len(uploads),
            "accuracy": rep["metrics"]["accuracy"], "macro_f1": rep["metrics"]["macro_f1"],
            "epsilon_max": (rep["privacy"] or {}).get("epsilon_max")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="round-time-"))
    keys = out / "keys"
    keygen(keys)
    res = {m: measure(m, args.rounds, out, keys) for m in ("dp", "dp+he")}
    res["dp+he/dp seconds per round"] = res["dp+he"]["seconds_per_round"] / res["dp"]["seconds_per_round"]
    res["reference upload / dp+he upload"] = REFERENCE_UPLOAD / res["dp+he"]["upload_bytes_per_client_round"]
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

"""Run the README's main job N times (secret DP noise, so each run differs) and summarise: prints
figures, no asserts.

Each run is a fresh ``carbonfed run`` process, as a user starts it, into ``OUT/run-K``; a run dir
that already holds a ``report.json`` is read, not run again, so an interrupted series resumes.
Prints each run's held-out accuracy, macro-F1, ε_max, run time and stray predictions (held-out
rows put into a class no held-out row holds: each adds a class with F1 = 0 to macro-F1), then the mean ± std and how
many runs meet issue 2's thresholds (accuracy ≥ 0.95 and macro-F1 ≥ 0.70), with a Wilson 95 %
interval for that rate.

The runs use one key folder (``OUT/keys``), so the global model of the last round alone
(``aggregates/model_round_NNN.bin``) can be decrypted and scored beside the run's model, the mean
of the last ``average-last`` rounds' global models: a paired comparison on the same run.

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

import numpy as np

MAIN_JOB: list[str] = []     # the main job is the seed preset (carbonfed.federation.presets): no option needed


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, mid - half), min(1.0, mid + half)


def main():
    ap = argparse.ArgumentParser(prog="python bench/repeat.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="how many runs (default 5)")
    ap.add_argument("--out", required=True, help="folder of the series: keys/ and run-1, run-2, ... (required)")
    ap.add_argument("--data-dir", default=None, help="the data folder (default: carbonfed's, ../shared/data)")
    ap.add_argument("extra", nargs="*", help="more `carbonfed run` options (after --)")
    args = ap.parse_args()
    carbonfed = Path(sys.executable).with_name("carbonfed")
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    keys = Path(args.out).resolve() / "keys"
    if not (keys / "secret.ctx").exists():
        subprocess.run([str(carbonfed), "keygen", "--out", str(keys)], check=True, stdout=subprocess.DEVNULL)
    rows, last_only = [], []
    for k in range(1, args.runs + 1):
        out = Path(args.out) / f"run-{k}"
        if not (out / "report.json").exists():
            cmd = [str(carbonfed), "run", *MAIN_JOB, *args.extra, "--keys", str(keys), "--out", str(out)]
            if args.data_dir:
                cmd += ["--data-dir", args.data_dir]
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        rep = json.loads((out / "report.json").read_text())
        m = rep["metrics"]
        cm = np.array(m["confusion_matrix"])
        row = (m["accuracy"], m["macro_f1"], (rep.get("privacy") or {}).get("epsilon_max"), rep["timing"]["total_s"],
               int(cm[:, cm.sum(1) == 0].sum()))     # stray: predicted into a class no held-out row holds
        rows.append(row)
        last_only.append(last_round_scores(out, keys, rep))
        print(f"run {k}: accuracy {row[0]:.4f}, macro-F1 {row[1]:.4f}, ε_max {row[2]}, {row[3]:.1f} s, {row[4]} stray; "
              f"the last round's global model alone: {last_only[-1][0]:.4f} / {last_only[-1][1]:.4f}, "
              f"{last_only[-1][2]} stray", flush=True)
    acc = [r[0] for r in rows]
    ok = sum(1 for a, f, *_ in rows if a >= 0.95 and f >= 0.70)
    mean = sum(acc) / len(acc)
    std = math.sqrt(sum((a - mean) ** 2 for a in acc) / max(len(acc) - 1, 1))
    lo, hi = wilson(ok, len(rows))
    print(f"{len(rows)} runs: accuracy {mean:.4f} ± {std:.4f} (sample std), {min(acc):.3f}–{max(acc):.3f}; "
          f"both thresholds in {ok} of {len(rows)} (Wilson 95 % interval {lo:.2f}–{hi:.2f})")
    diff = [r[0] - l[0] for r, l in zip(rows, last_only)]
    ok_last = sum(1 for a, f, _ in last_only if a >= 0.95 and f >= 0.70)
    print(f"the last round's global model alone: accuracy {sum(l[0] for l in last_only) / len(rows):.4f}, both "
          f"thresholds in {ok_last} of {len(rows)}; the run's model minus it: {sum(diff) / len(diff):+.4f} "
          f"(better in {sum(d > 0 for d in diff)}, worse in {sum(d < 0 for d in diff)})")
    print(f"stray predictions (held-out rows put into a class no held-out row holds): {sum(r[4] for r in rows)} in "
          f"{sum(r[4] > 0 for r in rows)} runs; the last round's model alone: {sum(l[2] for l in last_only)} in "
          f"{sum(l[2] > 0 for l in last_only)} runs")


def last_round_scores(out: Path, keys: Path, rep: dict) -> tuple[float, float, int]:
    """Held-out accuracy, macro-F1 and stray predictions (into classes no held-out row holds) of
    the last round's global model alone (decrypted with ``keys``), with the run's scaler from model.pt.
    The file is read as the report reads aggregates (:class:`BoundAggregates`): only if its check
    slots carry the tags of the updates the ledger accepted for that round."""
    import torch
    from sklearn.metrics import f1_score

    from carbonfed.data import split_countries
    from carbonfed.data.features import Standardizer
    from carbonfed.federation.client.participant import Layouts, make_cipher
    from carbonfed.federation.config import RunConfig
    from carbonfed.federation.report.signed_record import BoundAggregates, load_run_charter
    from carbonfed.federation.run_data import load_run_data
    from carbonfed.models.mlp import build_model
    from carbonfed.models.params import load_flat_params
    from carbonfed.privacy.binding import secret_key_bytes, tag_key
    from carbonfed.privacy.he import SECRET_CONTEXT_FILE, HEParams, load_secret_context
    from carbonfed.privacy.ledger import read_ledger

    cfg = RunConfig.from_flower(rep["provenance"]["config"])
    ds = load_run_data(cfg)
    ledger = read_ledger(out / "ledger.jsonl")
    charter = load_run_charter(out)
    ctx = load_secret_context(keys / SECRET_CONTEXT_FILE) if cfg.he else None
    key = tag_key(charter.sha256, secret_key_bytes(ctx) if ctx is not None else None)
    bound = BoundAggregates.of(out, ledger, charter, key, HEParams().plain_modulus)
    name = [n for n in sorted(bound.expected) if n.startswith("model_round_")][-1]    # the last round's model
    lay = Layouts.for_run(cfg, len(ds.features), len(ds.classes)).update
    params, _ = lay.unpack_sum(*bound.open(name, make_cipher(cfg, ctx, lay.length).decrypt))
    saved = torch.load(out / "model.pt", weights_only=False)
    model = build_model(len(ds.features), len(ds.classes), tuple(saved["hidden"]))
    load_flat_params(model, params)
    x, y = ds.all_arrays(split_countries(ds.countries(), cfg.holdout_offset).test)
    with torch.no_grad():
        pred = model(torch.from_numpy(Standardizer.from_dict(saved["scaler"]).apply(x))).argmax(1).numpy()
    return float(np.mean(pred == y)), float(f1_score(y, pred, average="macro")), int(np.sum(~np.isin(pred, y)))


if __name__ == "__main__":
    main()

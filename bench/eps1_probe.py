"""Where macro-F1 goes at ε = 1 (issue 19): per-class figures of ``bench/ddp_twin.py`` on VALIDATION folds.

For each setting (a JSON object of :data:`ddp_twin.DEFAULTS` keys, plus the probe-only keys below) it
scores folds 0–4 of the training countries × ``--val-seeds`` draws (never the held-out countries)
and prints accuracy, macro-F1 (as the report computes it: over the classes with a true or a
predicted row), each class's pooled recall and precision, and the rare classes' *spurious*
predictions (rows predicted as a class that the fold does not hold: each such event adds an F1 of 0
to that fold's macro average).

Probe-only keys (ablations, not product settings):

* ``feat`` — a JSON object of settings for the statistics releases only (e.g. ``{"stats_sigma": 5}``)
  while training is planned with the setting's own prior: separates features' noise from DP-SGD noise;
* ``train_eps`` — calibrate DP-SGD for this ε instead of ``--epsilon`` (the statistics keep theirs).

Usage: python bench/eps1_probe.py --epsilon 1 --val-seeds 2 '{"lr": 0.1, "rounds": 70, "clip": 2, "stats_sigma": 20}'
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddp_twin as T  # noqa: E402

from carbonfed.data import split_countries  # noqa: E402
from carbonfed.privacy.skellam import epsilon_of  # noqa: E402

PROBE_KEYS = ("feat", "train_eps")


def predictions(s, data, epsilon, fold, seed, mechanism):
    """(true labels, predicted labels, plan) of one validation fold and draw."""
    x, y, country, part = data
    pt = split_countries(part.train, fold)
    key = (seed, fold)
    sf = {**s, **s.get("feat", {})}
    z, counts = T.features(sf, x, y, country, pt.train, np.random.default_rng(list(key) + [7]))
    st = {k: v for k, v in s.items() if k not in PROBE_KEYS}
    w, p = T.train(st, z, y, country, pt.train, counts, s.get("train_eps", epsilon), key, mechanism)
    mask = np.isin(country, pt.test)
    pred = (np.concatenate([z[mask], np.ones((mask.sum(), 1))], 1) @ w).argmax(1)
    return y[mask], pred, p


def summary(runs, k):
    """Accuracy, macro-F1, per-class recall/precision (pooled) and spurious events of the rare classes."""
    accs = [float((t == q).mean()) for t, q, _ in runs]
    f1s = [float(f1_score(t, q, average="macro")) for t, q, _ in runs]
    t_all = np.concatenate([t for t, _, _ in runs])
    q_all = np.concatenate([q for _, q, _ in runs])
    rec = [float((q_all[t_all == c] == c).mean()) if (t_all == c).any() else float("nan") for c in range(k)]
    prec = [float((t_all[q_all == c] == c).mean()) if (q_all == c).any() else float("nan") for c in range(k)]
    spur = {c: sum(int((q == c).any() and not (t == c).any()) for t, q, _ in runs) for c in (1, 4)}
    spur_rows = {c: sum(int((q == c).sum()) for t, q, _ in runs if not (t == c).any()) for c in (1, 4)}
    chances = {c: sum(int(not (t == c).any()) for t, _, _ in runs) for c in (1, 4)}
    return np.array(accs), np.array(f1s), rec, prec, spur, spur_rows, chances


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epsilon", type=float, default=1.0)
    ap.add_argument("--val-seeds", type=int, default=2)
    ap.add_argument("--mechanism", choices=("gaussian", "skellam"), default="gaussian")
    ap.add_argument("settings", nargs="*", default=["{}"])
    args = ap.parse_args()
    data = T.task_arrays("seed", None)
    k = int(data[1].max()) + 1
    for spec in args.settings:
        s = {**T.DEFAULTS, **json.loads(spec)}
        unknown = set(s) - set(T.DEFAULTS) - set(PROBE_KEYS)
        if unknown:
            raise SystemExit(f"unknown setting(s) {sorted(unknown)}")
        t0 = time.time()
        runs = [predictions(s, data, args.epsilon, f, seed, args.mechanism)
                for f in range(5) for seed in range(args.val_seeds)]
        a, f, rec, prec, spur, spur_rows, chances = summary(runs, k)
        p = runs[-1][2]
        stats_eps = epsilon_of(list(p.prior), T.DELTA)
        print(f"ε={args.epsilon} {spec}: z {p.noise_multiplier:.2f}, stats ε {stats_eps:.3f} | "
              f"acc {a.mean():.4f} F1 {f.mean():.4f} (min {f.min():.3f}) | recall "
              + " ".join(f"{r:.2f}" for r in rec) + " | precision " + " ".join(f"{r:.2f}" for r in prec)
              + f" | spurious (runs predicting a class their fold lacks / such runs) 1: {spur[1]}/{chances[1]} "
              f"({spur_rows[1]} rows), 4: {spur[4]}/{chances[4]} ({spur_rows[4]} rows) | {time.time() - t0:.0f} s",
              flush=True)


if __name__ == "__main__":
    main()

"""Numpy twin of distributed DP-FedSGD (``ddp+he``, issue 19): prints figures, no asserts.

Each round every training country Poisson-samples its rows at rate q, clips each sampled row's
gradient of the linear model (multinomial logistic regression on the run's features) to C, and
uploads :func:`carbonfed.privacy.distributed_dp.contribution` (rounded rows + its Skellam share,
from a derived ChaCha20 source); the integer uploads are summed modulo the BFV plain modulus (what
the server's ciphertext sum decrypts to), released by
:func:`~carbonfed.privacy.distributed_dp.release`, divided by q·N (N: the row count released by
statistics stage 1) and applied by a server optimizer (Adam or momentum; post-processing). The
noise is calibrated by :func:`~carbonfed.privacy.distributed_dp.plan` for ``min_frac`` of the
training countries; every country contributes, so the sum carries 1/min_frac times V. That is
``--mechanism skellam``; the default, ``--mechanism gaussian`` (for choosing settings: about 20×
faster), adds the same total variance to the exact sum of clipped gradients as one Gaussian draw.

The features come from carbonfed's statistics releases (:mod:`carbonfed.privacy.stats_release`:
the same clipped sums), with *central* noise N(0, (σ_s·sensitivity)²) per release, the variance
that summed Skellam shares would carry; they are charged as Skellam releases before training.

Settings are JSON objects (keys below, defaults in :data:`DEFAULTS`). ``--validation`` scores the
training countries' stride-5 folds 0–4 (``--val-seeds`` draws each; the held-out countries are
never touched); ``--heldout`` scores the held-out countries (offset 0), seeds 0–2.

* ``q`` sample rate, ``clip`` C, ``rounds``, ``opt`` ("adam" | "momentum"), ``lr``, ``momentum``,
  ``average_last`` (mean of the last K global models), ``min_frac`` (n_min / training countries);
* ``stages`` (2: log features; 3: asinh features), ``stats_sigma`` (σ_s of each release, central),
  ``log_bound`` (the log transform's range, ``RunConfig.log_bound``; the default is the seed data's
  :data:`carbonfed.data.features.LOG_BOUND`, OWID's preset :data:`carbonfed.data.owid.OWID_LOG_BOUND`),
  ``asinh_k`` (``ASINH_K``); ``wd``: decoupled weight decay toward the start (``ddp-weight-decay``;
  seed preset 0.1: on validation, runs predicting a class their fold lacks 5 → 1 of 48);
* ``lr_z`` (Adam, ε-dependent lr; None: off): the lr becomes ``min(lr, lr_z / z)``, z the plan's central
  noise multiplier. Where noise dominates a coordinate, Adam's denominator √v̂ is the noise std of the
  released mean gradient, σ_n = z·C/(q·N), so Adam is SGD with step lr/σ_n (Tang et al. 2024, DP-AdamBC)
  and a noise-dominated weight (the rare classes') spreads ∝ √(lr·σ_n): ``lr_z`` = lr·z keeps that
  spread at the value validated at the reference ε (seed: 1.27 ≥ 0.1 × 12.64, z at ε = 3, so ε = 3 keeps lr 0.1).

Settings chosen on the validation folds (``--val-seeds 4``), then scored once on the held-out countries:

* seed, ε = 3: ``{"lr": 0.1, "rounds": 50, "clip": 2, "stats_sigma": 20, "wd": 0.1}`` (Adam, full
  batch q = 1, asinh features of three statistics stages; without the decay 70 rounds kept 100
  rounds' validation accuracy, 0.9483 against 0.9486, and 50 lost 0.003; with it, 32 draws, 50
  rounds score 0.9476 / 0.7636 against 70 rounds' 0.9487 / 0.7626, ε = 1 0.9426 / 0.7294 against
  0.9432 / 0.7337: the preset's 50 rounds, see :mod:`carbonfed.federation.presets`);
* seed, ε = 1 (issue 19, ``bench/eps1_probe.py``): the same plus ``"lr_z": 1.27`` (lr 0.035 at ε = 1,
  z 36.15; validation 5 folds × 8 draws: macro-F1 0.7264 against 0.7116 at lr 0.1, rare-class rows
  predicted in folds without that class 4 of 32 chances against 8; ε = 3 preset 0.7575, 3 of 32);
* OWID, ε = 3: ``{"opt": "momentum", "lr": 3, "rounds": 50, "clip": 2, "stages": 2, "log_bound": 14}``
  (log features of two stages; the log transform's range is OWID's public bound ln 10^6 ≈ 14,
  :data:`carbonfed.data.owid.OWID_LOG_BOUND`, so that energy and GDP per capita, up to 3·10^5, no
  longer saturate it: validation 0.711 at 10, 0.739–0.740 at 12–16, 0.734 at 20 (100 rounds, lr 2,
  ``--val-seeds 10``); then 50 rounds at lr 3 0.7456 against 100 at lr 2 0.7391).

The settings of the presets (:data:`carbonfed.federation.presets.DDP_PRESETS`) are these; the
twin's own defaults (:data:`DEFAULTS`) are not a preset: pass the preset's values as above.

Usage: python bench/ddp_twin.py --task owid --epsilon 3 --validation --heldout '{"log_bound": 14}' '{"lr": 0.05}'
(gaussian: a few seconds per setting and draw; skellam: about 20 s per 100-round seed run)
"""

import argparse
import json
import math
import time

import numpy as np
from sklearn.metrics import f1_score

import carbonfed.data.features as F
import carbonfed.privacy.stats_release as R
from carbonfed.data import load_dataset, split_countries
from carbonfed.models.mlp import prior_logits
from carbonfed.privacy.audit.ddp_epsilon import recompute_epsilon
from carbonfed.privacy.distributed_dp import (contribution, plan, release, sample_rows, skellam_release,
                                              upload_epsilon)
from carbonfed.privacy.he import HEParams
from carbonfed.privacy.randomness import NoiseSource

DEFAULTS = {"q": 1.0, "clip": 1.0, "rounds": 30, "opt": "adam", "lr": 0.05, "momentum": 0.9,
            "average_last": 5, "min_frac": 0.8, "stages": 3, "stats_sigma": 10.0,
            "log_bound": F.LOG_BOUND, "asinh_k": F.ASINH_K, "lr_z": None, "wd": 0.0}
MAX_CLIENT_SAMPLES = 512
STATS_SCALE = 1024.0     # integer units of a statistics release (only its discreteness term sees it)
DELTA = 1e-5


def task_arrays(task, data_dir):
    """(x, y, country of each row, offset-0 partition) of the seed or OWID task."""
    ds = load_dataset(task, data_dir)
    countries = ds.countries()
    x, y = ds.all_arrays(countries)
    country = np.repeat(countries, [len(ds.client_arrays(c)[1]) for c in countries])
    return x.astype(np.float64), y, country, split_countries(countries, 0)


def stages_of(s, d, k, n_train):
    lay1 = R.StatsLayout(d, k, MAX_CLIENT_SAMPLES, s["stats_sigma"], HEParams().plain_modulus, n_train, s["log_bound"])
    return [lay1, R.RefineLayout(lay1), R.AsinhLayout(lay1)][:s["stages"]]


def features(s, x, y, country, train, rng):
    """The run's scaler from its statistics releases with central noise (every country adds a share
    calibrated for n_min, so the sum carries n / n_min times the variance); returns (z, counts)."""
    d, k = x.shape[1], int(y.max()) + 1
    lays = stages_of(s, d, k, len(train))
    parts = [(x[country == c], y[country == c]) for c in train]
    inflate = len(train) / min_clients(s, len(train))

    def noisy(lay, v):
        return v + rng.normal(0, s["stats_sigma"] * lay.sensitivity * math.sqrt(inflate), v.shape)
    scaler = F.Standardizer.from_sums(noisy(lays[0], sum(lays[0].local_sums(a, b) for a, b in parts)), d, k,
                                      lays[0].log_bound)
    for lay in lays[1:]:   # "terms": noise std σ_s·clip·√terms, one central draw of n / n_min times the variance
        scaler = lay.scaler_from_sums(noisy(lay, sum(lay.local_sums(a, scaler) for a, _ in parts)), scaler, inflate)
    return scaler.apply(x).astype(np.float64), scaler.class_counts


def min_clients(s, n_train):
    return max(1, math.ceil(s["min_frac"] * n_train))


def stats_prior(s, d, k, n_train):
    """The statistics releases as Skellam releases (integer units of STATS_SCALE)."""
    lays = stages_of(s, d, k, n_train)
    return tuple(skellam_release(lay.sensitivity, lay.length, STATS_SCALE, s["stats_sigma"]) for lay in lays)


def per_example_grads(xb, yb, w):
    """Rows of d(cross-entropy)/dW for the linear model (xb already has the bias column)."""
    logits = xb @ w
    p = np.exp(logits - logits.max(1, keepdims=True))
    e = p / p.sum(1, keepdims=True)
    e[np.arange(len(yb)), yb] -= 1
    return (xb[:, :, None] * e[:, None, :]).reshape(len(yb), -1)


class ServerOpt:
    """Adam (β = 0.9, 0.999) or heavy-ball momentum on the released mean gradient."""

    def __init__(self, s, shape, w0=None):
        self.s, self.m, self.v, self.t = s, np.zeros(shape), np.zeros(shape), 0
        self.w0 = np.zeros(shape) if w0 is None else np.array(w0)     # ``wd``: decay toward the start

    def step(self, w, g):
        s = self.s
        self.t += 1
        if s["opt"] == "momentum":
            self.m = s["momentum"] * self.m + g
            return w - s["lr"] * self.m
        self.m = 0.9 * self.m + 0.1 * g
        self.v = 0.999 * self.v + 0.001 * g * g
        mh, vh = self.m / (1 - 0.9 ** self.t), self.v / (1 - 0.999 ** self.t)
        return w - s["lr"] * (mh / (np.sqrt(vh) + 1e-8) + s.get("wd", 0.0) * (w - self.w0))


def skellam_round(p, clients, w, key, r):
    """One round through the product's mechanism: every country's integer upload (rounded rows and
    its Skellam share), summed modulo t, released: the noisy sum of clipped gradients."""
    total = np.zeros(p.dim, dtype=np.int64)
    for i, (xc, yc) in enumerate(clients):
        src = NoiseSource.derived("ddp-twin", key, r, i)
        b = sample_rows(len(yc), p.sample_rate, src)
        total = np.mod(total + contribution(p, per_example_grads(xc[b], yc[b], w), src), p.plain_modulus)
    return release(p, total, len(clients))


def gaussian_round(p, clients, w, rng):
    """The same sum with the central noise's variance as one Gaussian draw (rounding left out:
    ≤ rows/4 integer units² per coordinate against the noise's ~10⁹): 20× faster."""
    xs, ys = clients
    b = rng.random(len(ys)) < p.sample_rate
    g = per_example_grads(xs[b], ys[b], w)
    g *= np.minimum(1.0, p.clip / np.maximum(np.linalg.norm(g, axis=1), 1e-300))[:, None]
    return g.sum(axis=0) + rng.normal(0, math.sqrt(p.share_variance * p.max_clients) / p.scale, p.dim)


def noise_scaled_lr(s, p):
    """``lr_z`` set: the lr becomes min(lr, lr_z / z), z the plan's noise multiplier (see the docstring)."""
    return s if s["lr_z"] is None else {**s, "lr": min(s["lr"], s["lr_z"] / p.noise_multiplier)}


def train(s, z, y, country, train_c, counts, epsilon, key, mechanism):
    """DP-FedSGD; returns the mean of the last ``average_last`` global models and the plan."""
    k, n_train = len(counts), len(train_c)
    xb = np.concatenate([z, np.ones((len(z), 1))], 1)
    p = plan(epsilon, DELTA, s["rounds"], s["q"], s["clip"], xb.shape[1] * k,
             min_clients(s, n_train), n_train, n_train * MAX_CLIENT_SAMPLES,
             HEParams().plain_modulus, prior=stats_prior(s, z.shape[1], k, n_train))
    s = noise_scaled_lr(s, p)
    if mechanism == "skellam":
        clients = [(xb[country == c], y[country == c]) for c in train_c]
    else:
        rows = np.isin(country, train_c)
        clients, rng = (xb[rows], y[rows]), np.random.default_rng(list(key) + [11])
    w = np.zeros((xb.shape[1], k))
    w[-1] = prior_logits(counts)
    opt, kept, n_hat = ServerOpt(s, w.shape, w), [], float(np.sum(counts))
    for r in range(s["rounds"]):
        g = skellam_round(p, clients, w, key, r) if mechanism == "skellam" else gaussian_round(p, clients, w, rng)
        w = opt.step(w, g.reshape(w.shape) / (s["q"] * n_hat))
        kept = (kept + [w])[-s["average_last"]:]
    return np.mean(kept, axis=0), p


def score(z, y, w, mask):
    pred = (np.concatenate([z[mask], np.ones((mask.sum(), 1))], 1) @ w).argmax(1)
    return float((pred == y[mask]).mean()), float(f1_score(y[mask], pred, average="macro"))


def run_setting(s, data, epsilon, folds, seeds, mechanism="gaussian"):
    """Mean (accuracy, macro-F1) over ``folds`` (None: held-out) × ``seeds``, and the last plan."""
    x, y, country, part = data
    F.ASINH_K = float(s["asinh_k"])
    accs, f1s, p = [], [], None
    try:
        for fold in folds:
            pt = part if fold is None else split_countries(part.train, fold)
            for seed in seeds:
                key = (seed, 9 if fold is None else fold)
                z, counts = features(s, x, y, country, pt.train, np.random.default_rng(list(key) + [7]))
                w, p = train(s, z, y, country, pt.train, counts, epsilon, key, mechanism)
                a, f = score(z, y, w, np.isin(country, pt.test))
                accs.append(a)
                f1s.append(f)
    finally:
        F.ASINH_K = DEFAULTS["asinh_k"]
    return np.array(accs), np.array(f1s), p


def privacy_line(p):
    """The plan's noise, ε (and the independent recomputation), wrap bound and per-upload ε."""
    d = p.describe(DELTA)
    again = recompute_epsilon([r.to_dict() for r in p.planned_history()], DELTA)
    return (f"σ_central {d['noise_multiplier']:.2f} (n_min {p.min_clients}), ε {d['epsilon']:.4f} "
            f"(verify {again:.4f}), wrap ≤ {d['wrap_probability']:.0e}, scale {p.scale:g}, "
            f"per-upload ε {d['upload_epsilon_per_round']:.1f}/round, "
            f"{upload_epsilon(p, p.rounds, DELTA):.0f}/run | ")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=("seed", "owid"), default="seed")
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--validation", action="store_true", help="score folds 0-4 of the training countries")
    ap.add_argument("--val-seeds", type=int, default=1)
    ap.add_argument("--heldout", action="store_true", help="score the held-out countries, seeds 0-2")
    ap.add_argument("--mechanism", choices=("gaussian", "skellam"), default="gaussian",
                    help="gaussian: the central noise as one draw (fast); skellam: every upload as the product makes it")
    ap.add_argument("settings", nargs="*", default=["{}"])
    args = ap.parse_args()
    data = task_arrays(args.task, args.data_dir)
    for spec in args.settings:
        s = {**DEFAULTS, **json.loads(spec)}
        unknown = set(s) - set(DEFAULTS)
        if unknown:
            raise SystemExit(f"unknown setting(s) {sorted(unknown)}")
        out, t0 = [], time.time()
        for name, on, folds, seeds in (("validation", args.validation, range(5), range(args.val_seeds)),
                                       ("held-out", args.heldout, [None], range(3))):
            if on:
                a, f, p = run_setting(s, data, args.epsilon, folds, seeds, args.mechanism)
                out.append(f"{name} acc {a.mean():.4f} (min {a.min():.3f}) F1 {f.mean():.4f} (min {f.min():.3f})")
        print(f"{args.task} ε={args.epsilon} {spec}: " + (privacy_line(p) if p else "") + " | ".join(out)
              + f" | {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

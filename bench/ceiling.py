"""Where the private model's accuracy ceiling comes from (seed data set): prints figures, no asserts.

1. How the seed categories were made: the nearest class mean in feature space standardised with
   the pooled rows' mean and std (what the public seed project's scaler did) reproduces every label.
2. Centrally (scikit-learn, exact), logistic regression on those raw standardised features
   against carbonfed's two feature sets: the signed log1p transform (stats-stages 1 or 2) and
   asinh(x / c) (stats-stages 3, the main job), here with the exact scaler chain.
3. A numpy twin of the federated DP-SGD of the main job (multinomial logistic regression, 131
   clients; rounds, Poisson-sampled steps, clip, momentum and lr of :data:`MAIN`; σ from
   carbonfed's accountant for ε after the statistics releases; sample-weighted FedAvg), on
   (a) the main job's features: three DP statistics releases, asinh(x / c) (``carbonfed.privacy.stats_release``,
   the run's layouts);
   (b) the log features of two DP statistics releases (``stats-stages = 2``, the owid and csv
       presets'; the earlier main job, with its lr 0.2 and the final round's model);
   (c) raw features standardised with the exact std of the training rows, which is not private:
   the std of these heavy-tailed features is set by the largest few hundred rows.
   Held-out countries (seeds 0–7) and the training countries' stride-5 validation folds 0–4
   (seeds 0–1). Not the product path (that is Flower); independent of it except for the
   accountant and the statistics code.

Usage: python bench/ceiling.py [--data-dir DIR]   (about a minute on 2 cores)

``--owid '{"log_bound": 10}' '{"log_bound": 14}' ...`` instead scores the OWID preset's ``dp+he``
job (log features of two DP statistics stages, the same twin) with each JSON object of RunConfig
overrides, on the training countries' validation folds 0–4 (``--val-seeds`` draws each; the
held-out countries are not used; ``--heldout``: on them, seeds 0 to ``--val-seeds`` − 1, for
figures printed after a choice): how ``carbonfed.data.owid.OWID_LOG_BOUND`` was checked for ``dp+he``.
"""

import argparse
import functools
import json
from dataclasses import replace

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from carbonfed.data import load_dataset, split_countries
from carbonfed.data.features import Standardizer
from carbonfed.federation.config import RunConfig
from carbonfed.federation.client.participant import Layouts
from carbonfed.models.mlp import prior_logits
from carbonfed.privacy.accountant import calibrate_noise
from carbonfed.privacy.dp_sgd import TrainSettings, planned_mechanism

MAIN = RunConfig(hidden="linear", stats_stages=3, average_last=10)   # the README's main job
# the main job before stage 3: two statistics stages, the final round's model (explicit: the presets changed the defaults)
EARLIER = RunConfig(hidden="linear", lr=0.2, stats_stages=2, average_last=1)


def nearest_mean(z_fit, y_fit, z):
    mu = np.stack([z_fit[y_fit == k].mean(0) for k in np.unique(y_fit)])
    return np.argmin(((z[:, None, :] - mu[None]) ** 2).sum(-1), 1)


def dp_stats_features(cfg, x, y, country, train, rng, noise=True, stage_sigmas=None, raw_extra=0.0, counts=False):
    """carbonfed's statistics releases for ``cfg`` (per-client Gaussian noise, summed; none
    without ``noise``: the same estimator on exact sums), then its scaler's inputs.
    ``stage_sigmas``: one noise multiplier per stage instead of the run's σ_s; ``raw_extra`` B > 0
    (stage 3 only): the model also gets the linear terms ``clip(x / c, ±B)`` (c public after
    stage 2; no further release), not carbonfed's features. ``counts``: also return the released
    (noisy, clipped at 1) class counts of stage 1, as ``(features, counts)``."""
    k = int(y.max()) + 1
    stages = Layouts.for_run(cfg, x.shape[1], k).stages
    sigmas = stage_sigmas or [lay.noise_multiplier for lay in stages]

    def noisy(i, layout, v):
        return v + rng.normal(0, sigmas[i] * layout.sensitivity, v.shape) if noise else v
    scaler = Standardizer.from_sums(sum(noisy(0, stages[0], stages[0].local_sums(x[country == c], y[country == c]))
                                          for c in train), x.shape[1], k, stages[0].log_bound)
    for i, lay in enumerate(stages[1:], 1):
        scaler = lay.scaler_from_sums(sum(noisy(i, lay, lay.local_sums(x[country == c], scaler)) for c in train), scaler,
                                      len(train))
    z = scaler.apply(x).astype(np.float64)
    if raw_extra:
        z = np.concatenate([z, np.clip(x / scaler.scale, -raw_extra, raw_extra)], 1)
    return (z, scaler.class_counts) if counts else z


def prior_init(n_inputs, class_counts):
    """carbonfed's initial model for the twin: zero weights, the bias at the centred log class
    frequencies of ``class_counts`` (``carbonfed.models.mlp.build_model`` with ``class_counts``)."""
    w = np.zeros((n_inputs + 1, len(class_counts)))
    w[-1] = prior_logits(class_counts)
    return w


def settings(cfg):
    return TrainSettings(lr=cfg.lr, momentum=cfg.momentum, local_epochs=cfg.local_epochs,
                         batches_per_epoch=cfg.batches_per_epoch, max_grad_norm=cfg.max_grad_norm)


def dp_fedavg(cfg, z, y, country, train, rng, sigma, schedule=lambda t: 1.0, tail=None, weight_decay=0.0, init=None):
    """The twin's federated DP-SGD; round r trains with lr × ``schedule(r / rounds)``; returns the
    mean of the last ``tail`` global models (default ``cfg.average_last``, carbonfed's; 1: the final one; a list:
    one mean per entry). ``weight_decay``: added to the
    gradient before momentum, as torch's SGD does; ``init``: the initial model (features + 1 bias
    row × classes; zeros by default)."""
    q, steps = planned_mechanism(settings(cfg))
    clip, momentum = cfg.max_grad_norm, cfg.momentum
    z = np.concatenate([z, np.ones((len(z), 1))], 1)
    k = int(y.max()) + 1
    w = np.zeros((z.shape[1], k)) if init is None else np.array(init, dtype=np.float64)
    eye = np.eye(k)
    clients = [(z[country == c], y[country == c]) for c in train]
    tail = cfg.average_last if tail is None else tail
    tails = list(tail) if isinstance(tail, (list, tuple)) else [tail]
    kept = []
    for r in range(cfg.rounds):
        lr = cfg.lr * schedule(r / cfg.rounds)
        total = np.zeros_like(w)
        for xc, yc in clients:
            wl, m = w.copy(), np.zeros_like(w)
            for _ in range(steps):
                b = rng.random(len(yc)) < q
                logits = xc[b] @ wl
                p = np.exp(logits - logits.max(1, keepdims=True))
                e = p / p.sum(1, keepdims=True) - eye[yc[b]]
                norms = np.linalg.norm(xc[b], axis=1) * np.linalg.norm(e, axis=1)
                g = xc[b].T @ (e * np.minimum(1, clip / np.maximum(norms, 1e-12))[:, None])
                g = (g + rng.normal(0, sigma * clip, g.shape)) / max(1.0, len(yc) * q)
                m = momentum * m + g + weight_decay * wl
                wl = wl - lr * m
            total += len(yc) * wl
        w = total / sum(len(yc) for _, yc in clients)
        if r >= cfg.rounds - max(tails):
            kept.append(w)
    means = [np.mean(kept[-k:], axis=0) for k in tails]
    return means if isinstance(tail, (list, tuple)) else means[0]


def score(z, y, w, mask):
    pred = (np.concatenate([z[mask], np.ones((mask.sum(), 1))], 1) @ w).argmax(1)
    return (pred == y[mask]).mean(), f1_score(y[mask], pred, average="macro")


def log_loss(z, y, w, mask):
    """Mean cross-entropy of the model's class probabilities on the rows in ``mask``."""
    logits = np.concatenate([z[mask], np.ones((mask.sum(), 1))], 1) @ w
    logits -= logits.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(mask.sum()), y[mask]]))


def seed_arrays(data_dir, name="seed"):
    """(x, y, country of each row, holdout-offset-0 partition) of the seed (or ``name``) data set."""
    ds = load_dataset(name, data_dir)
    countries = ds.countries()
    rows = [ds.client_arrays(c) for c in countries]
    x = np.concatenate([r[0] for r in rows]).astype(np.float64)
    y = np.concatenate([r[1] for r in rows]).astype(np.int64)
    country = np.concatenate([[c] * len(r[1]) for c, r in zip(countries, rows)])
    return x, y, country, split_countries(countries, 0)


def owid_settings(data_dir, specs, val_seeds, heldout=False):
    """Validation (or held-out) accuracy / macro-F1 of the OWID ``dp+he`` preset in the twin with
    each JSON object of RunConfig overrides."""
    x, y, country, part = seed_arrays(data_dir, "owid")
    for spec in specs:
        cfg = RunConfig(dataset="owid", **json.loads(spec))
        q, steps = planned_mechanism(settings(cfg))
        sigma = calibrate_noise(cfg.epsilon, cfg.delta, q, steps * cfg.rounds,
                                prior=[(cfg.stats_sigma, 1.0, 1)] * cfg.stats_releases)
        accs, f1s = [], []
        for fold in [None] if heldout else range(5):
            p = part if fold is None else split_countries(part.train, fold)
            for seed in range(val_seeds):
                rng = np.random.default_rng([seed, 0 if fold is None else fold + 1])
                z, counts = dp_stats_features(cfg, x, y, country, p.train, rng, counts=True)
                w = dp_fedavg(cfg, z, y, country, p.train, rng, sigma, init=prior_init(z.shape[1], counts))
                a, f = score(z, y, w, np.isin(country, p.test))
                accs.append(a)
                f1s.append(f)
        print(f"owid dp+he preset {spec}, σ = {sigma:.2f}: {'held-out' if heldout else 'validation'} accuracy {np.mean(accs):.4f} "
              f"± {np.std(accs) / np.sqrt(len(accs)):.4f}, macro-F1 {np.mean(f1s):.4f} ({len(accs)} runs)", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--owid", nargs="+", default=[], help="JSON RunConfig overrides: the OWID dp+he check instead")
    ap.add_argument("--val-seeds", type=int, default=4)
    ap.add_argument("--heldout", action="store_true", help="with --owid: score the held-out countries")
    args = ap.parse_args()
    if args.owid:
        return owid_settings(args.data_dir, args.owid, args.val_seeds, args.heldout)
    x, y, country, part = seed_arrays(args.data_dir)
    tr, te = np.isin(country, part.train), np.isin(country, part.test)

    pooled = (x - x.mean(0)) / x.std(0)
    print(f"1. nearest class mean, pooled standardised raw features: {(nearest_mean(pooled, y, pooled) == y).mean():.4f} "
          "of all labels reproduced")
    raw = (x - x[tr].mean(0)) / x[tr].std(0)
    print(f"   same with the training countries' scaler and means, on the held-out countries: "
          f"{(nearest_mean(raw[tr], y[tr], raw[te]) == y[te]).mean():.4f}")
    dev = np.sort((x[tr] - x[tr].mean(0)) ** 2, axis=0)[::-1]
    share = dev[:100].sum(0) / dev.sum(0)
    print(f"   the largest 100 of {tr.sum()} training rows hold half or more of the variance in "
          f"{(share >= 0.5).sum()} of {x.shape[1]} features (shares {np.round(np.sort(share), 2).tolist()})")
    exact = functools.partial(dp_stats_features, x=x, y=y, country=country, train=part.train, rng=None, noise=False)
    for name, z in (("raw standardised", raw), ("carbonfed log features (stats-stages 2)", exact(EARLIER)),
                    ("carbonfed asinh features (stats-stages 3)", exact(MAIN))):
        pred = LogisticRegression(C=100, max_iter=5000).fit(z[tr], y[tr]).predict(z[te])
        print(f"2. central logistic regression, {name}, exact scaler: held-out accuracy {(pred == y[te]).mean():.4f}, "
              f"macro-F1 {f1_score(y[te], pred, average='macro'):.4f}")

    print(f"3. numpy twin of the main job's DP-SGD, ε = {MAIN.epsilon:g}")
    setups = {f"(a) main job: 3 DP statistics stages, asinh features, lr {MAIN.lr:g}": MAIN,
              f"(b) 2 DP statistics stages, log features, lr {EARLIER.lr:g} (the earlier main job)": EARLIER,
              f"(c) raw, exact std (not private), lr {MAIN.lr:g}": None}
    for label, cfg in setups.items():
        run_cfg = cfg or replace(MAIN, stats_noise_multiplier=0.0)
        q, steps = planned_mechanism(settings(run_cfg))
        releases = [(run_cfg.stats_sigma if cfg else MAIN.stats_sigma, 1.0, 1)] * (cfg or MAIN).stats_releases
        sigma = calibrate_noise(MAIN.epsilon, MAIN.delta, q, steps * run_cfg.rounds, prior=releases)
        for split_name, folds, seeds in (("held-out countries", [None], range(8)), ("validation folds 0-4", range(5), range(2))):
            accs, f1s = [], []
            for fold in folds:
                p = part if fold is None else split_countries(part.train, fold)
                trm, tem = np.isin(country, p.train), np.isin(country, p.test)
                for seed in seeds:
                    rng = np.random.default_rng([seed, 0 if fold is None else fold + 1])
                    if cfg is None:
                        z, counts = (x - x[trm].mean(0)) / x[trm].std(0), np.bincount(y[trm], minlength=5)
                    else:
                        z, counts = dp_stats_features(cfg, x, y, country, p.train, rng, counts=True)
                    w = dp_fedavg(run_cfg, z, y, country, p.train, rng, sigma, init=prior_init(z.shape[1], counts))
                    a, f = score(z, y, w, tem)
                    accs.append(a)
                    f1s.append(f)
            print(f"   {label}, σ = {sigma:.2f}, {split_name}: accuracy {np.mean(accs):.4f} ± {np.std(accs):.4f}, "
                  f"macro-F1 {np.mean(f1s):.3f}, both thresholds (0.95, 0.70) {np.mean((np.array(accs) >= 0.95) & (np.array(f1s) >= 0.70)):.2f}"
                  f" ({len(accs)} runs)")

if __name__ == "__main__":
    main()

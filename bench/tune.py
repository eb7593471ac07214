"""Hyper-parameter exploration without Flower: the same Participant code, summed in-process.

Not the product path (that is Flower, see federation/server/strategy.py); a quick way to compare
settings. Usage: python bench/tune.py '{"privacy": "none", "lr": 0.5}' '{"privacy": "dp", ...}'
Prints one JSON line per config: accuracy and macro-F1 on the held-out countries per round.

Extra keys, not RunConfig settings (exploration only, never in the product): ``val: k`` (tune on
the training countries: their stride-5 fold k scores, the rest train; the test countries take no
part), ``lr_final`` (cosine decay of the local lr to lr·lr_final by the last round), ``avg_last``
(score the float average of the last K global models; a list scores each K on the same run),
``ema`` (list of decays: EMA of the global models, scored after them), ``server_momentum`` /
``server_lr`` (FedAvgM applied to the decrypted aggregate), and patches applied in the worker
process: ``activation: "tanh"``, ``weight_decay: w`` (local SGD's L2 decay), ``per_layer: true``
(Opacus per-layer clipping, equal split), ``clamp: k`` (standardised inputs clipped to ±k),
``scale: "mean" | z`` (std from |DP mean| where the DP variance is not z noise standard deviations
above 0), ``log_unit: c`` / ``log_unit_bound: b`` (transform ``clip(sign(x)·log1p(|x|/c), ±b)/b``
instead of c = 1; ``log_bound``, the range with c = 1, is a RunConfig setting), ``prior_bias: k`` (output bias initialised to k·log of the seed data's
class shares), ``refine_clip: r`` (second-stage statistics clip instead of 20), ``server_adam: lr`` / ``server_tau`` (FedAdam on the decrypted aggregate).
"""

import functools
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import numpy as np


def _apply_hacks(h: dict) -> None:
    """Exploration-only patches, in this worker process: another activation, per-layer clipping
    (equal split of max_grad_norm), clamped standardised inputs."""
    import opacus
    import torch

    from carbonfed.data.features import Standardizer

    if h.get("weight_decay"):
        torch.optim.SGD = functools.partial(torch.optim.SGD, weight_decay=float(h["weight_decay"]))
    if h.get("activation") == "tanh":
        torch.nn.ReLU = torch.nn.Tanh
    if h.get("per_layer"):
        orig = opacus.PrivacyEngine.make_private

        def per_layer(self, *, module, max_grad_norm, **kw):
            n = sum(1 for p in module.parameters() if p.requires_grad)
            return orig(self, module=module, max_grad_norm=[max_grad_norm / n ** 0.5] * n,
                        clipping="per_layer", **kw)
        opacus.PrivacyEngine.make_private = per_layer
    if h.get("scale"):
        import carbonfed.data.features as S
        orig_from = S.Standardizer.from_sums.__func__

        def from_sums(cls, sums, d, k):
            std = orig_from(cls, sums, d, k)
            n = float(np.asarray(sums[:k]).sum())
            mean = np.clip(sums[k:k + d] / n, -1, 1)
            var = sums[k + d:k + 2 * d] / S.SECOND_MOMENT_WEIGHT / n - mean ** 2
            tau = 4.0 * np.sqrt(2) * np.sqrt(131) / (S.SECOND_MOMENT_WEIGHT * n)
            fallback = np.maximum(np.abs(mean), S.STD_FLOOR)
            if h["scale"] == "mean":
                sd = fallback
            else:
                sd = np.where(var > float(h["scale"]) * tau, np.sqrt(np.maximum(var, 1e-12)), fallback)
            return cls(mean=std.mean, std=sd, class_counts=std.class_counts)
        S.Standardizer.from_sums = classmethod(from_sums)
    if h.get("log_unit"):
        import carbonfed.data.features as S
        c, b = float(h["log_unit"]), float(h.get("log_unit_bound", 16.0))

        def transform(x, log_bound=None):
            x = np.asarray(x, dtype=np.float64)
            return np.clip(np.sign(x) * np.log1p(np.abs(x) / c), -b, b) / b
        S.transform = transform
    if h.get("prior_bias"):
        import carbonfed.federation.client.participant as FP
        orig_build = FP.build_model
        prior = np.log(np.array([8367, 172, 507, 2765, 161]) / 11972.0)   # seed data class shares

        def build(*a, **k):
            m = orig_build(*a, **k)
            with torch.no_grad():
                list(m.parameters())[-1].copy_(torch.tensor(prior * float(h["prior_bias"]), dtype=torch.float32))
            return m
        FP.build_model = build
    if h.get("refine_clip"):
        import carbonfed.privacy.stats_release as R
        R.RefineLayout.clip = float(h["refine_clip"])
    if h.get("clamp"):
        k, apply = float(h["clamp"]), Standardizer.apply
        Standardizer.apply = lambda self, x: np.clip(apply(self, x), -k, k)


HACKS = ("weight_decay", "activation", "per_layer", "clamp", "scale", "log_unit", "log_unit_bound", "prior_bias",
         "refine_clip")


def _extras(kw: dict) -> tuple[dict, dict]:
    """Pop the exploration-only keys off ``kw`` (what stays are RunConfig settings): (options, hacks)."""
    avg_last = kw.pop("avg_last", 1)
    x = {"avg_last": list(avg_last) if isinstance(avg_last, list) else [avg_last],
         "ema": kw.pop("ema", []),      # EMA decay(s) of the global model, scored after the tail averages
         "server_momentum": kw.pop("server_momentum", 0.0), "server_lr": kw.pop("server_lr", 1.0),
         "server_adam": kw.pop("server_adam", 0.0),   # FedAdam server lr (Reddi et al. 2021); 0 = off
         "server_tau": kw.pop("server_tau", 1e-3),
         # validation fold k: train on the training countries minus their stride-5 fold k, score on it
         "val": kw.pop("val", None),
         "lr_final": kw.pop("lr_final", 1.0)}   # cosine decay of the local lr to lr·lr_final at the last round
    return x, {k: kw.pop(k) for k in HACKS if k in kw}


def _setup(cfg, val):
    """(dataset, training participants, scoring participants, layouts, the statistics aggregates)."""
    from carbonfed.data import load_dataset, split_countries
    from carbonfed.federation.client.participant import Participant, make_cipher
    from carbonfed.federation.wire import stage_key
    from carbonfed.privacy.secure_sum import SecureSum

    ds = load_dataset(cfg.dataset)
    part = split_countries(ds.countries(), cfg.holdout_offset)
    if val is not None:     # the held-out test countries take no part in tuning
        part = split_countries(part.train, int(val))
    ps = {c: Participant(cfg, ds, part, c) for c in part.countries}
    train = [p for p in ps.values() if p.role == "train"]
    test = [p for p in ps.values() if p.role == "test"]
    lay = train[0].layouts
    stats = SecureSum(make_cipher(cfg, None, lay.stats.length))
    for p in train:
        stats.add(p.setup()["stats"])
    sagg = [(stats.serialize(), stats.terms)]
    for k, stage in enumerate(lay.stages[1:], 2):
        total = SecureSum(make_cipher(cfg, None, stage.length))
        for p in train:
            total.add(p.refine(sagg)[stage_key(k)])
        sagg.append((total.serialize(), total.terms))
    return ds, train, test, lay, sagg


def _two_term(cfg, lay, params, rng):
    """``params`` (float) re-packed as a two-term plaintext aggregate: (bytes, terms)."""
    from carbonfed.federation.client.participant import make_cipher
    from carbonfed.privacy.secure_sum import SecureSum

    plain = make_cipher(cfg, None, lay.update.length)
    total = SecureSum(plain)
    vec, _ = lay.update.pack(params, 1, rng)
    total.add(plain.encrypt(vec))
    total.add(plain.encrypt(vec))
    return total.serialize(), total.terms


class _ServerOptimizer:
    """FedAvgM (``server_momentum``, ``server_lr``) or FedAdam (``server_adam``, ``server_tau``) on the
    decrypted aggregate, from the run's initial model."""

    def __init__(self, cfg, ds, x: dict):
        self.cfg, self.ds = cfg, ds
        self.beta, self.eta, self.adam, self.tau = x["server_momentum"], x["server_lr"], x["server_adam"], x["server_tau"]
        self.active = bool(self.beta or self.eta != 1.0 or self.adam)
        self.w = self.m = self.v = None

    def step(self, params):
        if self.w is None:
            from carbonfed.models.mlp import build_model
            from carbonfed.models.params import flatten_params
            self.w = flatten_params(build_model(len(self.ds.features), len(self.ds.classes), self.cfg.hidden_sizes,
                                                self.cfg.seed))
            self.m = np.zeros_like(self.w)
            self.v = np.zeros_like(self.w)
        if self.adam:
            d = params - self.w
            self.m = 0.9 * self.m + 0.1 * d
            self.v = 0.99 * self.v + 0.01 * d * d
            self.w = self.w + self.adam * self.m / (np.sqrt(self.v) + self.tau)
        else:
            self.m = self.beta * self.m + (params - self.w)
            self.w = self.w + self.eta * self.m
        return self.w


def _score(cfg, lay, test, sagg, cands) -> list:
    """Accuracy and macro-F1 (4 decimals) on ``test`` of each candidate model (float params)."""
    from carbonfed.federation.client.participant import make_cipher
    from carbonfed.federation.report.build import scores
    from carbonfed.privacy.secure_sum import SecureSum

    row = []
    for cand in cands:
        model, terms = _two_term(cfg, lay, cand, np.random.default_rng(0))
        msum = SecureSum(make_cipher(cfg, None, lay.metrics.length))
        for p in test:
            msum.add(p.evaluate(model, terms, sagg))
        cm = lay.metrics.unpack_sum(np.frombuffer(msum.serialize(), dtype=np.int64), msum.terms)
        row += [round(v, 4) for v in scores(cm.reshape(5, 5)).values()]
    return row


def _train_round(cfg, lay, train, rnd, model, mt, sagg, lr_final):
    """One round of local training, summed: (aggregate, terms, the largest ε spent so far)."""
    from carbonfed.federation.client.participant import make_cipher
    from carbonfed.privacy.secure_sum import SecureSum

    agg = SecureSum(make_cipher(cfg, None, lay.update.length))
    eps = 0
    if lr_final != 1.0:
        f = lr_final + (1 - lr_final) * 0.5 * (1 + np.cos(np.pi * (rnd - 1) / max(cfg.rounds - 1, 1)))
        for p in train:
            p.settings = replace(p.settings, lr=cfg.lr * f)
    for p in train:
        out = p.train(rnd, model, mt, sagg)
        agg.add(out["update"])
        eps = max(eps, out["facts"].get("epsilon") or 0)
    return agg.serialize(), agg.terms, eps


def run(cfg_json: str) -> dict:
    import torch

    from carbonfed.federation.config import RunConfig

    torch.set_num_threads(1)
    kw = json.loads(cfg_json)
    x, hacks = _extras(kw)
    _apply_hacks(hacks)
    cfg = RunConfig(**kw)
    kw.update(val=x["val"], avg_last=x["avg_last"], ema=x["ema"], lr_final=x["lr_final"],
              server_momentum=x["server_momentum"], server_lr=x["server_lr"], server_adam=x["server_adam"], **hacks)
    avg_last, ema = x["avg_last"], x["ema"]
    ds, train, test, lay, sagg = _setup(cfg, x["val"])
    opt = _ServerOptimizer(cfg, ds, x)
    model, mt = None, 0
    recent, hist = [], []
    t0 = time.time()
    for rnd in range(1, cfg.rounds + 1):
        model, mt, eps = _train_round(cfg, lay, train, rnd, model, mt, sagg, x["lr_final"])
        params, _ = lay.update.unpack_sum(np.frombuffer(model, dtype=np.int64), mt)
        if opt.active:
            params = opt.step(params)
            model, mt = _two_term(cfg, lay, params, np.random.default_rng(rnd))
        recent = (recent + [params])[-max(avg_last):]
        emas = {b: params if rnd == 1 else b * emas[b] + (1 - b) * params for b in ema} if ema else {}
        if rnd % 5 == 0 or rnd == cfg.rounds:
            # Each tail average / EMA (float), re-packed as a two-term aggregate for the clients' evaluate().
            cands = [np.mean(recent[-k:], axis=0) for k in avg_last] + [emas[b] for b in ema]
            hist.append((rnd, *_score(cfg, lay, test, sagg, cands), round(eps, 3)))
    return {"cfg": kw, "final": hist[-1], "hist": hist, "s": round(time.time() - t0, 1)}


if __name__ == "__main__":
    with ProcessPoolExecutor(2) as ex:
        for res in ex.map(run, sys.argv[1:]):
            print(json.dumps(res), flush=True)

"""A training client's round in ``ddp+he`` (distributed DP-FedSGD, issue 19): what
:meth:`~carbonfed.federation.client.participant.Participant.train` does in that mode.

Guarantees
----------
* The request's aggregate is opened (check slots against the contributions the server names)
  only if it sums at least ``min-noise-clients`` uploads (else a signed refusal: an aggregate
  below the noise floor is never decrypted); its gradient part is released by
  :func:`carbonfed.privacy.distributed_dp.release` (which also refuses a wrapped sum).
* The server-side optimizer (:class:`ServerOptimizer`, Adam or heavy-ball momentum) is applied by
  the key holder to the released sum divided by q·N̂ (N̂: the rows statistics stage 1 released):
  post-processing. Its state comes from the aggregate, not from the client's memory, so a client
  that missed rounds catches up, and every client computes the same next model.
* The round's Skellam release (at the floor n_min) is charged to the client's accountant
  before any row is touched; a round that would exceed ε is refused and spends nothing.
* The upload: the rows Poisson-sampled at q (ChaCha20), their per-example gradients of the
  cross-entropy at the new model, clipped to C, rounded and summed with this client's Skellam
  share (:func:`carbonfed.privacy.distributed_dp.contribution`), behind the new optimizer state.
  Only in ``carbonfed audit-attack``'s own canary run (:func:`carbonfed.privacy.canary_ddp.ddp_canaries`)
  do the audit's canaries join the sum as extra rows; elsewhere the round is unchanged.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from carbonfed.federation.client.errors import BudgetExceeded
from carbonfed.federation.client.signer import RequestRefused
from carbonfed.models.mlp import build_model
from carbonfed.models.params import flatten_params, load_flat_params
from carbonfed.privacy.canary_ddp import ddp_canaries
from carbonfed.privacy.distributed_dp import contribution, may_release, release, sample_rows

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class ServerOptimizer:
    """Adam (β = 0.9, 0.999, as ``bench/ddp_twin.py``) or heavy-ball momentum on the mean gradient,
    with decoupled weight decay ``decay`` toward ``start`` (AdamW-style: ``w -= lr·decay·(w - start)``);
    the state is ``(w, m, √v)`` and the number of steps taken."""

    def __init__(self, kind: str, lr: float, momentum: float, decay: float = 0.0, start: np.ndarray | None = None):
        self.kind, self.lr, self.momentum = kind, float(lr), float(momentum)
        self.decay, self.start = float(decay), start

    def _decayed(self, w: np.ndarray, w_new: np.ndarray) -> np.ndarray:
        if not self.decay:
            return w_new
        return w_new - self.lr * self.decay * (w - (0.0 if self.start is None else self.start))

    def step(self, w: np.ndarray, m: np.ndarray, sv: np.ndarray, steps: int, g: np.ndarray):
        """(w, m, √v, steps) after one step on gradient ``g``."""
        t = steps + 1
        if self.kind == "momentum":
            m = self.momentum * m + g
            return self._decayed(w, w - self.lr * m), m, sv, t
        b1, b2 = ADAM_BETAS
        m = b1 * m + (1 - b1) * g
        v = b2 * sv * sv + (1 - b2) * g * g
        mh, vh = m / (1 - b1 ** t), v / (1 - b2 ** t)
        return self._decayed(w, w - self.lr * mh / (np.sqrt(vh) + ADAM_EPS)), m, np.sqrt(v), t


def per_example_grads(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Rows of d(cross-entropy)/dθ of each example at ``model`` (flattened in parameter order)."""
    if not len(y):
        return np.zeros((0, sum(p.numel() for p in model.parameters())))
    from torch.func import functional_call, grad, vmap
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, yi.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, torch.from_numpy(np.asarray(x, dtype=np.float32)),
                                              torch.from_numpy(np.asarray(y, dtype=np.int64)))
    return torch.cat([g[k].reshape(len(y), -1) for k in params], dim=1).double().numpy()


def _state_seed(seed: int, rnd: int) -> int:
    """The public seed of the state's rounding in round ``rnd``: the same for every client."""
    return int.from_bytes(hashlib.sha256(repr((seed, "ddp-state", rnd)).encode()).digest()[:8], "little") >> 1


def next_state(p, plan_, scaler, model_bytes, model_terms: int, parts):
    """(w, m, √v, steps) of this round: the public initial model before round 1 (the linear model:
    zero weights and the released class prior as its bias, as ``bench/ddp_twin.py``), else the
    optimizer's step on the released gradient sum of the aggregate received."""
    cfg, lay = p.cfg, p.layouts.update
    if model_bytes is None:
        w = public_start(p, scaler)
        return w, np.zeros_like(w), np.zeros_like(w), 0
    if not may_release(model_terms, plan_.min_clients):
        raise RequestRefused(f"the aggregate sums {model_terms} uploads, below min-noise-clients={plan_.min_clients}: "
                             "it carries less noise than calibrated and is not decrypted")
    vec = p.opened_model(model_bytes, model_terms, parts)
    state, steps, gsum = lay.unpack_state(vec, model_terms)
    n = lay.n_params
    g = release(plan_, gsum, model_terms) / (plan_.sample_rate * max(float(scaler.count), 1.0))
    decay = max(0.0, float(cfg.ddp_weight_decay))
    opt = ServerOptimizer(cfg.server_opt, server_lr(cfg, plan_), cfg.momentum, decay,
                          public_start(p, scaler) if decay else None)
    return opt.step(state[:n], state[n:2 * n], state[2 * n:], steps, g)


def public_start(p, scaler) -> np.ndarray:
    """The public initial model: bias at the released class prior (and, linear, zero weights, as
    ``bench/ddp_twin.py``); the same for every client, from public inputs only."""
    cfg = p.cfg
    model = build_model(len(p.dataset.features), len(p.dataset.classes), cfg.hidden_sizes, cfg.seed,
                        class_counts=scaler.class_counts)
    if not cfg.hidden_sizes:
        torch.nn.init.zeros_(model.net[-1].weight)
    return flatten_params(model)


def server_lr(cfg, plan_) -> float:
    """The key holders' step: ``lr``, with Adam capped at ``ddp-lr-z / z`` (z: the plan's central
    noise multiplier), so that lr·z, which sets how far noise moves a weight, stays where the
    presets were validated (:mod:`carbonfed.federation.presets`)."""
    z = float(plan_.noise_multiplier)
    if cfg.server_opt != "adam" or z <= 0 or cfg.ddp_lr_z <= 0:
        return float(cfg.lr)
    return min(float(cfg.lr), float(cfg.ddp_lr_z) / z)


def charge_round(p, plan_, server_round: int) -> dict:
    """Charge this round's release (at the floor n_min) before any row is touched; the facts."""
    acc, delta = p.accountant, p.cfg.delta
    rel = plan_.round_release(plan_.min_clients)
    eps_before = p.epsilon()
    eps_after = acc.epsilon_after(rel, delta)
    if eps_after > p.cfg.epsilon:
        raise BudgetExceeded(f"{p.country}: round {server_round} would raise ε from {eps_before:.4f} to {eps_after:.4f}, "
                             f"above the budget ε={p.cfg.epsilon} at δ={delta}; refusing to train")
    acc.add(rel)
    dict.__setitem__(p.state, "epsilon", [acc.total_steps(), eps_after])
    p._save_accountant(acc)
    # the facts a statement may carry (privacy.statements.FACT_KEYS): the history holds the variance
    return {"noise_multiplier": plan_.noise_multiplier, "epsilon_before": eps_before, "epsilon": eps_after,
            "total_steps": acc.total_steps()}


def train_round(p, server_round: int, model_bytes, model_terms: int, stats, parts) -> dict:
    """One ``ddp+he`` round of participant ``p``: the encrypted upload and the round's facts."""
    torch.set_num_threads(1)
    p._check_terms(model_terms if model_bytes is not None else None, stats)
    scaler = p._scaler(stats, parts)
    plan_ = p.ddp_plan()
    w, m, sv, steps = next_state(p, plan_, scaler, model_bytes, model_terms, parts)
    facts = {"sample_rate": plan_.sample_rate, "steps": 1, **charge_round(p, plan_, server_round)}
    lay, state = p.layouts.update, np.concatenate([w, m, sv])
    seed = _state_seed(p.cfg.seed, server_round)
    # the model as the upload states it (encoded with the round's public rounding, the same for every client)
    shared, _, _ = lay.unpack_state(lay.pack(state, steps, np.zeros(lay.n_params), np.random.default_rng(seed))[0], 1)
    model = build_model(len(p.dataset.features), len(p.dataset.classes), p.cfg.hidden_sizes, p.cfg.seed)
    load_flat_params(model, shared[:lay.n_params])
    src = p.noise_source("ddp-train", p.country, server_round)
    rows = sample_rows(len(p.y), plan_.sample_rate, src)
    canaries = ddp_canaries(p.cfg.out_dir, p.country, server_round)     # audit-attack's canaries (none outside)
    grads = canaries.rows(model, per_example_grads(model, scaler.apply(p.x)[rows], p.y[rows]), plan_.sample_rate,
                          plan_.clip)
    grad = contribution(canaries.mechanism(plan_), grads, src)
    vec, facts["clipped_params"] = lay.pack(state, steps, grad, np.random.default_rng(seed))
    return {"update": p.seal(vec, "update", server_round), "facts": facts}

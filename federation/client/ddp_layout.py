"""The integer layouts and the public plan of a ``ddp+he`` run (distributed DP-FedSGD, issue 19).

Every vector keeps the check slots of :mod:`carbonfed.privacy.packing` (so the binding tags, the
signatures and the server's exact sum work unchanged); the noise inside is integer Skellam shares
(:mod:`carbonfed.privacy.distributed_dp`), so the exact sum of n ≥ n_min uploads carries at least
the central noise the plan calibrated.

Guarantees
----------
* :func:`ddp_plan` is a pure function of the config, the data set's schema and the number of
  training clients: every client and the server compute the same plan (calibrated for
  ``min-noise-clients`` contributors, with the statistics releases as its prior).
* :class:`ShareStage`: one statistics stage whose per-record contributions (the stage layout's
  own ``local_sums`` of each row) are scaled, conditionally rounded row by row to the L2 bound
  Δ₂, summed, plus a Skellam share ``Sk((σ_s·Δ₂)² / n_min)``: one record moves the sum by ≤ Δ₂.
  :attr:`ShareStage.release` is the mechanism the clients charge (central variance (σ_s·Δ₂)²).
* :class:`DDPUpdateLayout`: ``[1, optimizer steps, fixed-point (w, m, √v), gradient integers]``.
  The state part is the same for every honest contributor (same inputs, same public rounding
  seed), so the sum divided by its terms is it exactly; the gradient part is the sum of the
  contributions. :meth:`DDPUpdateLayout.unpack_sum` returns the model part only (evaluation,
  report, the model average).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from carbonfed.data.features import Standardizer
from carbonfed.federation.config import RunConfig
from carbonfed.models.mlp import build_model
from carbonfed.models.params import num_params
from carbonfed.privacy.distributed_dp import DDPPlan, centred, plan, skellam_release
from carbonfed.privacy.fixed_point import FixedPointCodec, WrapError
from carbonfed.privacy.he import HEParams
from carbonfed.privacy.packing import checked_length, strip_checks, with_checks
from carbonfed.privacy.quantize import DEFAULT_BETA, conditional_round, rounded_l2_bound
from carbonfed.privacy.randomness import NoiseSource
from carbonfed.privacy.skellam import Release, skellam_share
from carbonfed.privacy.stats_release import AsinhLayout, RefineLayout, StatsLayout

STATS_SCALE = 1024.0     # largest integer units of a statistics release (smaller if the sum could wrap)
# The range of the model in the ddp state: the server optimizer's model is no client's clipped
# update but post-processing of released sums, and leaves ±8 (OWID, momentum lr 2: |w| up to 16;
# clipped at 8 its held-out accuracy fell from 0.75 to 0.62); at 64 the resolution is 6e-5.
MODEL_RANGE = 64.0


@dataclass(frozen=True)
class ShareStage:
    """One statistics stage (``base``: a StatsLayout, RefineLayout or AsinhLayout) released with
    Skellam shares calibrated for ``min_clients`` contributors, ``max_clients`` at most (the
    public max-clients-per-round, so that the integer units do not depend on the federation)."""

    base: object
    sigma: float          # central noise multiplier σ_s
    min_clients: int
    max_clients: int

    @property
    def stage1(self) -> StatsLayout:
        return self.base if isinstance(self.base, StatsLayout) else self.base.stage1

    @property
    def length(self) -> int:
        return self.base.length

    @property
    def log_bound(self) -> float:
        """The range of the log transform the released statistics describe (the base layout's)."""
        return self.stage1.log_bound

    @property
    def sensitivity(self) -> float:
        return self.base.sensitivity

    @property
    def noise_multiplier(self) -> float:
        return self.sigma

    @property
    def scale(self) -> float:
        """≤ STATS_SCALE, and a power of two at which ``max_clients`` full sums fill at most half the centred range."""
        s1 = self.stage1
        room = (s1.plain_modulus - 1) // 2 / 2 / (self.max_clients * s1.max_client_samples * self.sensitivity)
        return float(min(STATS_SCALE, 2.0 ** math.floor(math.log2(room))))

    @property
    def l2(self) -> float:
        return rounded_l2_bound(self.sensitivity * self.scale, self.length, DEFAULT_BETA)

    @property
    def release(self) -> Release:
        """The mechanism of this release (central noise, every record), as the clients charge it."""
        return skellam_release(self.sensitivity, self.length, self.scale, self.sigma)

    @property
    def share_variance(self) -> float:
        return (self.sigma * self.l2) ** 2 / self.min_clients

    def _rows(self, x_raw: np.ndarray, second) -> np.ndarray:
        """Each record's contribution (the base layout's sums of that one row)."""
        if isinstance(self.base, StatsLayout):
            return np.stack([self.base.local_sums(x_raw[i:i + 1], second[i:i + 1]) for i in range(len(x_raw))])
        return np.stack([self.base.local_sums(x_raw[i:i + 1], second) for i in range(len(x_raw))])

    def pack(self, x_raw: np.ndarray, second, noise: NoiseSource) -> np.ndarray:
        """``second``: the labels (stage 1) or the previous stage's scaler."""
        rows = self._rows(np.asarray(x_raw, dtype=np.float64), second) * self.scale
        n_payload = rows.shape[1]
        total = conditional_round(rows, self.l2, noise).sum(axis=0)
        total += skellam_share(noise, self.share_variance, n_payload)
        return with_checks(total)

    def unpack_sum(self, vec: np.ndarray, terms: int, prev: Standardizer | None = None) -> Standardizer:
        what = f"{getattr(self.base, 'name', 'statistics')} aggregate"
        payload = centred(strip_checks(vec, terms, what), self.stage1.plain_modulus)
        # an honest sum: every row at its bound, and the noise within 40 standard deviations
        bound = terms * self.stage1.max_client_samples * math.ceil(self.l2) + 40 * math.sqrt(self.share_variance * terms)
        if np.abs(payload).max(initial=0) > bound:
            raise WrapError(f"{what}: an entry beyond what {terms} honest uploads reach (a wrap or a dishonest term)")
        sums = payload.astype(np.float64) / self.scale
        if isinstance(self.base, StatsLayout):
            return Standardizer.from_sums(sums, self.base.n_features, self.base.n_classes, self.base.log_bound)
        return self.base.scaler_from_sums(sums, prev, terms)


@dataclass(frozen=True)
class DDPUpdateLayout:
    """``[1, k, fixed-point (w, m, √v) (3P), gradient integers (P)]`` with check slots."""

    n_params: int
    codec: FixedPointCodec        # the model w (clip param-clip): what evaluation and the model average read
    opt_codec: FixedPointCodec    # the optimizer state (m, √v), in gradient units
    plain_modulus: int

    @property
    def length(self) -> int:
        return checked_length(2 + 4 * self.n_params)

    def pack(self, state: np.ndarray, steps: int, grad: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """(the integer vector, number of state values the codec clipped); ``state`` = (w, m, √v)."""
        state = np.asarray(state, dtype=np.float64)
        if state.shape != (3 * self.n_params,) or np.shape(grad) != (self.n_params,):
            raise ValueError(f"a ddp upload needs 3×{self.n_params} state values and {self.n_params} gradient integers")
        p = self.n_params
        zw, cw = self.codec.encode(state[:p], rng)
        zo, co = self.opt_codec.encode(state[p:], rng)
        return with_checks(np.concatenate([[1, int(steps)], zw, zo, np.asarray(grad, dtype=np.int64)])), cw + co

    def unpack_state(self, vec: np.ndarray, terms: int) -> tuple[np.ndarray, int, np.ndarray]:
        """((w, m, √v), steps, the gradient sum's integers) of an aggregate of ``terms`` uploads."""
        payload = strip_checks(vec, terms, "ddp aggregate")
        p = self.n_params
        if int(payload[0]) != terms or int(payload[1]) % terms:
            raise WrapError(f"ddp aggregate: count {payload[0]} / steps {payload[1]} impossible for {terms} uploads")
        self.codec.check_sum(payload[2:2 + p], terms)
        self.opt_codec.check_sum(payload[2 + p:2 + 3 * p], terms)
        state = np.concatenate([self.codec.decode(payload[2:2 + p]), self.opt_codec.decode(payload[2 + p:2 + 3 * p])]) / terms
        return state, int(payload[1]) // terms, self.gradient(payload)

    def gradient(self, payload: np.ndarray) -> np.ndarray:
        """The gradient sum's integers of a payload whose check slots were removed."""
        return payload[2 + 3 * self.n_params:2 + 4 * self.n_params]

    def unpack_sum(self, vec: np.ndarray, terms: int) -> tuple[np.ndarray, int]:
        """(the mean model w, terms): the model of an aggregate or of a sum of aggregates."""
        payload = strip_checks(vec, terms, "model aggregate")
        if int(payload[0]) != terms:
            raise WrapError(f"ddp model aggregate: count {payload[0]} impossible for {terms} uploads")
        w = payload[2:2 + self.n_params]
        self.codec.check_sum(w, terms)
        return self.codec.decode(w) / terms, terms


def stage_bases(cfg: RunConfig, n_features: int, n_classes: int, share_sigma: float) -> list:
    """The run's statistics stage layouts (noise multiplier: each share's, σ_s / √n_min)."""
    t = HEParams().plain_modulus
    stats = StatsLayout(n_features, n_classes, cfg.max_client_samples, share_sigma, t, cfg.max_clients_per_round,
                        cfg.log_bound)
    return [stats, RefineLayout(stats), AsinhLayout(stats)][:cfg.stats_releases]


@functools.lru_cache(maxsize=16)
def share_stages(cfg: RunConfig, n_features: int, n_classes: int, n_train: int) -> tuple[ShareStage, ...]:
    """The statistics stages of a ``ddp+he`` run with ``n_train`` training clients (0: unknown,
    the server's lengths only: every stage then assumes one client)."""
    n_min = cfg.noise_floor(n_train) if n_train else 1
    sigma = cfg.stats_sigma
    share_sigma = sigma / math.sqrt(n_min) if sigma > 0 else 0.0
    return tuple(ShareStage(b, sigma, n_min, cfg.max_clients_per_round)
                 for b in stage_bases(cfg, n_features, n_classes, share_sigma))


def n_params_of(cfg: RunConfig, n_features: int, n_classes: int) -> int:
    return num_params(build_model(n_features, n_classes, cfg.hidden_sizes, cfg.seed))


def update_layout(cfg: RunConfig, n_features: int, n_classes: int) -> DDPUpdateLayout:
    t = HEParams().plain_modulus
    terms = cfg.max_clients_per_round * cfg.average_last
    # m and √v of the mean gradient (norm ≤ C plus noise): twice C, ten times that for heavy-ball momentum
    opt_clip = 2 * cfg.ddp_clip * (10 if cfg.server_opt == "momentum" else 1)
    w_clip = max(cfg.param_clip, MODEL_RANGE)
    return DDPUpdateLayout(n_params_of(cfg, n_features, n_classes), FixedPointCodec(t, clip=w_clip, max_terms=terms),
                           FixedPointCodec(t, clip=opt_clip, max_terms=terms), t)


@functools.lru_cache(maxsize=16)
def ddp_plan(cfg: RunConfig, n_features: int, n_classes: int, n_train: int) -> DDPPlan:
    """The run's public plan: ε calibrated over the statistics releases (prior) and ``rounds``
    rounds of rate q and clip C, for ``min-noise-clients`` contributors of ``n_train``."""
    prior = tuple(s.release for s in share_stages(cfg, n_features, n_classes, n_train) if s.sigma > 0)
    return plan(cfg.epsilon, cfg.delta, cfg.rounds, cfg.ddp_sample_rate, cfg.ddp_clip,
                n_params_of(cfg, n_features, n_classes), cfg.noise_floor(n_train), n_train,
                n_train * cfg.max_client_samples, HEParams().plain_modulus, prior=prior)


def round_mechanism(p: DDPPlan, contributors: int) -> dict:
    """What the ledger records of one released round: its noise and sensitivities (integer units)."""
    rel = p.round_release(contributors)
    return {"variance": rel.variance, "l2": rel.l2, "l1": rel.l1, "sample_rate": rel.sample_rate, "steps": 1}


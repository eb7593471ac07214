"""Distributed DP-FedSGD (``ddp+he``): each client adds a Skellam share of the noise, the server sums
ciphertexts exactly, the key holders release only the aggregate.

One round, for every training client (DP-FedSGD: one clipped gradient sum per round)
-----------------------------------------------------------------------------------
1. Poisson-sample its rows at the public rate ``q`` (:func:`sample_rows`).
2. Clip each sampled row's gradient at the broadcast model to L2 norm ``C``, multiply by the public
   ``scale`` s and round each row to integers by conditional randomized rounding to L2 norm
   ``Δ₂`` (:mod:`carbonfed.privacy.quantize`); sum the rows.
3. Add a Skellam share ``Sk(V / n_min)`` per coordinate (:func:`carbonfed.privacy.skellam.skellam_share`)
   and encrypt (:func:`contribution` returns the integers).
The server adds the ciphertexts (exact modulo t); the key holders decrypt the sum only if at least
``n_min`` clients contributed (:func:`may_release`, :func:`release`) and divide it by s; the
server-side optimizer (momentum, Adam) is post-processing.

Guarantees
----------
* **Sensitivity in one line.** Adding or removing one row changes one client's sum by that row's
  rounded vector: L2 ≤ ``Δ₂`` = :func:`~carbonfed.privacy.quantize.rounded_l2_bound` (C·s), L1 ≤
  ``Δ₁`` = :func:`~carbonfed.privacy.quantize.l1_bound` (Δ₂), in integer units (≈ C·s: each row is
  rounded on its own, so no other row's rounding depends on it).
* **Noise.** A released sum carries ``Sk(n·V/n_min)`` with n ≥ n_min contributors: at least the
  ``Sk(V)`` that :func:`calibrate` chose; each round is accounted at the noise it actually has
  (:meth:`DDPPlan.round_release`), a round below the floor is never released (:class:`NoiseFloorError`).
* **Accounting.** Skellam RDP (Agarwal–Kairouz–Liu 2021, Theorem 3.5) with Poisson subsampling
  (Zhu–Wang 2019, Theorem 5) composed over the rounds and the ``prior`` releases, converted at δ
  (:mod:`carbonfed.privacy.skellam`); :mod:`carbonfed.privacy.audit.ddp_epsilon` recomputes it independently.
* **Wrap.** :func:`plan` picks the largest power-of-two ``scale`` whose wrap probability over the
  whole run (every coordinate, every round, all ``max_clients`` shares) is ≤ ``wrap_target``;
  :attr:`DDPPlan.wrap_probability` states it.
* **Per upload.** Whoever decrypts one client's ciphertext sees its sum with only its own share,
  ``Sk(V/n_min)``: :func:`upload_epsilon` is that guarantee (weak by design; HE hides uploads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from carbonfed.privacy.fixed_point import WrapError
from carbonfed.privacy.quantize import (DEFAULT_BETA, conditional_round, l1_bound, rounded_l2_bound,
                                        skellam_tail, wrap_probability)
from carbonfed.privacy.randomness import NoiseSource
from carbonfed.privacy.skellam import Release, calibrate_multiplier, epsilon_of, skellam_share

HISTORY_KEYS = ("variance", "l2", "l1", "sample_rate", "steps")   # one entry of a ddp accountant history
WRAP_TARGET = 1e-12      # wrap probability of a whole run that :func:`plan` accepts
PLAUSIBLE_TAIL = 1e-12   # :func:`release` rejects entries an honest sum reaches with less probability


class NoiseFloorError(ValueError):
    """Fewer clients contributed than the noise was calibrated for: the sum is not released."""


def may_release(contributors: int, min_clients: int) -> bool:
    """Whether a sum of ``contributors`` shares carries at least the calibrated noise."""
    return int(contributors) >= int(min_clients) >= 1


@dataclass(frozen=True)
class DDPPlan:
    """The public parameters of a ``ddp+he`` run (all noise in integer units of ``1/scale``)."""

    clip: float
    scale: float
    dim: int
    sample_rate: float
    rounds: int
    min_clients: int
    max_clients: int
    max_rows: int
    plain_modulus: int
    noise_multiplier: float    # central noise std over Δ₂
    beta: float = DEFAULT_BETA
    prior: tuple[Release, ...] = field(default=())

    def __post_init__(self):
        if not (1 <= self.min_clients <= self.max_clients):
            raise ValueError(f"need 1 <= min_clients ({self.min_clients}) <= max_clients ({self.max_clients})")

    @property
    def l2(self) -> float:
        return rounded_l2_bound(self.clip * self.scale, self.dim, self.beta)

    @property
    def l1(self) -> float:
        return l1_bound(self.l2, self.dim)

    @property
    def coord_bound(self) -> int:
        """Largest magnitude of one coordinate of one row's rounded vector."""
        return int(math.floor(min(self.l2, self.clip * self.scale + 1)))

    @property
    def central_variance(self) -> float:
        return (self.noise_multiplier * self.l2) ** 2

    @property
    def share_variance(self) -> float:
        """Variance of each client's Skellam share (the Poisson mean of each side is half of it)."""
        return self.central_variance / self.min_clients

    def round_release(self, contributors: int) -> Release:
        """The mechanism of one released round with ``contributors`` shares (refuses fewer than n_min)."""
        if not may_release(contributors, self.min_clients):
            raise NoiseFloorError(f"{contributors} contributors < min-noise-clients {self.min_clients}")
        return Release(self.share_variance * contributors, self.l2, self.l1, self.sample_rate, 1)

    def planned_history(self) -> list[Release]:
        return list(self.prior) + [Release(self.central_variance, self.l2, self.l1, self.sample_rate, self.rounds)]

    def epsilon(self, delta: float) -> float:
        """ε of the planned run (every round at the floor n_min)."""
        return epsilon_of(self.planned_history(), delta)

    @property
    def wrap_probability(self) -> float:
        return wrap_probability(self.plain_modulus, self.max_rows, self.coord_bound,
                                self.share_variance * self.max_clients, self.dim, self.rounds)

    def describe(self, delta: float) -> dict:
        """The plan as plain numbers (for the report and the ledger)."""
        return {"clip": self.clip, "scale": self.scale, "dim": self.dim, "sample_rate": self.sample_rate,
                "rounds": self.rounds, "min_clients": self.min_clients, "max_clients": self.max_clients,
                "max_rows": self.max_rows, "plain_modulus": self.plain_modulus, "beta": self.beta,
                "noise_multiplier": self.noise_multiplier, "l2": self.l2, "l1": self.l1,
                "central_variance": self.central_variance, "share_variance": self.share_variance,
                "wrap_probability": self.wrap_probability, "epsilon": self.epsilon(delta),
                "upload_epsilon_per_round": upload_epsilon(self, 1, delta),
                "prior": [r.to_dict() for r in self.prior]}


@dataclass(frozen=True)
class Calibration:
    noise_multiplier: float   # central std / Δ₂
    central_variance: float   # V (integer units²)
    share_variance: float     # V / n_min: each client's Skellam share
    epsilon: float            # ε of the planned run at the floor

    @property
    def share_poisson_mean(self) -> float:
        """μ of each Poisson of a share: ``Sk = Poisson(μ) − Poisson(μ)``."""
        return self.share_variance / 2


def calibrate(epsilon: float, delta: float, rounds: int, q: float, clip: float, scale: float,
              min_clients: int, dim: int, prior=(), beta: float = DEFAULT_BETA) -> Calibration:
    """The least Skellam noise with ε(prior + ``rounds`` subsampled releases) ≤ ``epsilon``
    (and ≥ 0.998·``epsilon``) when exactly ``min_clients`` shares are summed."""
    l2 = rounded_l2_bound(clip * scale, dim, beta)
    l1 = l1_bound(l2, dim)
    z = calibrate_multiplier(epsilon, delta, lambda m: Release((m * l2) ** 2, l2, l1, q, rounds), prior)
    v = (z * l2) ** 2
    return Calibration(z, v, v / min_clients, epsilon_of(list(prior) + [Release(v, l2, l1, q, rounds)], delta))


def plan(epsilon: float, delta: float, rounds: int, sample_rate: float, clip: float, dim: int,
         min_clients: int, max_clients: int, max_rows: int, plain_modulus: int, prior=(),
         beta: float = DEFAULT_BETA, wrap_target: float = WRAP_TARGET) -> DDPPlan:
    """Calibrated plan with the largest power-of-two scale whose run-wide wrap probability ≤ ``wrap_target``."""
    half = (int(plain_modulus) - 1) // 2
    scale = 2.0 ** math.floor(math.log2(max((half / 2 / max_rows - 1) / clip, 1e-300)))
    while clip * scale >= 8:
        cal = calibrate(epsilon, delta, rounds, sample_rate, clip, scale, min_clients, dim, prior, beta)
        p = DDPPlan(clip, scale, dim, sample_rate, rounds, min_clients, max_clients, max_rows, plain_modulus,
                    cal.noise_multiplier, beta, tuple(prior))
        if p.wrap_probability <= wrap_target:
            return p
        scale /= 2
    raise ValueError(f"plain modulus {plain_modulus} too small for {max_rows} rows at this noise: no scale "
                     f"keeps the wrap probability under {wrap_target}")


def sample_rows(n_rows: int, q: float, source: NoiseSource) -> np.ndarray:
    """Poisson sample of a client's rows at the public rate ``q`` (a boolean mask)."""
    return source.poisson_mask(int(n_rows), float(q))


def clip_rows(grads: np.ndarray, clip: float) -> np.ndarray:
    """Each row scaled down to L2 norm ≤ ``clip`` (per-example clipping)."""
    g = np.atleast_2d(np.asarray(grads, dtype=np.float64))
    norms = np.linalg.norm(g, axis=1, keepdims=True)
    return g * np.minimum(1.0, clip / np.maximum(norms, 1e-300))


def contribution(plan_: DDPPlan, grads: np.ndarray, source: NoiseSource) -> np.ndarray:
    """One client's integer upload: its sampled rows' gradients (``grads``, rows × dim, clipped
    here), scaled, conditionally rounded row by row, summed, plus its Skellam share."""
    g = np.asarray(grads, dtype=np.float64).reshape(-1, plan_.dim)
    total = np.zeros(plan_.dim, dtype=np.int64)
    if len(g):
        # the clip leaves a hair of room so that float rounding never pushes a row past C·s
        rows = clip_rows(g, plan_.clip * (1 - 1e-12)) * plan_.scale
        total += conditional_round(rows, plan_.l2, source).sum(axis=0)
    total += skellam_share(source, plan_.share_variance, plan_.dim)
    if np.abs(total).max(initial=0) > (plan_.plain_modulus - 1) // 2:
        raise WrapError("a client's upload leaves the centred range of the plain modulus")
    return total


def centred(v: np.ndarray, t: int) -> np.ndarray:
    """Integers modulo ``t`` as their representatives in the centred range (−t/2, t/2]."""
    v = np.mod(np.asarray(v, dtype=np.int64), t)
    return np.where(v > t // 2, v - t, v)


def plausible_bound(plan_: DDPPlan, contributors: int) -> float:
    """Largest |coordinate| an honest sum of ``contributors`` reaches with probability ≥ 1 − ``PLAUSIBLE_TAIL``
    per run (data part at its worst, noise part by the Skellam tail bound)."""
    v = plan_.share_variance * contributors
    lo, hi = 0.0, max(1.0, 10 * math.sqrt(v))
    while skellam_tail(hi, v) * plan_.dim * plan_.rounds > PLAUSIBLE_TAIL:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if skellam_tail(mid, v) * plan_.dim * plan_.rounds > PLAUSIBLE_TAIL else (lo, mid)
    return plan_.max_rows * plan_.coord_bound + hi


def release(plan_: DDPPlan, aggregate: np.ndarray, contributors: int) -> np.ndarray:
    """The decrypted sum of ``contributors`` uploads as a (noisy) sum of clipped gradients, in the
    model's units. Raises :class:`NoiseFloorError` below the floor (the caller must not use the
    aggregate) and :class:`~carbonfed.privacy.fixed_point.WrapError` for an entry no honest sum reaches."""
    if not may_release(contributors, plan_.min_clients):
        raise NoiseFloorError(f"{contributors} contributors < min-noise-clients {plan_.min_clients}: "
                              "the round carries less noise than calibrated and is not released")
    if contributors > plan_.max_clients:
        raise WrapError(f"{contributors} contributors exceed the {plan_.max_clients} the scale was chosen for")
    z = centred(aggregate, plan_.plain_modulus)
    worst = int(np.abs(z).max(initial=0))
    if worst > plausible_bound(plan_, contributors):
        raise WrapError(f"aggregate entry {worst} is beyond what {contributors} honest uploads reach: "
                        "a wrap modulo t or a dishonest term")
    return z.astype(np.float64) / plan_.scale


def spent(plan_: DDPPlan, contributors_per_round, delta: float) -> float:
    """ε of the prior releases and every released round, each at the noise it carried."""
    return epsilon_of(list(plan_.prior) + [plan_.round_release(n) for n in contributors_per_round], delta)


def upload_epsilon(plan_: DDPPlan, rounds: int, delta: float, prior_shares=()) -> float:
    """ε of ``rounds`` uploads of one client against a party that decrypts each of them alone
    (only its own share of noise, ``Sk(V/n_min)``); ``prior_shares``: its earlier uploads'
    mechanisms (e.g. the statistics shares), composed in."""
    own = Release(plan_.share_variance, plan_.l2, plan_.l1, plan_.sample_rate, int(rounds))
    return epsilon_of(list(prior_shares) + [own], delta)


def skellam_release(sensitivity: float, dim: int, scale: float, noise_multiplier: float,
                    beta: float = DEFAULT_BETA) -> Release:
    """An unsampled release (e.g. a statistics stage) of ``dim`` values with real L2 sensitivity
    ``sensitivity``, scaled by ``scale``, rounded, with central noise std ``noise_multiplier·Δ₂``."""
    l2 = rounded_l2_bound(sensitivity * scale, dim, beta)
    return Release((noise_multiplier * l2) ** 2, l2, l1_bound(l2, dim), 1.0, 1)


@dataclass
class DDPAccountant:
    """A client's history of Skellam releases (statistics shares, then one per training round,
    each at the noise floor its share was calibrated for), kept in the client's durable state.

    Guarantees: :attr:`history` is plain JSON, one list ``[variance, l2, l1, sample_rate, steps]``
    per run of identical releases (:data:`HISTORY_KEYS`; a signed statement keeps each entry as a
    list): :meth:`add` of the mechanism the last entry holds adds to its ``steps`` (the same
    composition, as Opacus' RDP accountant keeps its history), so that the history a client signs
    every round stays a few entries long, not one per round. :meth:`state_dict` has a ``steps``
    list, so the client state's step count (``accountant_steps``) grows with it."""

    releases: list[Release] = field(default_factory=list)

    @property
    def history(self) -> list[list]:
        return [[getattr(r, k) for k in HISTORY_KEYS] for r in self.releases]

    def add(self, release: Release) -> None:
        last = self.releases[-1] if self.releases else None
        if last is not None and (last.variance, last.l2, last.l1, last.sample_rate) == (
                release.variance, release.l2, release.l1, release.sample_rate):
            self.releases[-1] = replace(last, steps=last.steps + release.steps)
        else:
            self.releases.append(release)

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.releases, delta)

    def epsilon_after(self, release: Release, delta: float) -> float:
        """ε this client would have spent after one more release."""
        return epsilon_of(self.releases + [release], delta)

    def total_steps(self) -> int:
        return sum(r.steps for r in self.releases)

    def state_dict(self) -> dict[str, list]:
        return {k: [getattr(r, k) for r in self.releases] for k in HISTORY_KEYS}

    @classmethod
    def from_state(cls, state: dict) -> "DDPAccountant":
        cols = [list(state.get(k, [])) for k in HISTORY_KEYS]
        if len({len(c) for c in cols}) > 1:
            raise ValueError("corrupt ddp accountant state: lists of different lengths")
        return cls([Release(float(v), float(a), float(b), float(q), int(s)) for v, a, b, q, s in zip(*cols)])

"""Skellam noise shares and the accountant that calibrates them (distributed DP, ``ddp+he``).

Guarantees
----------
* **Noise.** ``Sk(V)`` is ``Poisson(V/2) − Poisson(V/2)`` per coordinate: an integer with mean 0
  and variance ``V``. :func:`skellam_share` draws it from a
  :class:`~carbonfed.privacy.randomness.NoiseSource` (ChaCha20) and refuses any other generator.
  A sum of independent Skellams is Skellam (a sum of Poissons is Poisson), so ``n`` shares of
  variance ``V / n_min`` sum to exactly ``Sk(n·V / n_min)``, at least ``Sk(V)`` when ``n ≥ n_min``.
* **One release.** Agarwal, Kairouz and Liu, "The Skellam Mechanism for Differentially Private
  Federated Learning" (NeurIPS 2021), Theorem 3.5: adding ``Sk(V)`` to every coordinate of an
  integer vector whose L2 and L1 sensitivities are ``Δ₂`` and ``Δ₁`` is (α, ε(α))-RDP for every
  integer α > 1 with ``ε(α) = αΔ₂²/(2V) + min(((2α−1)Δ₂² + 6Δ₁)/(4V²), 3Δ₁/(2V))``
  (:func:`skellam_rdp`; the paper writes it with the Poisson mean μ = V/2 of each side). The first
  term is the Gaussian mechanism's; the second is the price of discreteness.
* **Subsampling.** A release whose records are Poisson-sampled at rate ``q < 1`` is accounted
  with the general upper bound of Zhu and Wang, "Poisson Subsampled Rényi Differential Privacy"
  (ICML 2019, Theorem 5: valid for any mechanism, both directions of add/remove adjacency, integer
  α), applied to the bound above, and never above the unsampled ε(α). It is looser than the
  exact bound known for Gaussians: at q = 0.05 it costs noticeably more ε, at q = 1 nothing.
* **Composition and conversion.** RDP adds over releases (adaptive composition), on the integer
  orders :data:`ORDERS`; (ε, δ) comes from Balle et al. 2020, Theorem 21 (Opacus's
  ``get_privacy_spent``). :mod:`carbonfed.privacy.audit.ddp_epsilon` recomputes the same bound with
  code that shares nothing with this module.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from opacus.accountants.analysis.rdp import get_privacy_spent
from scipy.special import gammaln, logsumexp

from carbonfed.privacy.randomness import NoiseSource

ORDERS = tuple(range(2, 257))   # integer Rényi orders (the subsampling bound needs integers)
ACCOUNTANT_NAME = "skellam-rdp (Agarwal-Kairouz-Liu 2021 Thm 3.5; Zhu-Wang 2019 Thm 5)"


def skellam_share(source: NoiseSource, variance: float, size: int) -> np.ndarray:
    """``size`` draws of ``Sk(variance)`` (int64) from the ChaCha20 stream of ``source``."""
    if not isinstance(source, NoiseSource):
        raise TypeError("Skellam noise must come from a carbonfed NoiseSource (ChaCha20), "
                        f"not {type(source).__name__}")
    if not (variance >= 0 and math.isfinite(variance)):
        raise ValueError(f"a Skellam variance must be finite and >= 0, got {variance}")
    if variance == 0:
        return np.zeros(size, dtype=np.int64)
    half = variance / 2.0
    return source.generator.poisson(half, size).astype(np.int64) - source.generator.poisson(half, size).astype(np.int64)


@dataclass(frozen=True)
class Release:
    """One Skellam mechanism, repeated ``steps`` times: noise variance ``variance`` per
    coordinate, L2 / L1 sensitivities ``l2`` / ``l1`` (all in integer units), records
    Poisson-sampled at ``sample_rate`` (1: every record)."""

    variance: float
    l2: float
    l1: float
    sample_rate: float = 1.0
    steps: int = 1

    def __post_init__(self):
        if not (self.variance > 0 and self.l2 > 0 and self.l1 > 0 and 0 < self.sample_rate <= 1 and self.steps >= 0):
            raise ValueError(f"invalid Skellam release {self}")

    @property
    def noise_multiplier(self) -> float:
        """Noise std over L2 sensitivity: the σ of the Gaussian this release resembles."""
        return math.sqrt(self.variance) / self.l2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Release":
        return cls(float(d["variance"]), float(d["l2"]), float(d["l1"]), float(d["sample_rate"]), int(d["steps"]))


def skellam_rdp(alpha: np.ndarray, variance: float, l2: float, l1: float) -> np.ndarray:
    """ε(α) of one unsampled Skellam release (Theorem 3.5, module docstring), for orders ``alpha``."""
    a = np.asarray(alpha, dtype=np.float64)
    discrete = np.minimum(((2 * a - 1) * l2 ** 2 + 6 * l1) / (4 * variance ** 2), 3 * l1 / (2 * variance))
    return a * l2 ** 2 / (2 * variance) + discrete


@functools.lru_cache(maxsize=64)
def _log_binomials(alpha: int) -> np.ndarray:
    l = np.arange(alpha + 1)
    return gammaln(alpha + 1) - gammaln(l + 1) - gammaln(alpha - l + 1)


def subsampled_rdp(q: float, base: np.ndarray) -> np.ndarray:
    """Zhu–Wang's general upper bound (Theorem 5) at the orders 2..A, given the unsampled
    ε(l) as ``base[l]`` for l = 0..A (entries 0 and 1 unused), capped at ``base[α]``."""
    top = len(base) - 1
    if q >= 1:
        return np.asarray(base[2:], dtype=np.float64)
    log_q, log_1q = math.log(q), math.log1p(-q)
    out = np.empty(top - 1)
    for alpha in range(2, top + 1):
        l = np.arange(2, alpha + 1)
        terms = _log_binomials(alpha)[2:] + l * log_q + (alpha - l) * log_1q + (l - 1) * base[2:alpha + 1]
        terms[1:] += math.log(3.0)   # the factor 3 of every term with l >= 3
        head = (alpha - 1) * log_1q + math.log1p((alpha - 1) * q)
        out[alpha - 2] = logsumexp(np.concatenate([[head], terms])) / (alpha - 1)
    return np.minimum(out, base[2:])


@functools.lru_cache(maxsize=4096)
def _release_rdp(variance: float, l2: float, l1: float, q: float) -> np.ndarray:
    base = np.concatenate([[0.0, 0.0], skellam_rdp(np.arange(2, ORDERS[-1] + 1), variance, l2, l1)])
    return subsampled_rdp(q, base)


def rdp_of(history) -> np.ndarray:
    """RDP at :data:`ORDERS` of the composition of ``history`` (an iterable of :class:`Release`)."""
    total = np.zeros(len(ORDERS))
    for r in history:
        if r.steps:
            total += r.steps * _release_rdp(float(r.variance), float(r.l2), float(r.l1), float(r.sample_rate))
    return total


def epsilon_of(history, delta: float) -> float:
    """ε at ``delta`` of the composition of ``history`` (Balle et al. 2020, Theorem 21)."""
    history = list(history)
    if not any(r.steps for r in history):
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "optimal order is the smallest alpha": ε is large, not wrong
        eps, _ = get_privacy_spent(orders=list(ORDERS), rdp=rdp_of(history), delta=delta)
    return float(eps)


def calibrate_multiplier(target: float, delta: float, release, prior=(), rel_tol: float = 0.002) -> float:
    """Smallest noise multiplier z (to ``rel_tol`` in ε) with ε(prior + release(z)) ≤ target, where
    ``release(z)`` builds the :class:`Release` of central std ``z·Δ₂``. The result's ε lies in
    ``[(1 − rel_tol)·target, target]``."""
    prior = list(prior)
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target ε must be a positive finite number, got {target}")
    if epsilon_of(prior, delta) >= target:
        raise ValueError(f"the prior releases alone already spend ε ≥ {target}")

    def eps(z):
        return epsilon_of(prior + [release(z)], delta)

    lo, hi = 0.05, 1.0
    while eps(hi) > target:
        lo, hi = hi, hi * 2
        if hi > 1e5:
            raise ValueError("no noise reaches the target ε")
    while eps(lo) <= target and lo > 1e-4:
        lo, hi = lo / 2, lo
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        e = eps(mid)
        if e > target:
            lo = mid
        else:
            hi = mid
            if e >= (1 - rel_tol) * target:
                break
    return hi

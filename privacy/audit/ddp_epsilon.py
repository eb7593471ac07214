"""Independent recomputation of a ``ddp+he`` run's ε, for ``carbonfed verify``.

It shares no code with :mod:`carbonfed.privacy.skellam` (the accountant that calibrated the noise):

* the Skellam bound is written as the paper writes it, with the Poisson mean μ of each side
  (``Sk(μ, μ) = Poisson(μ) − Poisson(μ)``, variance 2μ): Agarwal, Kairouz and Liu 2021,
  Theorem 3.5, ``ε(α) = αΔ₂²/(4μ) + min(((2α−1)Δ₂² + 6Δ₁)/(16μ²), 3Δ₁/(4μ))``;
* Poisson subsampling (Zhu and Wang 2019, Theorem 5) is summed term by term in 60-digit
  arithmetic (``mpmath``), not in floating point with ``logsumexp``;
* RDP is converted to (ε, δ) by Google's ``dp_accounting`` (``rdp.compute_epsilon``), not Opacus.

Its input is plain numbers, as a ledger records them: a list of mechanisms
``{"variance", "l2", "l1", "sample_rate", "steps"}`` (integer units; ``variance`` is the noise
the released sum carried). :func:`numeric_skellam_rdp` computes the Rényi divergence of a shifted
one-dimensional Skellam directly from its probability mass function: a check that the closed
form is an upper bound, used by the tests.
"""

from __future__ import annotations

import functools

import mpmath
import numpy as np
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
from scipy import special

ALPHAS = list(range(2, 257))
DIGITS = 60


def _paper_bound(alpha: int, mu, d2, d1):
    """Theorem 3.5 in the paper's notation (μ per Poisson side), as an mpf."""
    a = mpmath.mpf(alpha)
    return a * d2 ** 2 / (4 * mu) + min(((2 * a - 1) * d2 ** 2 + 6 * d1) / (16 * mu ** 2), 3 * d1 / (4 * mu))


@functools.lru_cache(maxsize=1024)   # every client of a run shares its mechanisms: compute each once
def _mechanism_rdp(variance: float, l2: float, l1: float, q: float) -> list[float]:
    with mpmath.workdps(DIGITS):
        return _mechanism_rdp_mp(variance, l2, l1, q)


def _mechanism_rdp_mp(variance, l2, l1, q):
    mu, d2, d1 = mpmath.mpf(variance) / 2, mpmath.mpf(l2), mpmath.mpf(l1)
    eps = {l: _paper_bound(l, mu, d2, d1) for l in range(2, ALPHAS[-1] + 1)}
    if q >= 1:
        return [float(eps[a]) for a in ALPHAS]
    q = mpmath.mpf(q)
    grow = {l: q ** l * mpmath.exp((l - 1) * eps[l]) for l in eps}   # q^l e^{(l-1)ε(l)}
    out = []
    for a in ALPHAS:
        total = (1 - q) ** (a - 1) * (1 + (a - 1) * q) + mpmath.binomial(a, 2) * (1 - q) ** (a - 2) * grow[2]
        for l in range(3, a + 1):
            total += 3 * mpmath.binomial(a, l) * (1 - q) ** (a - l) * grow[l]
        out.append(float(min(mpmath.log(total) / (a - 1), eps[a])))
    return out


def recompute_epsilon(mechanisms: list[dict], delta: float) -> float:
    """ε at ``delta`` of the composition of ``mechanisms`` (see the module docstring)."""
    grouped: dict[tuple, int] = {}
    for m in mechanisms:
        key = (float(m["variance"]), float(m["l2"]), float(m["l1"]), float(m["sample_rate"]))
        grouped[key] = grouped.get(key, 0) + int(m["steps"])
    rdp = np.zeros(len(ALPHAS))
    for (v, l2, l1, q), steps in grouped.items():
        if steps:
            rdp += steps * np.asarray(_mechanism_rdp(v, l2, l1, q))
    if not rdp.any():
        return 0.0
    eps, _ = compute_epsilon(ALPHAS, list(rdp), delta)
    return float(eps)


def numeric_skellam_rdp(alpha: float, variance: float, shift: int) -> float:
    """D_α(Sk(V) + shift ‖ Sk(V)) of the one-dimensional Skellam, summed over its mass function
    ``P(k) = e^{−V} I_k(V)`` (``scipy.special.ive``), tails beyond 60 standard deviations left out."""
    width = int(60 * np.sqrt(variance) + abs(shift) + 60)
    k = np.arange(-width, width + 1)
    with np.errstate(divide="ignore"):
        log_p = np.log(special.ive(np.abs(k), variance))
        log_q = np.log(special.ive(np.abs(k - shift), variance))
    ok = np.isfinite(log_p) & np.isfinite(log_q)
    return float(special.logsumexp(alpha * log_q[ok] + (1 - alpha) * log_p[ok]) / (alpha - 1))

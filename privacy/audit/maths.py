"""Privacy maths the privacy statement states beside the accountant's ε: Gaussian DP and group privacy.

Guarantees
----------
* :func:`clt_mu` is the μ of the central-limit (Gaussian-DP) approximation of a composition of
  ``(σ, q, steps)`` mechanisms, the history form the clients' accountants keep (Bu, Dong, Long,
  Su 2020, "Deep learning with Gaussian differential privacy", central limit theorem:
  T Poisson-subsampled Gaussian steps are asymptotically μ-GDP with μ = q·sqrt(T·(e^{1/σ²} − 1));
  an unsubsampled Gaussian release with noise multiplier σ is exactly (1/σ)-GDP; μ-GDP composes
  as sqrt(μ₁² + μ₂² + …)). It is an approximation, not a bound: the figure of record stays the
  accountant's ε.
* :func:`gdp_delta` is δ(ε) of μ-GDP, Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2) (Dong, Roth, Su 2019,
  "Gaussian differential privacy", Corollary 2.13), computed with the second term in log space.
* :func:`gdp_epsilon` inverts it by bisection (δ(ε) decreases in ε): the ε at which μ-GDP gives δ.
* :func:`group_privacy` is the (ε, δ) of a group of k records under (ε, δ)-DP:
  (kε, k·e^{(k−1)ε}·δ) (Dwork & Roth 2014, "The Algorithmic Foundations of Differential Privacy",
  group privacy, §2.3, in its approximate-DP form).

Pure functions of numbers: nothing here reads a run, a ledger or a config.
"""

from __future__ import annotations

import math

from scipy.special import log_ndtr, ndtr


def clt_mu(history) -> float:
    """μ of the Gaussian-DP approximation of a composition of ``(σ, q, steps)`` mechanisms.

    Bu, Dong, Long, Su (2020), "Deep learning with Gaussian differential privacy": T steps of the
    Poisson-subsampled Gaussian mechanism with rate q and noise σ are asymptotically μ-GDP with
    μ = q·sqrt(T·(e^{1/σ²} − 1)) (central limit theorem). An unsubsampled Gaussian release with
    sensitivity-normalised noise σ_s is exactly (1/σ_s)-GDP. μ-GDP composes as
    sqrt(μ₁² + μ₂² + …). The result is an approximation, not a bound.
    """
    total = 0.0
    for sig, q, steps in history:
        sig, q, steps = float(sig), float(q), int(steps)
        if q >= 1.0:
            total += steps / sig ** 2
        else:
            try:
                total += q * q * steps * math.expm1(1.0 / sig ** 2)
            except OverflowError:
                return math.inf
    return math.sqrt(total)


def gdp_delta(mu: float, eps: float) -> float:
    """δ(ε) of μ-GDP: Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2) (Dong, Roth, Su 2019, Cor. 2.13)."""
    return float(ndtr(-eps / mu + mu / 2) - math.exp(eps + float(log_ndtr(-eps / mu - mu / 2))))


def gdp_epsilon(mu: float, delta: float) -> float | None:
    """The ε at which μ-GDP gives ``delta`` (bisection; δ(ε) decreases in ε).

    0 when μ-GDP already gives ``delta`` at ε = 0 (or μ = 0); None for an infinite μ or when the
    ε would exceed 10⁶.
    """
    if not (mu > 0 and math.isfinite(mu)):
        return None if not math.isfinite(mu) else 0.0
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gdp_delta(mu, hi) > delta:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            return None
    for _ in range(100):
        mid = (lo + hi) / 2
        if gdp_delta(mu, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def group_privacy(eps: float, delta: float, k: int) -> tuple[float, float]:
    """(ε, δ) of a group of ``k`` records under (ε, δ)-DP: (kε, k·e^{(k−1)ε}·δ) (Dwork & Roth 2014)."""
    return k * eps, k * math.exp((k - 1) * eps) * delta

"""Randomized rounding of clipped, scaled vectors to integers, and the plain-modulus wrap bound.

Guarantees
----------
* **Rounding.** :func:`conditional_round` rounds every entry of every row of ``y`` up with
  probability equal to its fractional part (unbiased), with uniforms from a
  :class:`~carbonfed.privacy.randomness.NoiseSource` (ChaCha20), and redraws the rounding of any row
  whose L2 norm exceeds ``bound``: conditional randomized rounding, Kairouz, Liu and Steinke, "The
  Distributed Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation" (ICML
  2021, arXiv:2102.06387, Theorem 1 there). Every returned row has L2 norm ≤ ``bound`` — always,
  not with high probability: this is what makes ``bound`` the sensitivity the accountant uses.
* :func:`rounded_l2_bound` is that paper's bound: for ‖y‖₂ ≤ n in dimension d, an unconditional
  rounding has norm ≤ n + √d always and ≤ √(n² + d/4 + √(2 ln(1/β))·(n + √d/2)) with
  probability ≥ 1 − β, so the redraw loop ends after 1/(1 − β) tries on average.
* :func:`l1_bound`: an integer vector v has ‖v‖₁ ≤ ‖v‖₂² (|vⱼ| ≤ vⱼ²) and ‖v‖₁ ≤ √d‖v‖₂.
* **Wrap.** BFV sums are exact modulo the plain modulus t. :func:`wrap_probability` bounds the
  chance that any coordinate of any released sum leaves the centred range (−t/2, t/2): the data
  part is bounded deterministically (``max_rows`` rows, each coordinate ≤ ``coord_bound``), the
  Skellam noise by the Chernoff bound of :func:`skellam_tail`, with a union bound over
  coordinates and rounds. A wrap changes only the result's usefulness, never its privacy (the
  reduction modulo t is post-processing of the noisy sum).
"""

from __future__ import annotations

import math

import numpy as np

from carbonfed.privacy.randomness import NoiseSource

DEFAULT_BETA = math.exp(-0.5)   # the conditional-rounding parameter of KLS21's experiments
MAX_TRIES = 10_000


def rounded_l2_bound(norm: float, dim: int, beta: float = DEFAULT_BETA) -> float:
    """L2 bound after conditional randomized rounding of a vector of norm ≤ ``norm`` in ``dim`` dims."""
    if norm <= 0 or dim < 1 or not (0 <= beta < 1):
        raise ValueError(f"need norm > 0, dim >= 1, 0 <= beta < 1; got {norm}, {dim}, {beta}")
    always = norm + math.sqrt(dim)
    if beta == 0:
        return always
    likely = math.sqrt(norm ** 2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(dim) / 2))
    return min(always, likely)


def l1_bound(l2: float, dim: int) -> float:
    """L1 bound of an integer vector of L2 norm ≤ ``l2`` in ``dim`` dimensions."""
    return min(math.sqrt(dim) * l2, l2 ** 2)


def conditional_round(y: np.ndarray, bound: float, source: NoiseSource) -> np.ndarray:
    """Rows of ``y`` (2-D, float) randomly rounded to integers, each row redrawn until its L2 norm
    is ≤ ``bound`` (module docstring). Raises if a row cannot meet the bound (it was not clipped)."""
    if not isinstance(source, NoiseSource):
        raise TypeError("rounding must draw from a carbonfed NoiseSource (ChaCha20)")
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    if not np.all(np.isfinite(y)):
        raise ValueError("cannot round a vector with NaN or infinite entries")
    floor = np.floor(y)
    frac = y - floor
    out = np.empty(y.shape, dtype=np.int64)
    todo = np.arange(len(y))
    for _ in range(MAX_TRIES):
        if not todo.size:
            return out
        r = floor[todo] + (source.generator.random(frac[todo].shape) < frac[todo])
        ok = np.einsum("ij,ij->i", r, r) <= bound ** 2
        out[todo[ok]] = r[ok].astype(np.int64)
        todo = todo[~ok]
    raise ValueError(f"{todo.size} row(s) could not be rounded within L2 norm {bound}: clip them first")


def skellam_tail(a: float, variance: float) -> float:
    """Chernoff bound on P(|Sk(variance)| ≥ a): 2·exp(V(√(1+u²) − 1) − a·asinh(u)), u = a/V."""
    if a <= 0:
        return 1.0
    if variance <= 0:
        return 0.0
    u = a / variance
    return min(1.0, 2 * math.exp(variance * (math.sqrt(1 + u * u) - 1) - a * math.asinh(u)))


def wrap_probability(plain_modulus: int, max_rows: int, coord_bound: float, variance: float,
                     coords: int, releases: int) -> float:
    """Upper bound on the probability that some coordinate of some of ``releases`` sums wraps:
    the sum of ≤ ``max_rows`` integer rows (each coordinate ≤ ``coord_bound``) plus ``Sk(variance)``
    leaves (−t/2, t/2) in at least one of ``coords × releases`` coordinates."""
    half = (int(plain_modulus) - 1) // 2
    margin = half - max_rows * coord_bound
    if margin <= 0:
        return 1.0
    return min(1.0, coords * releases * skellam_tail(margin + 1, variance))

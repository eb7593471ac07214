"""The one-run bound (privacy/audit/empirical.py) with the white-box audit's guesses
(federation/experiments/audit_whitebox.py FRACTIONS), on synthetic canary scores from an exact
Gaussian mechanism whose (ε, δ) is computed here independently (the analytic Gaussian curve,
Balle & Wang 2018): at ε = 3 the bound stays below 3; with a tenth of the noise (ε far above 3)
it refutes ε = 3; and the bound grows with the signal."""

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from carbonfed.privacy.audit.empirical import canary_bound

FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.25)      # as audit_whitebox.FRACTIONS (privacy may not import federation)
DELTA, M = 1e-5, 5000


def gaussian_delta(eps: float, mu: float) -> float:
    """δ(ε) of the Gaussian mechanism of sensitivity/σ = μ (tight, Balle & Wang 2018, Thm 8)."""
    return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)


MU_AT_3 = brentq(lambda mu: gaussian_delta(3.0, mu) - DELTA, 0.05, 5.0)   # the μ whose ε(δ=1e-5) is 3


def _bound(mu: float, seed: int) -> float:
    rng = np.random.default_rng(seed)
    included = rng.random(M) < 0.5
    scores = included * mu + rng.normal(size=M)
    return canary_bound(scores, included, confidence=0.95, delta=DELTA, fractions=FRACTIONS,
                        rng=rng)["epsilon_lower_bound"]


def test_the_independent_gaussian_curve():
    assert gaussian_delta(3.0, MU_AT_3) == pytest.approx(DELTA, rel=1e-6) and 0.6 < MU_AT_3 < 0.8
    assert gaussian_delta(3.0, 10 * MU_AT_3) > 0.5          # a tenth of the noise: ε(1e-5) far above 3


@pytest.mark.parametrize("seed", range(4))
def test_a_true_epsilon_3_mechanism_is_never_refuted(seed):
    assert 0.3 < _bound(MU_AT_3, seed) <= 3.0


@pytest.mark.parametrize("seed", range(3))
def test_a_tenth_of_the_noise_is_refuted(seed):
    assert _bound(10 * MU_AT_3, seed) > 3.0


def test_the_bound_grows_with_the_signal():
    bounds = [np.mean([_bound(mu, s) for s in range(3)]) for mu in (0.0, 0.5 * MU_AT_3, MU_AT_3, 3 * MU_AT_3)]
    assert bounds[0] < 0.2 and bounds == sorted(bounds)

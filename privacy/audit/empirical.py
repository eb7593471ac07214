"""The statistics of an empirical privacy audit: an ε lower bound from guesses about canaries, and
membership-inference metrics. Pure maths on numbers and arrays; how the canaries, the runs and the
scores are made is the caller's business (``carbonfed audit-attack``:
:mod:`carbonfed.federation.experiments.audit_attack`).

The bound is the one-run audit of Steinke, Nasr, Jagielski 2023 ("Privacy auditing with one (1)
training run", arXiv:2305.08846). ``m`` canaries are each included with probability 1/2 by an
independent secret coin; an attacker guesses "included" or "excluded" for ``r`` of them and is
right ``v`` times. Theorem 3.1 (approximate DP, the run's δ) bounds the tail of ``v`` under
"the mechanism is (ε, δ)-DP":

    P[W ≥ v] ≤ P[Binomial(r, e^ε/(1+e^ε)) ≥ v] + 2·m·δ·α,
    α = max_{1≤i≤v} (1/i)·P[v > Binomial(r, e^ε/(1+e^ε)) ≥ v − i]

(δ = 0 gives the pure-ε test). The largest ε that this test rejects at the requested confidence is
a *lower* bound on the ε of the mechanism.

Guarantees
----------
* :func:`p_value` is the right-hand side above, capped at 1; it grows with ε and with δ.
* :func:`epsilon_lower_bound` returns the largest ε (to ``tol``) whose p-value is at most
  ``1 − confidence``, 0 when even ε = 0 is not rejected, and never ``inf`` (it raises instead).
* :func:`canary_bound` runs one test per (score variant, k) and corrects for all of them
  (Bonferroni), so its reported bound holds with probability ≥ ``confidence`` over the coins.
* :func:`lmmse_scores` (the ``ddp+he`` white-box audit's score) depends on the observations and the
  canaries' directions only, never on the coins: any such score keeps the test valid.
* :func:`check_claim` raises :class:`AuditFailure` exactly when the bound exceeds a claimed ε.
"""

from __future__ import annotations

import numpy as np
from scipy import special, stats

K_FRACTIONS = (0.05, 0.1, 0.2, 0.5)  # guesses per side, as fractions of m (k+ = k- = fraction·m)


class AuditFailure(RuntimeError):
    """The empirical lower bound exceeds the claimed ε: the accounting or the implementation is wrong."""

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result


def p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """P[≥ v correct of r guesses] under "(ε, δ)-DP", m canaries (Steinke et al. 2023, Thm 3.1)."""
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if epsilon < 0 or not (0 <= delta <= 1):
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = float(special.expit(epsilon))                 # e^ε / (1 + e^ε): accuracy of ε-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))         # P[Binomial(r, q) >= v]
    alpha = 0.0
    if delta > 0 and v > 0:
        i = np.arange(1, v + 1)
        below = np.cumsum(stats.binom.pmf(v - i, r, q))   # P[v > Binomial(r, q) >= v - i]
        alpha = float(np.max(below / i))
    return min(1.0, beta + 2.0 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, confidence: float = 0.95, delta: float = 0.0,
                        tol: float = 1e-7) -> float:
    """Largest ε such that the test rejects "(ε, δ)-DP" (p-value ≤ 1 − confidence); 0 if none does."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    level = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) > level:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) <= level:       # p-value grows with ε (to 1 as ε → ∞ when v ≤ r)
        lo, hi = hi, hi * 2
        if hi > 1e3:      # unreachable for v <= r (the p-value tends to 1); never return inf into JSON
            raise RuntimeError(f"no upper bracket for the ε bound (m={m}, r={r}, v={v})")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) <= level:
            lo = mid
        else:
            hi = mid
    return lo


def guess_counts(scores: np.ndarray, included: np.ndarray, k: int, rng: np.random.Generator) -> tuple[int, int]:
    """(guesses, correct): "in" for the k highest scores, "out" for the k lowest, abstain on the rest."""
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    m = len(scores)
    if not 0 <= 2 * k <= m:
        raise ValueError(f"cannot make {k} guesses per side with {m} canaries")
    order = np.lexsort((rng.random(m), scores))       # ascending score, ties broken at random
    low, high = order[:k], order[m - k:] if k else order[:0]
    correct = int(included[high].sum() + (~included[low]).sum())
    return 2 * k, correct


def canary_bound(scores, included, *, confidence: float = 0.95, delta: float = 0.0,
                 fractions=K_FRACTIONS, rng: np.random.Generator | None = None) -> dict:
    """Best bound over the score variants × k = fraction·m, Bonferroni-corrected.

    ``scores``: one array (higher = "included"), or ``{name: array}`` for several score
    variants. Each of the T = variants × k tests runs at level (1 − confidence)/T, so the
    largest bound holds with probability ≥ ``confidence``.
    """
    rng = rng or np.random.default_rng()
    variants = dict(scores) if isinstance(scores, dict) else {"loss": scores}
    m = len(next(iter(variants.values())))
    ks = sorted({k for k in (int(round(f * m)) for f in fractions) if 1 <= k and 2 * k <= m})
    if not ks:
        raise ValueError(f"{m} canaries are too few for any guess")
    per_test = 1.0 - (1.0 - confidence) / (len(ks) * len(variants))
    sweep = []
    for name, sc in variants.items():
        if len(sc) != m:
            raise ValueError(f"score variant {name!r} has {len(sc)} scores for {m} canaries")
        for k in ks:
            r, v = guess_counts(sc, included, k, rng)
            sweep.append({"score": name, "k_per_side": k, "guesses": r, "correct": v,
                          "epsilon": epsilon_lower_bound(m, r, v, per_test, delta),
                          "epsilon_pure": epsilon_lower_bound(m, r, v, per_test, 0.0)})
    best = max(sweep, key=lambda s: (s["epsilon"], s["epsilon_pure"], s["correct"] / s["guesses"]))
    return {"epsilon_lower_bound": best["epsilon"],
            "epsilon_lower_bound_pure": max(s["epsilon_pure"] for s in sweep),
            "guesses": best["guesses"], "correct": best["correct"], "k_per_side": best["k_per_side"],
            "score": best["score"], "tests": len(sweep), "per_test_confidence": per_test, "sweep": sweep}


def lmmse_scores(obs: np.ndarray, dirs: np.ndarray, rate: float = 1.0, floor: float = 1e-3,
                 passes: int = 3) -> tuple[np.ndarray, float]:
    """(score per canary, estimated noise variance): the linear MMSE estimate of the inclusion
    coins from observations of a *sum* over all canaries, ``obs[t] = Σ_j x_j b_jt dirs[t, j] + n_t``
    (``x_j``: fair coins, ``b_jt``: Bernoulli(``rate``) draws, ``dirs[t, j]``: unit vectors of
    dimension D, ``n_t``: noise of variance σ² per coordinate; ``obs``: R × D, ``dirs``: R × m × D).
    The score is centred: above 0 means "more likely included".

    σ² is estimated from the observations alone, so the score is a function of what is observed
    and of auditor-chosen numbers, never of the coins: first from the energy (E|obs[t]|² = D·σ² +
    rate·m/2), then ``passes`` times from the residual of the hard decisions (score > 0) of the
    previous estimate (the energy alone is too rough when the noise is small), floored at
    ``floor``. With σ² large the score is the plain projection (Σ_t <obs[t], dirs[t, j]>,
    centred); with σ² small it is the least-squares fit, which removes the canaries' overlap. The
    Bernoulli draws' own variance is added to σ² (rate·(1 − rate)·m / (2·D))."""
    obs, dirs = np.asarray(obs, dtype=np.float64), np.asarray(dirs, dtype=np.float64)
    r, m, d = dirs.shape
    if obs.shape != (r, d):
        raise ValueError(f"observations of shape {obs.shape} for directions of shape {dirs.shape}")
    a = rate * dirs.transpose(0, 2, 1).reshape(r * d, m)           # (R·D) × m: the mean signal of x
    y = obs.reshape(-1) - a.sum(1) / 2                              # centred at the prior mean x = 1/2
    gram = a.T @ a if m <= r * d else a @ a.T

    def solve(sigma2: float) -> np.ndarray:
        lam = 4 * (sigma2 + rate * (1 - rate) * m / (2 * d))        # noise variance over the prior's 1/4
        if m <= r * d:
            return np.linalg.solve(gram + lam * np.eye(m), a.T @ y)
        return a.T @ np.linalg.solve(gram + lam * np.eye(r * d), y)

    sigma2 = max(floor, float((obs ** 2).sum() / r - rate * m / 2) / d)
    for _ in range(passes):
        hard = np.where(solve(sigma2) > 0, 0.5, -0.5)               # the decisions, centred like y
        sigma2 = max(floor, float(((y - a @ hard) ** 2).mean()))
    return solve(sigma2), sigma2


def check_claim(lower_bound: float, claimed_epsilon: float | None, confidence: float = 0.95,
                result: dict | None = None) -> None:
    """Raise :class:`AuditFailure` when the lower bound exceeds the claimed ε (no claim: no check)."""
    if claimed_epsilon is None or not lower_bound > claimed_epsilon:
        return
    raise AuditFailure(
        f"AUDIT FAILED: the empirical ε lower bound {lower_bound:.4f} exceeds the claimed ε "
        f"{claimed_epsilon:.4f}. This indicates a bug in the privacy accounting or in the DP "
        f"implementation (the bound holds with probability >= {confidence:g} if the claim is true; "
        f"a false alarm has probability <= {1 - confidence:.2g}, so rerun the audit to confirm).", result)


def mia_metrics(member_scores, nonmember_scores) -> dict:
    """ROC AUC and TPR at 1% / 0.1% FPR of 'higher score = member'."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    s = np.concatenate([member_scores, nonmember_scores]).astype(np.float64)
    fpr, tpr, _ = roc_curve(y, s)

    def tpr_at(target):
        ok = fpr <= target
        return float(tpr[ok].max()) if ok.any() else 0.0
    return {"mia_auc": float(roc_auc_score(y, s)), "tpr_at_1pct_fpr": tpr_at(0.01),
            "tpr_at_0_1pct_fpr": tpr_at(0.001)}

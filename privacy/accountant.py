"""Per-client (ε, δ) odometer over a whole federated run.

Guarantees
----------
* The state is the full list of mechanisms the client ran, as ``(noise_multiplier, sample_rate,
  steps)`` triples (the form Opacus accountants keep), so ε is always accounted over every round
  the client took part in, never one round alone. The state round-trips through
  :meth:`ClientAccountant.state_dict` / :meth:`ClientAccountant.from_state`, which is how a
  Flower client keeps it in ``context.state`` between messages.
* ε comes from Opacus's PRV accountant (Gopi et al. 2021), which gives an upper bound up to its
  numerical error bound ``eps_error``; :func:`calibrate_noise` picks the smallest noise
  multiplier whose planned total ε stays at or below the target.
* A release of unsubsampled statistics (the Gaussian mechanism) is one more triple with sample
  rate 1 and one step, composed with DP-SGD by the same accountant.
* ε of a history is computed once per process, and so is each RDP term of Opacus's domain bound
  (:func:`_memoise_opacus_rdp`): pure functions memoised, the same floats as without.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field

from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.accountants.analysis.prv import prvs as opacus_prvs

ACCOUNTANT_NAME = "opacus.prv"
EPS_ERROR = 0.01  # PRV's numerical error bound on ε, as Opacus's PRVAccountant default


def _memoise_opacus_rdp() -> None:
    """Memoise Opacus's ``rdp._compute_rdp(q, σ, α)`` in this process (Opacus 1.6.0 checked).

    The PRV accountant bounds its domain with RDP (``compute_safe_domain_size``), which
    recomputes that pure function of three numbers for every RDP order at every ε: nine tenths of
    a round's ε, the same (q, σ) pairs every round. Memoised, every value is the very same float
    and a round's ε costs a few tenths of a second less. Without that private function (another
    Opacus), nothing is memoised and ε is computed as before."""
    compute = getattr(opacus_rdp, "_compute_rdp", None)
    if callable(compute) and not hasattr(compute, "cache_info"):
        opacus_rdp._compute_rdp = functools.lru_cache(maxsize=1 << 16)(compute)
        if getattr(opacus_prvs, "_compute_rdp", None) is compute:     # its own import of the same function
            opacus_prvs._compute_rdp = opacus_rdp._compute_rdp


_memoise_opacus_rdp()


@dataclass
class ClientAccountant:
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def add(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        if steps <= 0:
            return
        if noise_multiplier <= 0 or not (0 < sample_rate <= 1):
            raise ValueError(f"invalid mechanism: noise {noise_multiplier}, sample rate {sample_rate}")
        self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.history, delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        """ε this client would have spent after one more mechanism."""
        return epsilon_of(self.history + [(noise_multiplier, sample_rate, steps)], delta)

    def total_steps(self) -> int:
        return sum(s for _, _, s in self.history)

    def state_dict(self) -> dict[str, list]:
        return {"noise_multiplier": [h[0] for h in self.history],
                "sample_rate": [h[1] for h in self.history],
                "steps": [h[2] for h in self.history]}

    @classmethod
    def from_state(cls, state: dict) -> "ClientAccountant":
        sig, q, st = (list(state.get(k, [])) for k in ("noise_multiplier", "sample_rate", "steps"))
        if not (len(sig) == len(q) == len(st)):
            raise ValueError("corrupt accountant state: lists of different lengths")
        return cls([(float(a), float(b), int(c)) for a, b, c in zip(sig, q, st)])


def _merged(history):
    """Merge consecutive identical mechanisms (same ε, much faster PRV composition)."""
    out: list[list] = []
    for sig, q, st in history:
        if out and out[-1][0] == sig and out[-1][1] == q:
            out[-1][2] += st
        else:
            out.append([sig, q, st])
    return [tuple(x) for x in out]


def epsilon_of(history, delta: float) -> float:
    """ε of a list of ``(noise_multiplier, sample_rate, steps)`` at ``delta`` (PRV accountant)."""
    if not history:
        return 0.0
    return _epsilon_merged(tuple(_merged(history)), float(delta))


@functools.lru_cache(maxsize=4096)
def _epsilon_merged(history: tuple, delta: float) -> float:
    # A pure function of its arguments: memoised because every client of equal size asks the
    # same question each round and one PRV evaluation takes a few tenths of a second.
    acc = PRVAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # log(1-q) at q=1, "optimal order" advice: not errors
        return float(acc.get_epsilon(delta=delta, eps_error=EPS_ERROR))


STATS_EPSILON_SHARE = 0.5   # the statistics releases may spend at most this share of ε


@functools.lru_cache(maxsize=256)
def stats_noise_floor(target_epsilon: float, delta: float, releases: int,
                      share: float = STATS_EPSILON_SHARE, tol: float = 0.005) -> float:
    """Smallest noise multiplier σ_s (to ``tol``) such that ``releases`` unsubsampled Gaussian
    releases alone spend at most ``share``·ε at ``delta``, so DP-SGD keeps the rest."""
    if not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise ValueError(f"target ε must be a positive finite number, got {target_epsilon}")

    def eps(sig):
        return epsilon_of([(sig, 1.0, 1)] * releases, delta)

    lo, hi = 0.1, 1.0
    while eps(hi) > share * target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e5:
            raise ValueError(f"no statistics noise keeps {releases} release(s) under ε = {share * target_epsilon}")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if eps(mid) > share * target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    prior: list[tuple[float, float, int]] | None = None, tol: float = 0.005) -> float:
    """Smallest noise multiplier σ (to ``tol``) with ε(prior + (σ, q, steps)) ≤ target."""
    prior = list(prior or [])
    if not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise ValueError(f"target ε must be a positive finite number, got {target_epsilon}")
    if epsilon_of(prior, delta) >= target_epsilon:
        raise ValueError(f"the prior releases alone already spend ε ≥ {target_epsilon}")

    def eps(sig):
        return epsilon_of(prior + [(sig, sample_rate, steps)], delta)

    lo, hi = 0.3, 2.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError("no noise multiplier reaches the target ε")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi

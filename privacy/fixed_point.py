"""Fixed-point encoding of real vectors for exact integer sums modulo a plain modulus.

Guarantees
----------
* Values are clipped to ``[-clip, clip]`` and stochastically rounded to multiples of
  ``1/scale``: the encoding is unbiased, and each entry's rounding error is below ``1/scale``.
* ``scale`` is the largest power of two for which the sum of ``max_terms`` encoded vectors stays
  strictly inside the centred range of the plain modulus, so an honest sum never wraps.
* :meth:`FixedPointCodec.check_sum` detects a sum that could only come from a wrap (or from a
  term outside the bound): every entry of an honest sum of ``terms`` vectors is at most
  ``terms * bound`` in magnitude.

The same codec serves the plaintext path, so ``he`` and ``none`` runs aggregate the very same
integers and produce the same model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class WrapError(OverflowError):
    """An aggregate lies outside what an honest sum of its terms can reach: it wrapped."""


@dataclass(frozen=True)
class FixedPointCodec:
    plain_modulus: int
    clip: float
    max_terms: int

    def __post_init__(self):
        if self.clip <= 0 or self.max_terms < 1:
            raise ValueError("clip must be > 0 and max_terms >= 1")
        if self.scale < 1:
            raise ValueError(
                f"plain modulus {self.plain_modulus} too small for {self.max_terms} terms of range ±{self.clip}")

    @property
    def scale(self) -> float:
        """Largest power of two with ``max_terms * (clip*scale + 1) <= (t-1)/2``."""
        room = (self.plain_modulus - 1) // 2 // self.max_terms - 1
        return 2.0 ** math.floor(math.log2(room / self.clip)) if room > 0 else 0.0

    @property
    def bound(self) -> int:
        """Largest magnitude of one encoded entry."""
        return int(math.ceil(self.clip * self.scale)) + 1

    @property
    def resolution(self) -> float:
        return 1.0 / self.scale

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Clip, scale and stochastically round; returns (integers, number of clipped entries)."""
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise ValueError("cannot encode a vector with NaN or infinite entries")
        clipped = int(np.count_nonzero(np.abs(x) > self.clip))
        y = np.clip(x, -self.clip, self.clip) * self.scale
        lo = np.floor(y)
        z = lo + (rng.random(y.shape) < (y - lo))
        return z.astype(np.int64), clipped

    def decode(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=np.float64) / self.scale

    def check_sum(self, z: np.ndarray, terms: int) -> None:
        """Raise :class:`WrapError` unless every entry is reachable by ``terms`` honest terms."""
        if terms > self.max_terms:
            raise WrapError(f"{terms} terms exceed the {self.max_terms} this encoding has headroom for")
        worst = int(np.abs(np.asarray(z, dtype=np.int64)).max(initial=0))
        if worst > terms * self.bound:
            raise WrapError(f"aggregate entry {worst} exceeds the {terms} x {self.bound} an honest sum can "
                            f"reach: the sum wrapped modulo {self.plain_modulus} or a term was out of range")

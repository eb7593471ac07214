"""Federated standardisation: global means and variances without pooling anyone's rows.

The public seed project fit one scaler on everyone's pooled rows, which federation forbids.
Here each training client computes the sufficient statistics of its own rows,
``(count, Σx, Σx²)`` per feature, adds Gaussian noise to them, and uploads them encrypted; the
server only sums ciphertexts, and the key holders decrypt the sum and derive the scaler.

Guarantees
----------
* Features first pass a fixed, data-independent transform: signed ``log1p`` clipped to
  ``±LOG_BOUND`` and divided by it, so every transformed value lies in [-1, 1].
* One record then changes a client's statistics vector ``(n, Σx̃, Σx̃²)`` by at most
  ``sqrt(1 + 2d)`` in L2 norm (:attr:`StatsLayout.sensitivity`); the noise added to it is
  ``N(0, (σ·sensitivity)²)`` per entry: the Gaussian mechanism with noise multiplier σ, charged
  to the client's accountant as one unsubsampled release. With σ = 0 no noise is added and the
  release is outside the DP guarantee (the report says so).
* What the release reveals: the noisy *sum over all training clients* of the three statistics,
  i.e. the global mean and variance of each transformed feature; no client's own statistics
  leave it unencrypted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from privacy.fixed_point import FixedPointCodec
from privacy.packing import IntegrityError

LOG_BOUND = 10.0     # signed log1p values are clipped to ±10 (|x| up to 22,000 passes unclipped)
STD_FLOOR = 0.02     # in transformed units: a noisy variance never collapses to zero


def transform(x: np.ndarray) -> np.ndarray:
    """Fixed, public transform into [-1, 1]: clip(sign(x)·log1p(|x|), ±LOG_BOUND) / LOG_BOUND."""
    x = np.asarray(x, dtype=np.float64)
    return np.clip(np.sign(x) * np.log1p(np.abs(x)), -LOG_BOUND, LOG_BOUND) / LOG_BOUND


@dataclass(frozen=True)
class StatsLayout:
    """Integer layout ``[check, n, Σx̃ (d), Σx̃² (d)]`` of one client's noisy statistics."""

    n_features: int
    max_client_samples: int
    noise_multiplier: float
    plain_modulus: int
    max_terms: int

    @property
    def length(self) -> int:
        return 2 + 2 * self.n_features

    @property
    def sensitivity(self) -> float:
        return math.sqrt(1 + 2 * self.n_features)

    @property
    def codec(self) -> FixedPointCodec:
        tail = 8 * self.noise_multiplier * self.sensitivity
        return FixedPointCodec(self.plain_modulus, clip=self.max_client_samples + tail + 1, max_terms=self.max_terms)

    def local_sums(self, x_raw: np.ndarray) -> np.ndarray:
        xt = transform(x_raw)[: self.max_client_samples]
        return np.concatenate([[len(xt)], xt.sum(axis=0), (xt ** 2).sum(axis=0)])

    def pack(self, x_raw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        sums = self.local_sums(x_raw)
        if self.noise_multiplier > 0:
            sums = sums + rng.normal(0.0, self.noise_multiplier * self.sensitivity, size=sums.shape)
        z, _ = self.codec.encode(sums, rng)
        return np.concatenate([[1], z]).astype(np.int64)

    def unpack_sum(self, vec: np.ndarray, terms: int) -> "Standardizer":
        vec = np.asarray(vec, dtype=np.int64)
        if int(vec[0]) != terms:
            raise IntegrityError(f"statistics aggregate: check slot reads {int(vec[0])}, expected {terms}")
        self.codec.check_sum(vec[1:], terms)
        return Standardizer.from_sums(self.codec.decode(vec[1:]), self.n_features)


@dataclass(frozen=True)
class Standardizer:
    """``(transform(x) - mean) / std`` with the federated mean and std of the transformed features."""

    mean: np.ndarray
    std: np.ndarray
    count: float

    @classmethod
    def from_sums(cls, sums: np.ndarray, d: int) -> "Standardizer":
        n = float(sums[0])
        if n < 1:
            raise ValueError(f"federated row count {n:.1f} is not positive: too few clients for this noise")
        mean = np.clip(sums[1:1 + d] / n, -1, 1)
        var = sums[1 + d:1 + 2 * d] / n - mean ** 2
        return cls(mean=mean, std=np.sqrt(np.maximum(var, STD_FLOOR ** 2)), count=n)

    def apply(self, x_raw: np.ndarray) -> np.ndarray:
        return ((transform(x_raw) - self.mean) / self.std).astype(np.float32)

"""Federated standardisation: global means and variances without pooling anyone's rows.

The public seed project fit one scaler on everyone's pooled rows, which federation forbids.
Here each training client computes the sufficient statistics of its own rows,
``(count per class, Σx, Σx²)`` per feature, adds Gaussian noise to them, and uploads them encrypted; the
server only sums ciphertexts, and the key holders decrypt the sum and derive the scaler.

Guarantees
----------
* Features first pass a fixed, data-independent transform: signed ``log1p`` clipped to
  ``±LOG_BOUND`` and divided by it, so every transformed value lies in [-1, 1].
* Each record contributes ``r = (x̃, a·x̃²)`` (a = ``SECOND_MOMENT_WEIGHT``) clipped to L2 norm ``CONTRIB_CLIP`` (as DP-SGD clips
  gradients; real rows are rarely clipped since |x̃| is small), plus 1 to the count of its class.
  One record therefore changes a client's statistics vector ``(counts, Σr)`` by at most
  ``sqrt(1 + CONTRIB_CLIP²)`` in L2 norm (:attr:`StatsLayout.sensitivity`); the noise added to it
  is ``N(0, (σ·sensitivity)²)`` per entry: the Gaussian mechanism with noise multiplier σ,
  charged to the client's accountant as one unsubsampled release. With σ = 0 no noise is added,
  no row is clipped (the statistics are exact) and the release is outside the DP guarantee (the
  report says so).
* What the release reveals: the noisy *sum over all training clients* of these statistics,
  i.e. the global class frequencies and the mean and variance of each transformed feature; no
  client's own statistics leave it unencrypted.

Second stage (``stats-stages = 2``, DP runs only)
-------------------------------------------------
Many transformed features have a std of 0.01–0.06 while one record may contribute up to 1: the
noise of the first release swamps their variance (estimates off by 0.3× to 3×). A second
release measures each feature in its own unit: every record contributes
``(z, z²)`` with ``z = clip((x̃ − m₁) / s₁, ±REFINE_Z_BOUND)``, where ``m₁`` is the first-stage mean
and ``s₁ = max(|m₁|, std₁, STD_FLOOR)`` (public after stage 1), clipped to L2 norm ``REFINE_CLIP``: one
record changes a client's vector by at most ``REFINE_CLIP`` (:attr:`RefineLayout.sensitivity`),
and the release adds ``N(0, (σ·REFINE_CLIP)²)`` per entry: a second Gaussian mechanism, charged
to the same accountant. Counts are not released again (stage 1's are used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from privacy.fixed_point import FixedPointCodec
from privacy.packing import checked_length, strip_checks, with_checks
from privacy.randomness import NoiseSource

CONTRIB_CLIP = 1.0   # L2 bound of one record's (x̃, a·x̃²) contribution
SECOND_MOMENT_WEIGHT = 3.0  # a: x̃² is small next to x̃; weighting it lifts its signal above the noise
LOG_BOUND = 10.0     # signed log1p values are clipped to ±10 (|x| up to 22,000 passes unclipped)
STD_FLOOR = 0.02     # in transformed units: a noisy variance never collapses to zero
REFINE_Z_BOUND = 5.0  # stage 2: |z| is clipped to 5 first-stage units
REFINE_CLIP = 20.0    # stage 2: L2 bound of one record's (z, z²) contribution


def transform(x: np.ndarray) -> np.ndarray:
    """Fixed, public transform into [-1, 1]: clip(sign(x)·log1p(|x|), ±LOG_BOUND) / LOG_BOUND."""
    x = np.asarray(x, dtype=np.float64)
    return np.clip(np.sign(x) * np.log1p(np.abs(x)), -LOG_BOUND, LOG_BOUND) / LOG_BOUND


def _noisy_vector(layout, sums: np.ndarray, noise: NoiseSource) -> np.ndarray:
    """The Gaussian mechanism on a client's sums (noise std σ·sensitivity per entry, drawn from
    ``noise``; none when σ = 0), fixed-point encoded with the layout's codec, check slots added."""
    if layout.noise_multiplier > 0:
        sums = sums + noise.normal(layout.noise_multiplier * layout.sensitivity, sums.shape)
    z, _ = layout.codec.encode(sums, noise.generator)
    return with_checks(z)


@dataclass(frozen=True)
class StatsLayout:
    """Integer layout ``[check, n per class (k), Σx̃ (d), Σx̃² (d)]`` of one client's noisy statistics."""

    n_features: int
    n_classes: int
    max_client_samples: int
    noise_multiplier: float
    plain_modulus: int
    max_terms: int

    @property
    def length(self) -> int:
        return checked_length(self.n_classes + 2 * self.n_features)

    @property
    def sensitivity(self) -> float:
        return math.sqrt(1 + CONTRIB_CLIP ** 2)

    @property
    def codec(self) -> FixedPointCodec:
        tail = 8 * self.noise_multiplier * self.sensitivity
        # |x̃| ≤ 1, so an unclipped row contributes at most a = SECOND_MOMENT_WEIGHT per entry
        bound = self.max_client_samples * max(1.0, CONTRIB_CLIP, SECOND_MOMENT_WEIGHT)
        return FixedPointCodec(self.plain_modulus, clip=bound + tail + 1, max_terms=self.max_terms)

    def local_sums(self, x_raw: np.ndarray, y: np.ndarray) -> np.ndarray:
        xt = transform(x_raw)
        if len(xt) > self.max_client_samples:
            raise ValueError(f"{len(xt)} rows exceed max-client-samples={self.max_client_samples}")
        r = np.concatenate([xt, SECOND_MOMENT_WEIGHT * xt ** 2], axis=1)
        if self.noise_multiplier > 0:  # the clip bounds the sensitivity of the noisy (DP) release only
            norms = np.linalg.norm(r, axis=1, keepdims=True)
            r = r * np.minimum(1.0, CONTRIB_CLIP / np.maximum(norms, 1e-12))
        counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=self.n_classes)[: self.n_classes]
        return np.concatenate([counts, r.sum(axis=0)])

    def pack(self, x_raw: np.ndarray, y: np.ndarray, noise: NoiseSource) -> np.ndarray:
        return _noisy_vector(self, self.local_sums(x_raw, y), noise)

    def unpack_sum(self, vec: np.ndarray, terms: int) -> "Standardizer":
        payload = strip_checks(vec, terms, "statistics aggregate")
        self.codec.check_sum(payload, terms)
        return Standardizer.from_sums(self.codec.decode(payload), self.n_features, self.n_classes)


@dataclass(frozen=True)
class RefineLayout:
    """Integer layout ``[check, Σz (d), Σz² (d)]`` of one client's noisy second-stage statistics;
    same features, row bound, noise multiplier and modulus as its first stage ``stage1``."""

    stage1: StatsLayout

    @property
    def noise_multiplier(self) -> float:
        return self.stage1.noise_multiplier

    @property
    def length(self) -> int:
        return checked_length(2 * self.stage1.n_features)

    @property
    def sensitivity(self) -> float:
        return REFINE_CLIP

    @property
    def codec(self) -> FixedPointCodec:
        tail = 8 * self.noise_multiplier * self.sensitivity
        s1 = self.stage1
        return FixedPointCodec(s1.plain_modulus, clip=s1.max_client_samples * REFINE_CLIP + tail + 1,
                               max_terms=s1.max_terms)

    def local_sums(self, x_raw: np.ndarray, base: "Standardizer") -> np.ndarray:
        if len(x_raw) > self.stage1.max_client_samples:
            raise ValueError(f"{len(x_raw)} rows exceed max-client-samples={self.stage1.max_client_samples}")
        z = np.clip((transform(x_raw) - base.mean) / base.unit, -REFINE_Z_BOUND, REFINE_Z_BOUND)
        r = np.concatenate([z, z ** 2], axis=1)
        norms = np.linalg.norm(r, axis=1, keepdims=True)
        r = r * np.minimum(1.0, REFINE_CLIP / np.maximum(norms, 1e-12))
        return r.sum(axis=0)

    def pack(self, x_raw: np.ndarray, base: "Standardizer", noise: NoiseSource) -> np.ndarray:
        return _noisy_vector(self, self.local_sums(x_raw, base), noise)

    def unpack_sum(self, vec: np.ndarray, terms: int, base: "Standardizer") -> "Standardizer":
        payload = strip_checks(vec, terms, "second-stage statistics aggregate")
        self.codec.check_sum(payload, terms)
        return base.refined(self.codec.decode(payload))


@dataclass(frozen=True)
class Standardizer:
    """``(transform(x) - mean) / std`` with the federated mean and std of the transformed features."""

    mean: np.ndarray
    std: np.ndarray
    class_counts: np.ndarray   # noisy, clipped at 1

    @property
    def count(self) -> float:
        return float(self.class_counts.sum())

    @classmethod
    def from_sums(cls, sums: np.ndarray, d: int, k: int) -> "Standardizer":
        counts = np.asarray(sums[:k], dtype=np.float64)
        n = float(counts.sum())
        if n < 1:
            raise ValueError(f"federated row count {n:.1f} is not positive: too few clients for this noise")
        mean = np.clip(sums[k:k + d] / n, -1, 1)
        var = sums[k + d:k + 2 * d] / SECOND_MOMENT_WEIGHT / n - mean ** 2
        return cls(mean=mean, std=np.sqrt(np.maximum(var, STD_FLOOR ** 2)), class_counts=np.maximum(counts, 1.0))

    @property
    def unit(self) -> np.ndarray:
        """Per-feature unit of the second stage: ``max(|mean|, std, STD_FLOOR)`` of this
        (first-stage) scaler; for the skewed, non-negative features here |mean| ≈ std."""
        return np.maximum(np.maximum(np.abs(self.mean), self.std), STD_FLOOR)

    def refined(self, sums: np.ndarray) -> "Standardizer":
        """Mean and std from the second-stage sums ``(Σz, Σz²)`` measured in :attr:`unit`."""
        d, n = len(self.mean), self.count
        mz = np.clip(sums[:d] / n, -REFINE_Z_BOUND, REFINE_Z_BOUND)
        var = self.unit ** 2 * (sums[d:2 * d] / n - mz ** 2)
        return Standardizer(mean=self.mean + self.unit * mz, std=np.sqrt(np.maximum(var, STD_FLOOR ** 2)),
                            class_counts=self.class_counts)

    def class_weights(self, power: float) -> np.ndarray:
        """Loss weights ∝ (1/frequency)^power, normalised to average 1 over the federation's rows."""
        freq = self.class_counts / self.class_counts.sum()
        w = freq ** -power
        return w / float((freq * w).sum())

    def apply(self, x_raw: np.ndarray) -> np.ndarray:
        return ((transform(x_raw) - self.mean) / self.std).astype(np.float32)

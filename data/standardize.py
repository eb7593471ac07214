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

Third stage (``stats-stages = 3``, DP runs only): features the linear decision needs
--------------------------------------------------------------------------------------------
The seed categories are linear in the raw features (nearest class mean after the pooled
scaler, ``bench/ceiling.py``), and the log transform bends that boundary. The third release
moves the model onto ``u = asinh(x / c)``, linear up to the per-feature scale ``c`` and
logarithmic beyond it, which keeps the heavy tails bounded enough to clip. ``c`` comes from the
stage-2 scaler alone (public by then): ``c = expm1(LOG_BOUND · (|m₂| + ASINH_K · s₂))``, a high
quantile of |x| had the transformed feature been normal. Each record contributes ``(z, z²)``
with ``z = clip((u − ASINH_CENTER) / ASINH_UNIT, ±ASINH_Z_BOUND)``, clipped to L2 norm
``ASINH_CLIP`` (:attr:`AsinhLayout.sensitivity`); the release adds ``N(0, (σ·ASINH_CLIP)²)`` per
entry: a third Gaussian mechanism, charged to the same accountant. The model's input is then
``(u − mean) / std`` with that release's mean and std. The variance is floored where the
release cannot resolve it: at ``ASINH_FLOOR_SDS`` (2) standard deviations of the noise on its
second-moment term, ``ASINH_UNIT² · σ · ASINH_CLIP · √terms / n`` (σ per client, ``terms`` clients, ``n`` rows), and at
least ``ASINH_STD_FLOOR²`` (:meth:`AsinhLayout.var_floor`; std floor 0.093 in the main job). A lower
floor let the noise pull a feature's variance towards zero and blow that input up (``bench/twin.py``:
validation accuracy +0.004 ± 0.001 paired over 40 draws, held-out unchanged).
Not the default: where many rows exceed the log transform's range (|x| > e^LOG_BOUND ≈ 22,000:
OWID's energy and GDP per capita), ``c`` lands far above the data (about 10^12), u ≈ 0 and the
feature vanishes (OWID, ε = 3: 0.082 held-out accuracy against 0.484 with two stages).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

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
ASINH_K = 3.5         # stage 3: c = expm1(LOG_BOUND·(|m₂| + ASINH_K·s₂)) per feature
ASINH_CENTER = 0.15   # stage 3: z = (asinh(x / c) − ASINH_CENTER) / ASINH_UNIT: with c near the
ASINH_UNIT = 0.2      # 99th percentile of |x|, asinh(x / c) has a mean near 0.15 and a std near 0.2
ASINH_Z_BOUND = 10.0  # stage 3: |z| is clipped to 10 units
ASINH_CLIP = 20.0     # stage 3: L2 bound of one record's (z, z²) contribution
ASINH_STD_FLOOR = 0.05  # stage 3: the std floor (asinh units) of exact statistics, and the least one
ASINH_FLOOR_SDS = 2.0   # stage 3 under noise: the variance floor in noise SDs of its second-moment term


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
class _MomentStage:
    """A later statistics release: integer layout ``[check, Σz (d), Σz² (d)]`` of one client's
    noisy per-feature moments of ``z``, a clipped function of its rows and the previous stage's
    scaler; same features, row bound, noise multiplier and modulus as the first stage ``stage1``.
    Subclasses say what ``z`` is (:meth:`_z`) and what the sums make (:meth:`scaler_from_sums`)."""

    stage1: StatsLayout
    name: ClassVar[str]       # what the aggregate is called in errors
    clip: ClassVar[float]     # L2 bound of one record's (z, z²)
    z_bound: ClassVar[float]  # |z| bound

    @property
    def noise_multiplier(self) -> float:
        return self.stage1.noise_multiplier

    @property
    def length(self) -> int:
        return checked_length(2 * self.stage1.n_features)

    @property
    def sensitivity(self) -> float:
        return self.clip

    @property
    def codec(self) -> FixedPointCodec:
        tail = 8 * self.noise_multiplier * self.sensitivity
        s1 = self.stage1
        return FixedPointCodec(s1.plain_modulus, clip=s1.max_client_samples * self.clip + tail + 1,
                               max_terms=s1.max_terms)

    def _z(self, x_raw: np.ndarray, prev: "Standardizer") -> np.ndarray:
        raise NotImplementedError

    def scaler_from_sums(self, sums: np.ndarray, prev: "Standardizer", terms: int) -> "Standardizer":
        """The scaler from the sum of ``terms`` clients' noisy sums."""
        raise NotImplementedError

    def local_sums(self, x_raw: np.ndarray, prev: "Standardizer") -> np.ndarray:
        if len(x_raw) > self.stage1.max_client_samples:
            raise ValueError(f"{len(x_raw)} rows exceed max-client-samples={self.stage1.max_client_samples}")
        z = np.clip(self._z(np.asarray(x_raw, dtype=np.float64), prev), -self.z_bound, self.z_bound)
        r = np.concatenate([z, z ** 2], axis=1)
        norms = np.linalg.norm(r, axis=1, keepdims=True)
        r = r * np.minimum(1.0, self.clip / np.maximum(norms, 1e-12))
        return r.sum(axis=0)

    def pack(self, x_raw: np.ndarray, prev: "Standardizer", noise: NoiseSource) -> np.ndarray:
        return _noisy_vector(self, self.local_sums(x_raw, prev), noise)

    def unpack_sum(self, vec: np.ndarray, terms: int, prev: "Standardizer") -> "Standardizer":
        payload = strip_checks(vec, terms, f"{self.name} aggregate")
        self.codec.check_sum(payload, terms)
        return self.scaler_from_sums(self.codec.decode(payload), prev, terms)


@dataclass(frozen=True)
class RefineLayout(_MomentStage):
    """Stage 2: the transformed features in the units of the first-stage scaler (module docstring)."""

    name = "second-stage statistics"
    clip = REFINE_CLIP
    z_bound = REFINE_Z_BOUND

    def _z(self, x_raw, prev):
        return (transform(x_raw) - prev.mean) / prev.unit

    def scaler_from_sums(self, sums, prev, terms):
        return prev.refined(sums)


@dataclass(frozen=True)
class AsinhLayout(_MomentStage):
    """Stage 3: ``asinh(x / c)`` with ``c`` from the stage-2 scaler (module docstring)."""

    name = "third-stage statistics"
    clip = ASINH_CLIP
    z_bound = ASINH_Z_BOUND

    def _z(self, x_raw, prev):
        return (np.arcsinh(x_raw / prev.asinh_scale) - ASINH_CENTER) / ASINH_UNIT

    def var_floor(self, terms: int, n: float) -> float:
        """The variance floor (asinh units) of ``terms`` clients' release over ``n`` rows: the
        larger of ``ASINH_STD_FLOOR²`` and ``ASINH_FLOOR_SDS`` standard deviations of the noise
        that the release puts on the second-moment term ``ASINH_UNIT² · Σz² / n`` of a variance
        estimate, ``ASINH_UNIT² · σ · clip · √terms / n`` (the noise on Σz adds to it)."""
        noise_sd = ASINH_UNIT ** 2 * self.noise_multiplier * self.clip * math.sqrt(terms) / max(n, 1.0)
        return max(ASINH_STD_FLOOR ** 2, ASINH_FLOOR_SDS * noise_sd)

    def scaler_from_sums(self, sums, prev, terms):
        return prev.asinh_features(sums, math.sqrt(self.var_floor(terms, prev.count)))


@dataclass(frozen=True)
class Standardizer:
    """``(f(x) - mean) / std`` with the federated mean and std of the features ``f(x)``:
    :func:`transform` (stages 1 and 2), or ``asinh(x / scale)`` once a third stage set ``scale``."""

    mean: np.ndarray
    std: np.ndarray
    class_counts: np.ndarray   # noisy, clipped at 1
    scale: np.ndarray | None = None   # c of asinh(x / c) (stage 3); None: the log transform
    std_floor: float | None = None    # the floor applied to std; None: STD_FLOOR or ASINH_STD_FLOOR

    @property
    def floor(self) -> float:
        """The floor this scaler's std was held to."""
        if self.std_floor is not None:
            return self.std_floor
        return ASINH_STD_FLOOR if self.scale is not None else STD_FLOOR

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

    @classmethod
    def exact(cls, x_raw: np.ndarray, y: np.ndarray, k: int, asinh: bool = False) -> "Standardizer":
        """The scaler of pooled rows with exact statistics (no noise, no clipping; outside any DP
        guarantee): the mean and std of :func:`transform`, or with ``asinh`` of ``asinh(x / c)``,
        ``c`` = :attr:`asinh_scale` of the former. Stds floored as the federated ones."""
        xt = transform(x_raw)
        counts = np.maximum(np.bincount(np.asarray(y, dtype=np.int64), minlength=k)[:k].astype(np.float64), 1.0)
        log = cls(mean=xt.mean(axis=0), std=np.maximum(xt.std(axis=0), STD_FLOOR), class_counts=counts)
        if not asinh:
            return log
        u = np.arcsinh(np.asarray(x_raw, dtype=np.float64) / log.asinh_scale)
        return cls(mean=u.mean(axis=0), std=np.maximum(u.std(axis=0), ASINH_STD_FLOOR), class_counts=counts,
                   scale=log.asinh_scale)

    def _log_only(self, what: str) -> None:
        if self.scale is not None:
            raise ValueError(f"{what} is defined for a scaler of log-transformed features, not of asinh features")

    @property
    def unit(self) -> np.ndarray:
        """Per-feature unit of the second stage: ``max(|mean|, std, STD_FLOOR)`` of this
        (first-stage) scaler; for the skewed, non-negative features here |mean| ≈ std."""
        self._log_only("the second-stage unit")
        return np.maximum(np.maximum(np.abs(self.mean), self.std), STD_FLOOR)

    def refined(self, sums: np.ndarray) -> "Standardizer":
        """Mean and std from the second-stage sums ``(Σz, Σz²)`` measured in :attr:`unit`."""
        d, n = len(self.mean), self.count
        mz = np.clip(sums[:d] / n, -REFINE_Z_BOUND, REFINE_Z_BOUND)
        var = self.unit ** 2 * (sums[d:2 * d] / n - mz ** 2)
        return Standardizer(mean=self.mean + self.unit * mz, std=np.sqrt(np.maximum(var, STD_FLOOR ** 2)),
                            class_counts=self.class_counts)

    @property
    def asinh_scale(self) -> np.ndarray:
        """Per-feature ``c`` of the third stage, from this (second-stage) scaler of the log
        features: ``expm1(LOG_BOUND · (|mean| + ASINH_K · std))``."""
        self._log_only("the asinh scale")
        return np.expm1(LOG_BOUND * (np.abs(self.mean) + ASINH_K * self.std))

    def asinh_features(self, sums: np.ndarray, std_floor: float = ASINH_STD_FLOOR) -> "Standardizer":
        """The scaler of ``asinh(x / c)`` from the third-stage sums ``(Σz, Σz²)``, std floored at ``std_floor``."""
        d, n = len(self.mean), self.count
        mz = np.clip(sums[:d] / n, -ASINH_Z_BOUND, ASINH_Z_BOUND)
        var = ASINH_UNIT ** 2 * (sums[d:2 * d] / n - mz ** 2)
        return Standardizer(mean=ASINH_CENTER + ASINH_UNIT * mz, std=np.sqrt(np.maximum(var, std_floor ** 2)),
                            class_counts=self.class_counts, scale=self.asinh_scale, std_floor=float(std_floor))

    def class_weights(self, power: float) -> np.ndarray:
        """Loss weights ∝ (1/frequency)^power, normalised to average 1 over the federation's rows."""
        freq = self.class_counts / self.class_counts.sum()
        w = freq ** -power
        return w / float((freq * w).sum())

    def features(self, x_raw: np.ndarray) -> np.ndarray:
        """The unscaled features: ``asinh(x / scale)``, or :func:`transform` without a scale."""
        if self.scale is None:
            return transform(x_raw)
        return np.arcsinh(np.asarray(x_raw, dtype=np.float64) / self.scale)

    def apply(self, x_raw: np.ndarray) -> np.ndarray:
        return ((self.features(x_raw) - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict:
        """Plain lists (JSON, ``model.pt``); :meth:`from_dict` restores the same scaler."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "class_counts": self.class_counts.tolist(),
                "scale": None if self.scale is None else self.scale.tolist(), "std_floor": self.std_floor}

    @classmethod
    def from_dict(cls, d: dict) -> "Standardizer":
        arr = lambda v: np.asarray(v, dtype=np.float64)   # noqa: E731
        return cls(mean=arr(d["mean"]), std=arr(d["std"]), class_counts=arr(d["class_counts"]),
                   scale=None if d.get("scale") is None else arr(d["scale"]), std_floor=d.get("std_floor"))

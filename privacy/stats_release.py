"""Federated statistics releases (the Gaussian mechanism on clipped sufficient statistics): global means and variances without pooling anyone's rows.

The public seed project fit one scaler on everyone's pooled rows, which federation forbids.
Here each training client computes the sufficient statistics of its own rows,
``(count per class, Σx, Σx²)`` per feature, adds Gaussian noise to them, and uploads them encrypted; the
server only sums ciphertexts, and the key holders decrypt the sum and derive the scaler.

Guarantees
----------
* Features first pass a fixed, data-independent transform: signed ``log1p`` clipped to
  ``±log_bound`` (:attr:`StatsLayout.log_bound`, the data set's public range) and divided by it,
  so every transformed value lies in [-1, 1].
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

from carbonfed.data import features as F   # the constants by module, so that a bench can vary them
from carbonfed.data.features import Standardizer
from carbonfed.privacy.fixed_point import FixedPointCodec
from carbonfed.privacy.packing import checked_length, strip_checks, with_checks
from carbonfed.privacy.randomness import NoiseSource

CONTRIB_CLIP = 1.0   # L2 bound of one record's (x̃, a·x̃²) contribution
REFINE_CLIP = 20.0    # stage 2: L2 bound of one record's (z, z²) contribution
ASINH_CLIP = 20.0     # stage 3: L2 bound of one record's (z, z²) contribution
ASINH_FLOOR_SDS = 2.0   # stage 3 under noise: the variance floor in noise SDs of its second-moment term


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
    log_bound: float = F.LOG_BOUND   # range of the log transform (carbonfed.data.features.transform)

    @property
    def length(self) -> int:
        return checked_length(self.n_classes + 2 * self.n_features)

    @property
    def sensitivity(self) -> float:
        return math.sqrt(1 + CONTRIB_CLIP ** 2)

    @property
    def codec(self) -> FixedPointCodec:
        tail = 8 * self.noise_multiplier * self.sensitivity
        # |x̃| ≤ 1, so an unclipped row contributes at most a = F.SECOND_MOMENT_WEIGHT per entry
        bound = self.max_client_samples * max(1.0, CONTRIB_CLIP, F.SECOND_MOMENT_WEIGHT)
        return FixedPointCodec(self.plain_modulus, clip=bound + tail + 1, max_terms=self.max_terms)

    def local_sums(self, x_raw: np.ndarray, y: np.ndarray) -> np.ndarray:
        xt = F.transform(x_raw, self.log_bound)
        if len(xt) > self.max_client_samples:
            raise ValueError(f"{len(xt)} rows exceed max-client-samples={self.max_client_samples}")
        r = np.concatenate([xt, F.SECOND_MOMENT_WEIGHT * xt ** 2], axis=1)
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
        return Standardizer.from_sums(self.codec.decode(payload), self.n_features, self.n_classes, self.log_bound)


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
    z_bound = F.REFINE_Z_BOUND

    def _z(self, x_raw, prev):
        return (prev.features(x_raw) - prev.mean) / prev.unit   # the log transform at prev's (stage 1's) range

    def scaler_from_sums(self, sums, prev, terms):
        return prev.refined(sums)


@dataclass(frozen=True)
class AsinhLayout(_MomentStage):
    """Stage 3: ``asinh(x / c)`` with ``c`` from the stage-2 scaler (module docstring)."""

    name = "third-stage statistics"
    clip = ASINH_CLIP
    z_bound = F.ASINH_Z_BOUND

    def _z(self, x_raw, prev):
        return (np.arcsinh(x_raw / prev.asinh_scale) - F.ASINH_CENTER) / F.ASINH_UNIT

    def var_floor(self, terms: int, n: float) -> float:
        """The variance floor (asinh units) of ``terms`` clients' release over ``n`` rows: the
        larger of ``ASINH_STD_FLOOR²`` and ``ASINH_FLOOR_SDS`` standard deviations of the noise
        that the release puts on the second-moment term ``ASINH_UNIT² · Σz² / n`` of a variance
        estimate, ``ASINH_UNIT² · σ · clip · √terms / n`` (the noise on Σz adds to it)."""
        noise_sd = F.ASINH_UNIT ** 2 * self.noise_multiplier * self.clip * math.sqrt(terms) / max(n, 1.0)
        return max(F.ASINH_STD_FLOOR ** 2, ASINH_FLOOR_SDS * noise_sd)

    def scaler_from_sums(self, sums, prev, terms):
        return prev.asinh_features(sums, math.sqrt(self.var_floor(terms, prev.count)))

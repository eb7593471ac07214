"""Feature transforms and the scaler the federated statistics releases produce.

Guarantees
----------
* :func:`transform` is fixed and data-independent: signed ``log1p`` clipped to ``±log_bound`` and
  divided by it, so every transformed value lies in [-1, 1]. ``log_bound`` is a public setting of
  the data set (its preset, :mod:`carbonfed.federation.presets`): the log of a public bound of its
  variables' units, so that no real value saturates (:data:`LOG_BOUND`, 10, where every value stays
  below e^10 ≈ 22,000, as on the seed data). A :class:`Standardizer` carries the bound it was
  released with and applies the same transform.
* :class:`Standardizer` is plain arithmetic on released (or exact, pooled) sums: given the same
  sums it gives the same scaler, and it never touches a client's rows. The releases themselves
  (clipping, noise, fixed-point packing) are :mod:`carbonfed.privacy.stats_release`.
* Stage 2 measures each feature in the unit ``max(|m₁|, std₁, STD_FLOOR)`` of the first-stage
  scaler; stage 3 moves the model onto ``u = asinh(x / c)`` with
  ``c = expm1(log_bound · (|m₂| + ASINH_K · s₂))`` from the stage-2 scaler alone (public by then),
  and the model's input is ``(u − mean) / std``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SECOND_MOMENT_WEIGHT = 3.0  # a: x̃² is small next to x̃; weighting it lifts its signal above the noise
LOG_BOUND = 10.0     # the default log range: signed log1p clipped to ±10 (|x| up to 22,000 passes unclipped)
STD_FLOOR = 0.02     # in transformed units: a noisy variance never collapses to zero
REFINE_Z_BOUND = 5.0  # stage 2: |z| is clipped to 5 first-stage units
ASINH_K = 3.5         # stage 3: c = expm1(log_bound·(|m₂| + ASINH_K·s₂)) per feature
ASINH_CENTER = 0.15   # stage 3: z = (asinh(x / c) − ASINH_CENTER) / ASINH_UNIT: with c near the
ASINH_UNIT = 0.2      # 99th percentile of |x|, asinh(x / c) has a mean near 0.15 and a std near 0.2
ASINH_Z_BOUND = 10.0  # stage 3: |z| is clipped to 10 units
ASINH_STD_FLOOR = 0.05  # stage 3: the std floor (asinh units) of exact statistics, and the least one


def transform(x: np.ndarray, log_bound: float | None = None) -> np.ndarray:
    """Fixed, public transform into [-1, 1]: clip(sign(x)·log1p(|x|), ±b) / b, ``b`` = ``log_bound``
    (None: :data:`LOG_BOUND`)."""
    b = float(LOG_BOUND if log_bound is None else log_bound)
    x = np.asarray(x, dtype=np.float64)
    return np.clip(np.sign(x) * np.log1p(np.abs(x)), -b, b) / b



@dataclass(frozen=True)
class Standardizer:
    """``(f(x) - mean) / std`` with the federated mean and std of the features ``f(x)``:
    :func:`transform` (stages 1 and 2), or ``asinh(x / scale)`` once a third stage set ``scale``."""

    mean: np.ndarray
    std: np.ndarray
    class_counts: np.ndarray   # noisy, clipped at 1
    scale: np.ndarray | None = None   # c of asinh(x / c) (stage 3); None: the log transform
    std_floor: float | None = None    # the floor applied to std; None: STD_FLOOR or ASINH_STD_FLOOR
    log_bound: float = LOG_BOUND      # b of the log transform the statistics were released with

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
    def from_sums(cls, sums: np.ndarray, d: int, k: int, log_bound: float = LOG_BOUND) -> "Standardizer":
        counts = np.asarray(sums[:k], dtype=np.float64)
        n = float(counts.sum())
        if n < 1:
            raise ValueError(f"federated row count {n:.1f} is not positive: too few clients for this noise")
        mean = np.clip(sums[k:k + d] / n, -1, 1)
        var = sums[k + d:k + 2 * d] / SECOND_MOMENT_WEIGHT / n - mean ** 2
        return cls(mean=mean, std=np.sqrt(np.maximum(var, STD_FLOOR ** 2)), class_counts=np.maximum(counts, 1.0),
                   log_bound=float(log_bound))

    @classmethod
    def exact(cls, x_raw: np.ndarray, y: np.ndarray, k: int, asinh: bool = False,
              log_bound: float = LOG_BOUND) -> "Standardizer":
        """The scaler of pooled rows with exact statistics (no noise, no clipping; outside any DP
        guarantee): the mean and std of :func:`transform`, or with ``asinh`` of ``asinh(x / c)``,
        ``c`` = :attr:`asinh_scale` of the former. Stds floored as the federated ones."""
        xt = transform(x_raw, log_bound)
        counts = np.maximum(np.bincount(np.asarray(y, dtype=np.int64), minlength=k)[:k].astype(np.float64), 1.0)
        log = cls(mean=xt.mean(axis=0), std=np.maximum(xt.std(axis=0), STD_FLOOR), class_counts=counts,
                  log_bound=float(log_bound))
        if not asinh:
            return log
        u = np.arcsinh(np.asarray(x_raw, dtype=np.float64) / log.asinh_scale)
        return cls(mean=u.mean(axis=0), std=np.maximum(u.std(axis=0), ASINH_STD_FLOOR), class_counts=counts,
                   scale=log.asinh_scale, log_bound=float(log_bound))

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
                            class_counts=self.class_counts, log_bound=self.log_bound)

    @property
    def asinh_scale(self) -> np.ndarray:
        """Per-feature ``c`` of the third stage, from this (second-stage) scaler of the log
        features: ``expm1(log_bound · (|mean| + ASINH_K · std))``."""
        self._log_only("the asinh scale")
        return np.expm1(self.log_bound * (np.abs(self.mean) + ASINH_K * self.std))

    def asinh_features(self, sums: np.ndarray, std_floor: float = ASINH_STD_FLOOR) -> "Standardizer":
        """The scaler of ``asinh(x / c)`` from the third-stage sums ``(Σz, Σz²)``, std floored at ``std_floor``."""
        d, n = len(self.mean), self.count
        mz = np.clip(sums[:d] / n, -ASINH_Z_BOUND, ASINH_Z_BOUND)
        var = ASINH_UNIT ** 2 * (sums[d:2 * d] / n - mz ** 2)
        return Standardizer(mean=ASINH_CENTER + ASINH_UNIT * mz, std=np.sqrt(np.maximum(var, std_floor ** 2)),
                            class_counts=self.class_counts, scale=self.asinh_scale, std_floor=float(std_floor),
                            log_bound=self.log_bound)

    def class_weights(self, power: float) -> np.ndarray:
        """Loss weights ∝ (1/frequency)^power, normalised to average 1 over the federation's rows."""
        freq = self.class_counts / self.class_counts.sum()
        w = freq ** -power
        return w / float((freq * w).sum())

    def features(self, x_raw: np.ndarray) -> np.ndarray:
        """The unscaled features: ``asinh(x / scale)``, or :func:`transform` (at :attr:`log_bound`) without a scale."""
        if self.scale is None:
            return transform(x_raw, self.log_bound)
        return np.arcsinh(np.asarray(x_raw, dtype=np.float64) / self.scale)

    def apply(self, x_raw: np.ndarray) -> np.ndarray:
        return ((self.features(x_raw) - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict:
        """Plain lists (JSON, ``model.pt``); :meth:`from_dict` restores the same scaler."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "class_counts": self.class_counts.tolist(),
                "scale": None if self.scale is None else self.scale.tolist(), "std_floor": self.std_floor,
                "log_bound": self.log_bound}

    @classmethod
    def from_dict(cls, d: dict) -> "Standardizer":
        arr = lambda v: np.asarray(v, dtype=np.float64)   # noqa: E731
        return cls(mean=arr(d["mean"]), std=arr(d["std"]), class_counts=arr(d["class_counts"]),
                   scale=None if d.get("scale") is None else arr(d["scale"]), std_floor=d.get("std_floor"),
                   log_bound=float(d.get("log_bound", LOG_BOUND)))   # a model.pt from before the setting: 10

"""The federated data set: one table, one client per country.

:class:`FederatedDataset` guarantees, once constructed (it checks in
``__post_init__``):

* ``frame`` has exactly the columns ``country, year, *features, label``;
* features are float64 with no NaN or infinity; ``label`` is int64 in
  ``0 .. len(classes) - 1``; ``year`` is int64; ``(country, year)`` is unique;
* ``client_arrays`` returns one country's rows sorted by year, ``X`` float32 in
  ``features`` order and ``y`` int64.

The dataclass is frozen and compares by identity (a DataFrame has no
meaningful ``==``/hash); treat ``frame`` as read-only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from carbonfed.data.errors import DataError, UnknownCountryError

SOURCE_KEYS = ("path", "sha256", "rows_read", "rows_used", "url")


@dataclass(frozen=True, eq=False)
class FederatedDataset:
    """A labelled table split into per-country clients.

    Attributes:
        name: short data-set name ("seed" or "owid").
        features: feature column names, in model-input order.
        classes: human-readable class names; index = label.
        frame: columns ``country, year, *features, label``; no NaN in features/label.
        source: provenance ``{"path", "sha256", "rows_read", "rows_used", "url"}``.
    """

    name: str
    features: tuple[str, ...]
    classes: tuple[str, ...]
    frame: pd.DataFrame
    source: dict

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "classes", tuple(self.classes))
        expected = ["country", "year", *self.features, "label"]
        if list(self.frame.columns) != expected:
            raise DataError(
                f"{self.name}: frame columns must be {expected}, got {list(self.frame.columns)}"
            )
        if len(set(self.features)) != len(self.features):
            raise DataError(f"{self.name}: duplicate feature names in {list(self.features)}")
        missing_keys = [k for k in SOURCE_KEYS if k not in self.source]
        if missing_keys:
            raise DataError(f"{self.name}: source is missing key(s) {missing_keys}")
        feats = self.frame[list(self.features)]
        if not all(dtype == np.float64 for dtype in feats.dtypes):
            raise DataError(f"{self.name}: feature columns must be float64, got {dict(feats.dtypes)}")
        if not np.isfinite(feats.to_numpy()).all():
            bad = [c for c in self.features if not np.isfinite(feats[c].to_numpy()).all()]
            raise DataError(f"{self.name}: NaN or infinite values in feature column(s) {bad}")
        for col in ("year", "label"):
            if self.frame[col].dtype != np.int64:
                raise DataError(f"{self.name}: column {col!r} must be int64, got {self.frame[col].dtype}")
        labels = self.frame["label"].to_numpy()
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise DataError(
                f"{self.name}: labels must lie in 0..{len(self.classes) - 1}, "
                f"found {sorted(set(labels.tolist()) - set(range(len(self.classes))))}"
            )
        dup = self.frame.duplicated(["country", "year"])
        if dup.any():
            first = self.frame.loc[dup, ["country", "year"]].iloc[0].tolist()
            raise DataError(f"{self.name}: (country, year) must be unique, {first} repeats")

    @cached_property
    def _rows_by_country(self) -> dict[str, np.ndarray]:
        """Positional row indices per country, ordered by year."""
        order = self.frame.sort_values(["country", "year"], kind="stable")
        positions = pd.Series(np.arange(len(self.frame)), index=self.frame.index)[order.index]
        return {
            str(country): positions.to_numpy()[idx]
            for country, idx in order.groupby("country", sort=False).indices.items()
        }

    def countries(self) -> list[str]:
        """Sorted (Python ``sorted``) list of distinct country names."""
        return sorted(self._rows_by_country)

    def client_arrays(self, country: str) -> tuple[np.ndarray, np.ndarray]:
        """One country's data: ``X`` float32 ``[n, d]`` (``features`` order), ``y`` int64 ``[n]``, by year.

        Raises:
            UnknownCountryError: (a DataError and KeyError) the country is not in the set.
        """
        rows = self._rows_by_country.get(country)
        if rows is None:
            raise UnknownCountryError(
                f"{self.name}: unknown country {country!r}; "
                f"the data set has {len(self._rows_by_country)} countries (see countries())"
            )
        x, y = self._arrays
        return x[rows], y[rows]          # fancy indexing: fresh copies

    @cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row's features (float32, ``features`` order) and label (int64), converted once:
        a client asks for its rows with every message."""
        return (self.frame[list(self.features)].to_numpy(dtype=np.float32, copy=True),
                self.frame["label"].to_numpy(dtype=np.int64, copy=True))

    def all_arrays(self, countries: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """Concatenate :meth:`client_arrays` for ``countries``, in the order given.

        An empty list gives ``X`` of shape ``[0, d]`` and ``y`` of shape ``[0]``.
        """
        parts = [self.client_arrays(c) for c in countries]
        if not parts:
            return (np.zeros((0, len(self.features)), dtype=np.float32), np.zeros(0, dtype=np.int64))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def class_counts(self) -> list[int]:
        """Number of rows per class, indexed by label."""
        counts = np.bincount(self.frame["label"].to_numpy(), minlength=len(self.classes))
        return [int(c) for c in counts]

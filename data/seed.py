"""The seed data set: the starting project's prepared emission categories.

File ``seed-emission-categories.csv`` (see the data README): 164 countries x 73
rows (years 1950..2022), the 21 features in :data:`SEED_FEATURES` and the
source's ``category`` (0..4) used as the label. The categories' definition is
not published; they are close to separable from the features.

:func:`load_seed` guarantees the file exists, has every required column, that
features are numeric without missing values, that ``year`` is a whole number and
that ``category`` is a whole number in 0..4 — otherwise it raises DataError.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from carbonfed.data.dataset import FederatedDataset
from carbonfed.data.errors import DataError
from carbonfed.data.locate import resolve_data_dir
from carbonfed.data.table import read_table

SEED_FILENAME = "seed-emission-categories.csv"
SEED_LABEL_SOURCE = "category"
SEED_FEATURES: tuple[str, ...] = (
    "cement_co2",
    "cement_co2_per_capita",
    "co2_including_luc_per_capita",
    "co2_including_luc_per_gdp",
    "co2_including_luc_per_unit_energy",
    "co2_per_capita",
    "co2_per_gdp",
    "co2_per_unit_energy",
    "coal_co2_per_capita",
    "consumption_co2_per_gdp",
    "energy_per_gdp",
    "flaring_co2",
    "ghg_excluding_lucf_per_capita",
    "land_use_change_co2_per_capita",
    "methane_per_capita",
    "nitrous_oxide_per_capita",
    "oil_co2_per_capita",
    "share_global_cumulative_flaring_co2",
    "share_global_cumulative_gas_co2",
    "share_global_flaring_co2",
    "co2_including_luc",
)
SEED_CLASSES: tuple[str, ...] = tuple(f"category {i}" for i in range(5))


def load_seed(data_dir: str | os.PathLike | None = None) -> FederatedDataset:
    """Load ``seed-emission-categories.csv`` from ``data_dir`` (see ``resolve_data_dir``).

    Raises:
        DataError: the file is missing or malformed (message names path/columns/values).
    """
    path = resolve_data_dir(data_dir) / SEED_FILENAME
    table = read_table(path, ("country",), ("year", *SEED_FEATURES, SEED_LABEL_SOURCE))
    raw = table.frame

    with_nan = [c for c in (*SEED_FEATURES, "year", SEED_LABEL_SOURCE) if raw[c].isna().any()]
    if with_nan:
        raise DataError(f"{path}: column(s) {with_nan} have empty cells; the seed set must be complete")
    if (raw["country"] == "").any():
        raise DataError(f"{path}: column 'country' has empty cells")
    _require_whole(raw["year"], "year", path)
    _require_whole(raw[SEED_LABEL_SOURCE], SEED_LABEL_SOURCE, path)
    category = raw[SEED_LABEL_SOURCE]
    out_of_range = sorted(set(category[(category < 0) | (category >= len(SEED_CLASSES))].tolist()))
    if out_of_range:
        raise DataError(
            f"{path}: column {SEED_LABEL_SOURCE!r} must be in 0..{len(SEED_CLASSES) - 1}, "
            f"found {out_of_range[:5]}"
        )

    frame = pd.DataFrame({"country": raw["country"], "year": raw["year"].astype(np.int64)})
    for col in SEED_FEATURES:
        frame[col] = raw[col]
    frame["label"] = category.astype(np.int64)
    frame = frame.sort_values(["country", "year"], kind="stable").reset_index(drop=True)
    return FederatedDataset(
        name="seed",
        features=SEED_FEATURES,
        classes=SEED_CLASSES,
        frame=frame,
        source={
            "path": str(path),
            "sha256": table.sha256,
            "rows_read": table.rows_read,
            "rows_used": len(frame),
            "url": None,
        },
    )


def _require_whole(values: pd.Series, name: str, path) -> None:
    fractional = values[values != np.round(values)]
    if len(fractional):
        raise DataError(
            f"{path}: column {name!r} must hold whole numbers, found e.g. {fractional.head(5).tolist()}"
        )

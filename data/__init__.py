"""Data for carbonfed: loaders for the federated data sets and the client split.

Public API:

* :func:`load_dataset` ("seed" or "owid") -> :class:`FederatedDataset`
* :func:`load_seed`, :func:`load_owid`, :func:`download_owid`
* :func:`split_countries` -> :class:`Partition`
* :func:`resolve_data_dir`, :func:`sha256_file`
* :class:`DataError` (any missing or malformed input), :class:`UnknownCountryError`
"""

from __future__ import annotations

import os

from carbonfed.data.dataset import FederatedDataset
from carbonfed.data.errors import DataError, UnknownCountryError
from carbonfed.data.locate import DATA_DIR_ENV, resolve_data_dir, sha256_file
from carbonfed.data.owid import (
    OWID_CLASSES,
    OWID_FEATURES,
    OWID_LABEL_SOURCE,
    OWID_THRESHOLDS,
    OWID_URL,
    download_owid,
    leaking_columns,
    load_owid,
)
from carbonfed.data.partition import Partition, split_countries
from carbonfed.data.seed import SEED_CLASSES, SEED_FEATURES, load_seed

DATASET_NAMES: tuple[str, ...] = ("seed", "owid")

__all__ = [
    "DATASET_NAMES", "DATA_DIR_ENV", "DataError", "FederatedDataset", "OWID_CLASSES",
    "OWID_FEATURES", "OWID_LABEL_SOURCE", "OWID_THRESHOLDS", "OWID_URL", "Partition",
    "SEED_CLASSES", "SEED_FEATURES", "UnknownCountryError", "download_owid", "leaking_columns",
    "load_dataset", "load_owid", "load_seed", "resolve_data_dir", "sha256_file",
    "split_countries",
]


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> FederatedDataset:
    """Load the data set called ``name`` ("seed" or "owid") from ``data_dir``.

    Raises:
        DataError: unknown name (the message lists the valid names) or a bad file.
    """
    if name == "seed":
        return load_seed(data_dir)
    if name == "owid":
        return load_owid(data_dir)
    raise DataError(f"unknown data set {name!r}; valid names are {list(DATASET_NAMES)}")

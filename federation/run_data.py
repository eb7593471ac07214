"""The data set a run names: a bundled one (``seed``, ``owid``) or a user's federated CSV (``csv``).

A CSV run's config carries the file, its party and label columns, and, once
:func:`with_data_schema` has read the file, the resolved feature list and class names: the
server reads no data, and learns the vector lengths from them (:func:`data_schema`).

Guarantees
----------
* :func:`with_data_schema` reads and checks the whole CSV
  (:func:`carbonfed.data.user_csv.load_csv`: one :class:`~carbonfed.data.DataError` with a
  one-line message per problem) and returns the config with the file's absolute path, its
  features and its classes; a bundled data set's config comes back unchanged. ``carbonfed run``
  calls it before it creates a folder or a key.
* :func:`load_run_data` loads the data set of a config; for a CSV it refuses a file whose
  features or classes are no longer those the run recorded (the file changed under the run).
* :func:`data_schema` is (number of features, number of classes) without reading any data.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from carbonfed.data import (OWID_CLASSES, OWID_FEATURES, SEED_CLASSES, SEED_FEATURES, DataError,
                            FederatedDataset, load_dataset)
from carbonfed.data.user_csv import load_csv
from carbonfed.federation.config import RunConfig

CSV = "csv"
# The public schema of each bundled data set: the server needs the vector lengths, never the data.
SCHEMAS = {"seed": (SEED_FEATURES, SEED_CLASSES), "owid": (OWID_FEATURES, OWID_CLASSES)}


def schema(dataset: str) -> tuple[int, int]:
    """(number of features, number of classes) of a bundled ``dataset``, without reading any data."""
    if dataset not in SCHEMAS:
        raise ValueError(f"unknown data set {dataset!r}; valid names are {sorted(SCHEMAS)}")
    features, classes = SCHEMAS[dataset]
    return len(features), len(classes)


def csv_features(cfg: RunConfig) -> list[str]:
    """The CSV feature columns the config names (empty: not resolved yet, every numeric column)."""
    return [f.strip() for f in cfg.features.split(",") if f.strip()]


def csv_classes(cfg: RunConfig) -> list[str]:
    """The class names the config recorded (empty: not resolved yet)."""
    return [str(c) for c in json.loads(cfg.classes)] if cfg.classes else []


def data_schema(cfg: RunConfig) -> tuple[int, int]:
    """(number of features, number of classes) of the run's data set, without reading any data."""
    if cfg.dataset != CSV:
        return schema(cfg.dataset)
    features, classes = csv_features(cfg), csv_classes(cfg)
    if not features or not classes:
        raise ValueError("a csv run's config needs its features and classes (run config 'features' and "
                         "'classes'): `carbonfed run --data FILE.csv` fills them in from the file")
    return len(features), len(classes)


def _read_csv(cfg: RunConfig, path: str | os.PathLike) -> FederatedDataset:
    return load_csv(path, cfg.client_col, cfg.label_col, csv_features(cfg) or None)


def with_data_schema(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its CSV read and checked: the absolute path, the features and the classes
    (module docstring); a bundled data set's ``cfg`` unchanged. Raises DataError."""
    if cfg.dataset != CSV:
        return cfg
    path = Path(cfg.data).expanduser().resolve()
    ds = _read_csv(cfg, path)
    commas = [f for f in ds.features if "," in f]
    if commas:
        raise DataError(f"{path}: feature column {commas[0]!r} has a comma in its name; rename it "
                        "(run config 'features' is a comma-separated list)")
    return replace(cfg, data=str(path), features=",".join(ds.features), classes=json.dumps(list(ds.classes)))


def load_run_data(cfg: RunConfig, data_dir: str | os.PathLike | None = None) -> FederatedDataset:
    """The run's data set; ``data_dir`` (a node's own folder) replaces the config's for a
    bundled data set. Raises DataError."""
    if cfg.dataset != CSV:
        return load_dataset(cfg.dataset, data_dir or cfg.data_dir or None)
    ds = _read_csv(cfg, cfg.data)
    recorded = (csv_features(cfg), csv_classes(cfg))
    if recorded[1] and (list(ds.features), list(ds.classes)) != recorded:
        raise DataError(f"{cfg.data} changed since the run started: it has features {list(ds.features)} and "
                        f"classes {list(ds.classes)}, the run recorded {recorded[0]} and {recorded[1]}")
    return ds

"""The OWID data set: Our World in Data CO2 table with a derived emission-category label.

Source: OWID "CO2 and Greenhouse Gas Emissions" (github.com/owid/co2-data), CC BY 4.0,
"Our World in Data, based on the Global Carbon Project". The loader reads the 2020
release shipped in the data directory (``owid-co2-data-2020.csv``) or any later
``owid-co2-data.csv`` (e.g. from :func:`download_owid`): columns are selected by
name and extra columns are ignored.

Clients
    Countries only. Rows whose ``iso_code`` is empty or starts with ``OWID_`` are
    aggregates ("World", continents, income groups, "International transport", ...)
    and are dropped (this also drops OWID_KOS, Kosovo, which OWID codes as OWID_).

Label (emission category)
    Band of ``co2_per_capita`` (tonnes of CO2 per person per year) with fixed
    thresholds :data:`OWID_THRESHOLDS` = (1, 3, 6, 12); a band includes its lower
    bound::

        0: < 1 t     1: 1 to < 3 t     2: 3 to < 6 t     3: 6 to < 12 t     4: >= 12 t

Features (no-leak rule)
    No feature is computed from CO2: no column whose name contains "co2", and no
    greenhouse-gas total ("ghg" in the name, e.g. total_ghg, ghg_per_capita), because
    those include CO2. :func:`leaking_columns` checks this rule, also on the source
    columns of derived features. :data:`OWID_FEATURES`, in model-input order:

    * ``energy_per_capita``        primary energy, kWh per person
    * ``energy_per_gdp``           primary energy, kWh per international-$
    * ``methane_per_capita``       methane, t CO2-equivalent per person
    * ``nitrous_oxide_per_capita`` nitrous oxide, t CO2-equivalent per person
    * ``gdp_per_capita``           derived: ``gdp / population`` (international-$ per person)
    * ``log10_population``         derived: ``log10(population)``

    Public range: every feature's magnitude stays below 10^6, so the log transform's range is
    :data:`OWID_LOG_BOUND` (ln 10^6 ≈ 14; the OWID presets use it).

    Rows are kept when the label and every feature are present and finite.

Measured on owid-co2-data-2020.csv (sha256 3cc34dc1c117...): 24,016 rows read,
19,089 country rows (221 countries); 3,455 rows used from 144 countries, years
1990..2016 (the methane / nitrous-oxide series start in 1990), 4 to 27 rows per
country (median 27). Class counts 0..4: 833, 687, 639, 911, 385.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from carbonfed.data.dataset import FederatedDataset
from carbonfed.data.errors import DataError
from carbonfed.data.locate import resolve_data_dir, sha256_file
from carbonfed.data.table import read_table

OWID_FILENAME = "owid-co2-data-2020.csv"
OWID_URL = "https://nyc3.digitaloceanspaces.com/owid-public/data/co2/owid-co2-data.csv"
OWID_LABEL_SOURCE = "co2_per_capita"
OWID_THRESHOLDS: tuple[float, ...] = (1.0, 3.0, 6.0, 12.0)
# The range of the signed-log transform for these variables (carbonfed.data.features.transform):
# ln(10^6) ≈ 14, a public bound of their units (no country's energy use, in kWh per person, or GDP,
# in international-$ per person, reaches 10^6; the 2020 table's largest are 3.2·10^5 and 1.4·10^5,
# e^12.7 and e^11.8). The default range e^10 ≈ 22,000 clips 43 % of the rows' energy per capita and
# 25 % of their GDP per capita to one value.
OWID_LOG_BOUND = 14.0
OWID_CLASSES: tuple[str, ...] = (
    "< 1 t CO2/person",
    "1-3 t CO2/person",
    "3-6 t CO2/person",
    "6-12 t CO2/person",
    ">= 12 t CO2/person",
)
OWID_FEATURES: tuple[str, ...] = (
    "energy_per_capita",
    "energy_per_gdp",
    "methane_per_capita",
    "nitrous_oxide_per_capita",
    "gdp_per_capita",
    "log10_population",
)
# derived feature -> the raw OWID columns it is computed from
OWID_DERIVED_FROM: dict[str, tuple[str, ...]] = {
    "gdp_per_capita": ("gdp", "population"),
    "log10_population": ("population",),
}
_RAW_FEATURE_COLUMNS = ("energy_per_capita", "energy_per_gdp", "methane_per_capita",
                        "nitrous_oxide_per_capita", "gdp", "population")
_LEAK_MARKERS = ("co2", "ghg")
AGGREGATE_ISO_PREFIX = "OWID_"


def leaking_columns(features: Iterable[str]) -> list[str]:
    """Features that break the no-leak rule, in the order given.

    A feature leaks if its name, or the name of a raw column it is derived from
    (see :data:`OWID_DERIVED_FROM`), contains "co2" or "ghg" (case-insensitive).
    """
    leaks = []
    for feature in features:
        names = (feature, *OWID_DERIVED_FROM.get(feature, ()))
        if any(marker in name.lower() for name in names for marker in _LEAK_MARKERS):
            leaks.append(feature)
    return leaks


def co2_band(co2_per_capita: np.ndarray | float) -> np.ndarray:
    """Label for ``co2_per_capita`` values: number of thresholds <= value (0..4)."""
    return np.searchsorted(np.asarray(OWID_THRESHOLDS), np.asarray(co2_per_capita, dtype=float),
                           side="right").astype(np.int64)


def load_owid(data_dir: str | os.PathLike | None = None,
              path: str | os.PathLike | None = None) -> FederatedDataset:
    """Load the OWID CO2 table as a country-level :class:`FederatedDataset`.

    ``path`` (a CSV in OWID's schema) wins; otherwise ``owid-co2-data-2020.csv`` in
    ``resolve_data_dir(data_dir)``, or, if that folder holds only OWID's current file
    (``owid-co2-data.csv``, as :func:`download_owid` names it), that one. If ``<path>.sha256`` exists (as written by
    :func:`download_owid`) the file must match it.

    Raises:
        DataError: missing file, missing columns, non-numeric values, checksum
            mismatch, or no usable rows.
    """
    if path is None:
        folder = resolve_data_dir(data_dir)
        current = folder / "owid-co2-data.csv"
        path = current if not (folder / OWID_FILENAME).exists() and current.exists() else folder / OWID_FILENAME
    csv_path = Path(path)
    table = read_table(csv_path, ("iso_code", "country"),
                       ("year", OWID_LABEL_SOURCE, *_RAW_FEATURE_COLUMNS))
    _check_sidecar(csv_path, table.sha256)
    raw = table.frame

    iso = raw["iso_code"]
    is_country = (iso != "") & (iso.str.lower() != "nan") & ~iso.str.startswith(AGGREGATE_ISO_PREFIX)
    raw = raw[is_country]

    population = raw["population"].where(raw["population"] > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        derived = {
            "gdp_per_capita": raw["gdp"] / population,
            "log10_population": np.log10(population),
        }
    frame = pd.DataFrame({"country": raw["country"], "year": raw["year"]})
    for feature in OWID_FEATURES:
        frame[feature] = derived[feature] if feature in derived else raw[feature]
    frame[OWID_LABEL_SOURCE] = raw[OWID_LABEL_SOURCE]

    numeric = frame[["year", *OWID_FEATURES, OWID_LABEL_SOURCE]].to_numpy(dtype=float)
    frame = frame[np.isfinite(numeric).all(axis=1)]
    if frame.empty:
        raise DataError(
            f"{csv_path}: no country row has {OWID_LABEL_SOURCE} and all of "
            f"{list(_RAW_FEATURE_COLUMNS)} present"
        )
    fractional = frame["year"][frame["year"] != np.round(frame["year"])]
    if len(fractional):
        raise DataError(f"{csv_path}: column 'year' must hold whole numbers, found {fractional.head(5).tolist()}")

    frame = frame.assign(
        year=frame["year"].astype(np.int64),
        label=co2_band(frame[OWID_LABEL_SOURCE].to_numpy()),
    ).drop(columns=[OWID_LABEL_SOURCE])
    frame = frame.sort_values(["country", "year"], kind="stable").reset_index(drop=True)
    return FederatedDataset(
        name="owid",
        features=OWID_FEATURES,
        classes=OWID_CLASSES,
        frame=frame,
        source={
            "path": str(csv_path),
            "sha256": table.sha256,
            "rows_read": table.rows_read,
            "rows_used": len(frame),
            "url": None,
        },
    )


def _check_sidecar(csv_path: Path, digest: str) -> None:
    sidecar = csv_path.with_name(csv_path.name + ".sha256")
    if not sidecar.is_file():
        return
    recorded = sidecar.read_text().split()
    if not recorded or recorded[0].lower() != digest:
        raise DataError(
            f"{csv_path} does not match its checksum file {sidecar}: "
            f"expected {recorded[0] if recorded else '(empty file)'}, file hashes to {digest}"
        )


def download_owid(cache_dir: str | os.PathLike, url: str = OWID_URL, timeout: float = 60.0) -> Path:
    """Download OWID's CSV from ``url`` into ``cache_dir``; return the file's path.

    The file is named after the URL's last path segment (``owid-co2-data.csv`` for
    :data:`OWID_URL`) and written atomically (temporary file, then rename). Next to
    it, ``<file>.sha256`` records the digest in ``sha256sum`` format. An existing
    file of the same name is replaced.

    Raises:
        DataError: the URL cannot be fetched or the cache directory cannot be written.
    """
    cache = Path(cache_dir)
    name = Path(urllib.parse.urlparse(url).path).name or "owid-co2-data.csv"
    target = cache / name
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create cache directory {cache}: {exc}") from exc

    tmp_name = None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, \
                tempfile.NamedTemporaryFile(dir=cache, prefix=f".{name}.", delete=False) as tmp:
            tmp_name = tmp.name
            shutil.copyfileobj(response, tmp)
        os.replace(tmp_name, target)
        tmp_name = None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DataError(
            f"could not download the OWID CSV from {url} into {cache}: {exc}. "
            f"Without network access, place the CSV in the data directory and use "
            f"load_owid(path=...) instead"
        ) from exc
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)

    digest = sha256_file(target)
    target.with_name(target.name + ".sha256").write_text(f"{digest}  {target.name}\n")
    return target

"""Tests for the ``data`` package, on the real files in the shared data directory."""

from __future__ import annotations

import csv
import hashlib
import math
import re

import numpy as np
import pytest

from carbonfed.data import (
    DATASET_NAMES,
    OWID_FEATURES,
    OWID_LABEL_SOURCE,
    SEED_FEATURES,
    DataError,
    FederatedDataset,
    download_owid,
    leaking_columns,
    load_dataset,
    load_owid,
    load_seed,
    resolve_data_dir,
    sha256_file,
    split_countries,
)

SEED_FILE = "seed-emission-categories.csv"
OWID_FILE = "owid-co2-data-2020.csv"


@pytest.fixture(scope="module")
def data_dir():
    return resolve_data_dir(None)


@pytest.fixture(scope="module")
def seed(data_dir) -> FederatedDataset:
    return load_seed(data_dir)


@pytest.fixture(scope="module")
def owid(data_dir) -> FederatedDataset:
    return load_owid(data_dir)


def _read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _write_rows(path, rows, columns):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _head_without(src, dst, drop, n=30):
    """Copy the first ``n`` data rows of ``src`` to ``dst`` without column ``drop``."""
    with open(src, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c for c in reader.fieldnames if c != drop]
        rows = [row for _, row in zip(range(n), reader)]
    _write_rows(dst, rows, columns)


# --- seed ---------------------------------------------------------------------------------

def test_seed_shape_and_classes(seed, data_dir):
    assert seed.name == "seed"
    assert len(seed.frame) == 11972
    assert len(seed.countries()) == 164
    assert seed.features == SEED_FEATURES and len(SEED_FEATURES) == 21
    assert list(seed.frame.columns) == ["country", "year", *SEED_FEATURES, "label"]
    assert seed.classes == tuple(f"category {i}" for i in range(5))
    assert np.bincount(seed.frame["label"].to_numpy()).tolist() == [8367, 172, 507, 2765, 161]
    assert seed.frame["label"].dtype == np.int64
    assert not seed.frame[list(SEED_FEATURES)].isna().any().any()
    src = seed.source
    assert src["sha256"] == sha256_file(data_dir / SEED_FILE)
    assert src["rows_read"] == src["rows_used"] == 11972 and src["url"] is None
    assert seed.countries() == sorted(seed.countries())


def test_seed_client_arrays(seed):
    x, y = seed.client_arrays("Germany")
    assert x.shape == (73, 21) and x.dtype == np.float32 and y.dtype == np.int64
    rows = seed.frame[seed.frame["country"] == "Germany"].sort_values("year")
    assert np.allclose(x, rows[list(SEED_FEATURES)].to_numpy(np.float32))
    assert (y == rows["label"].to_numpy()).all()
    xa, ya = seed.all_arrays(seed.countries())
    assert xa.shape == (11972, 21) and ya.shape == (11972,)
    x0, y0 = seed.all_arrays([])
    assert x0.shape == (0, 21) and y0.shape == (0,)


def test_unknown_country_is_data_error(seed):
    with pytest.raises(DataError, match="Atlantis"):
        seed.client_arrays("Atlantis")
    with pytest.raises(KeyError):
        seed.client_arrays("Atlantis")


# --- partition ----------------------------------------------------------------------------

def test_split_seed_offset0(seed):
    countries = seed.countries()
    part = split_countries(countries, holdout_offset=0)
    assert len(part.test) == 33 and len(part.train) == 131
    assert set(part.test).isdisjoint(part.train)
    assert set(part.test) | set(part.train) == set(countries)
    assert list(part.test) == sorted(countries)[0::5]
    assert part.role(countries[0]) == "test" and part.role(countries[1]) == "train"
    assert [part.country_of(i) for i in range(len(countries))] == sorted(countries)
    with pytest.raises(IndexError):
        part.country_of(len(countries))


def test_split_offsets_partition_all_countries(seed):
    countries = seed.countries()
    tests = [set(split_countries(countries, k).test) for k in range(5)]
    for i in range(5):
        for j in range(i + 1, 5):
            assert tests[i].isdisjoint(tests[j])
    assert set().union(*tests) == set(countries)


@pytest.mark.parametrize("offset", [-1, 5, 1.0, True])
def test_split_bad_offset(offset):
    with pytest.raises(ValueError, match="holdout_offset"):
        split_countries(["A", "B"], holdout_offset=offset)


# --- owid ---------------------------------------------------------------------------------

def test_owid_countries_only(owid, data_dir):
    iso_of = {row["country"]: row["iso_code"] for row in _read_rows(data_dir / OWID_FILE)}
    countries = owid.countries()
    assert "World" not in countries and "Africa" not in countries
    assert all(iso_of[c] and not iso_of[c].startswith("OWID_") for c in countries)
    assert len(countries) > 100
    assert owid.source["rows_read"] == 24016
    assert owid.source["rows_used"] == len(owid.frame)
    assert not owid.frame[list(OWID_FEATURES)].isna().any().any()


def test_owid_all_classes_present(owid):
    counts = np.bincount(owid.frame["label"].to_numpy(), minlength=5)
    assert len(owid.classes) == 5 and (counts > 0).all()
    assert counts.min() >= 0.05 * counts.sum()  # no class is marginal


def test_owid_no_leak():
    assert leaking_columns(OWID_FEATURES) == []
    assert leaking_columns(["co2", "total_ghg", "energy_per_capita"]) == ["co2", "total_ghg"]
    assert leaking_columns(["ghg_per_capita", "cement_co2_per_capita"]) == [
        "ghg_per_capita", "cement_co2_per_capita"]
    assert OWID_LABEL_SOURCE == "co2_per_capita"


def test_owid_label_matches_raw_co2_per_capita(owid, data_dir):
    def band(v):  # the documented thresholds, written out independently of the loader
        return 0 if v < 1 else 1 if v < 3 else 2 if v < 6 else 3 if v < 12 else 4

    raw = {(r["country"], int(r["year"])): r for r in _read_rows(data_dir / OWID_FILE)}
    picks = [("Germany", 2000), ("India", 2010), ("United States", 2015),
             ("Brazil", 1995), ("Qatar", 2012), ("Ethiopia", 2005)]
    frame = owid.frame.set_index(["country", "year"])
    seen = set()
    for key in picks:
        expected = band(float(raw[key]["co2_per_capita"]))
        assert frame.loc[key, "label"] == expected, key
        seen.add(expected)
        population = float(raw[key]["population"])
        assert math.isclose(frame.loc[key, "log10_population"], math.log10(population))
    assert len(seen) >= 4


# --- errors -------------------------------------------------------------------------------

def test_missing_file_names_path(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / SEED_FILE))):
        load_seed(tmp_path)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / OWID_FILE))):
        load_owid(tmp_path)


def test_missing_column_named(tmp_path, data_dir):
    _head_without(data_dir / SEED_FILE, tmp_path / SEED_FILE, drop="methane_per_capita")
    with pytest.raises(DataError, match="methane_per_capita"):
        load_seed(tmp_path)
    _head_without(data_dir / OWID_FILE, tmp_path / OWID_FILE, drop="energy_per_gdp")
    with pytest.raises(DataError, match="energy_per_gdp"):
        load_owid(tmp_path)


def test_bad_values_named(tmp_path, data_dir):
    rows = _read_rows(data_dir / SEED_FILE)[:10]
    columns = list(rows[0])
    rows[3]["category"] = "7"
    _write_rows(tmp_path / SEED_FILE, rows, columns)
    with pytest.raises(DataError, match="category"):
        load_seed(tmp_path)
    rows[3]["category"] = "0"
    rows[4]["flaring_co2"] = "lots"
    _write_rows(tmp_path / SEED_FILE, rows, columns)
    with pytest.raises(DataError, match="flaring_co2.*lots"):
        load_seed(tmp_path)


def test_unknown_dataset_name_lists_valid():
    with pytest.raises(DataError, match="seed.*owid"):
        load_dataset("nope")
    assert DATASET_NAMES == ("seed", "owid")


# --- locating data ------------------------------------------------------------------------

def test_env_var_honoured(tmp_path, monkeypatch, data_dir):
    rows = _read_rows(data_dir / SEED_FILE)[:146]  # two countries
    _write_rows(tmp_path / SEED_FILE, rows, list(rows[0]))
    monkeypatch.setenv("CARBONFED_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path.resolve()
    small = load_dataset("seed")
    assert len(small.frame) == 146 and len(small.countries()) == 2
    assert resolve_data_dir(data_dir) == data_dir.resolve()  # explicit argument wins over the env var
    monkeypatch.setenv("CARBONFED_DATA_DIR", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="CARBONFED_DATA_DIR"):
        resolve_data_dir(None)


# --- download -----------------------------------------------------------------------------

def test_download_owid_from_file_url(tmp_path, data_dir):
    rows = [r for r in _read_rows(data_dir / OWID_FILE)
            if r["country"] in ("France", "World") and r["year"] in ("2000", "2001")]
    columns = list(rows[0]) + ["co2_including_luc"]  # extra column, as in newer releases
    src = tmp_path / "src" / "owid-co2-data.csv"
    src.parent.mkdir()
    _write_rows(src, rows, columns)

    path = download_owid(tmp_path / "cache", url=src.as_uri())
    assert path == tmp_path / "cache" / "owid-co2-data.csv"
    assert path.read_bytes() == src.read_bytes()
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert (tmp_path / "cache" / "owid-co2-data.csv.sha256").read_text().split()[0] == digest

    ds = load_owid(path=path)
    assert ds.countries() == ["France"] and len(ds.frame) == 2
    assert ds.source["sha256"] == digest
    # a data folder holding only the downloaded current release is read as the OWID data set
    assert load_dataset("owid", tmp_path / "cache").source["sha256"] == digest

    path.write_bytes(path.read_bytes() + b"\n")  # tampered: no longer matches the sidecar
    with pytest.raises(DataError, match="checksum"):
        load_owid(path=path)


def test_download_owid_error_is_data_error(tmp_path):
    missing = (tmp_path / "nothing.csv").as_uri()
    with pytest.raises(DataError, match="nothing.csv"):
        download_owid(tmp_path / "cache", url=missing)
    assert not any((tmp_path / "cache").iterdir())  # no partial file left behind

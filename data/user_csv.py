"""Any federated CSV: one row per record, a column naming the party, a label column.

:func:`load_csv` turns a user's table into a :class:`FederatedDataset` (parties play the role of
countries) and checks it completely before any training starts.

Guarantees
----------
* Every problem is one :class:`DataError` whose message names the file and the column, party or
  line at fault (line numbers count the header as line 1): a missing file, no data rows, a
  missing column, a requested feature that is not numeric, an empty, NaN or infinite feature
  value, an empty label, a party with fewer than ``min_rows`` rows, a label with fewer than two
  classes, or fewer than ``min_parties`` parties.
* Features default to every numeric column except the party and label columns, in file order;
  a column counts as numeric when every non-empty cell parses as a number. A column that is
  numeric but for a few cells is reported, not silently dropped.
* The label may be text or integer; the classes are the distinct labels, integers in numeric
  order and text in sorted order, and ``label`` indexes them.
* Rows keep their file order within each party (their position is the ``year`` column, which a
  user table does not need); the SHA-256 of the parsed bytes is recorded as provenance.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd

from carbonfed.data.dataset import FederatedDataset
from carbonfed.data.errors import DataError

MIN_ROWS = 2        # a party needs at least this many rows
MIN_PARTIES = 3     # with the every-5th hold-out, three parties leave two for training


def _read(path: Path) -> tuple[pd.DataFrame, str]:
    if not path.is_file():
        raise DataError(f"expected a CSV file at {path}, but it does not exist")
    raw = path.read_bytes()
    try:
        frame = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable CSV file: {exc}") from exc
    if frame.empty:
        raise DataError(f"{path} has a header but no data rows")
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame, hashlib.sha256(raw).hexdigest()


def _numeric(column: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(float values with NaN for empty cells, mask of non-empty cells that are not numbers)."""
    text = column.astype(str).str.strip()
    empty = text.isin(("", "NA", "NaN", "nan", "N/A", "null"))
    values = pd.to_numeric(text.where(~empty, None), errors="coerce").astype("float64")
    # pandas reads "inf" as a number: keep it, it is reported as infinite below
    return values, ~empty & values.isna()


def _first_line(mask: pd.Series) -> int:
    return int(np.flatnonzero(mask.to_numpy())[0]) + 2   # + header, 1-based


def _features(frame: pd.DataFrame, path: Path, client_col: str, label_col: str,
              requested: list[str] | None) -> list[str]:
    others = [c for c in frame.columns if c not in (client_col, label_col)]
    if requested:
        missing = [c for c in requested if c not in frame.columns]
        if missing:
            raise DataError(f"{path}: feature column(s) {missing} not found; columns are {list(frame.columns)}")
        for c in requested:
            _, bad = _numeric(frame[c])
            if bad.any():
                raise DataError(f"{path}: feature column {c!r} is not numeric "
                                f"(line {_first_line(bad)}: {frame[c][bad].iloc[0]!r})")
        return list(requested)
    chosen = []
    for c in others:
        _, bad = _numeric(frame[c])
        if not bad.any():
            chosen.append(c)
        elif bad.mean() < 0.5:
            raise DataError(f"{path}: column {c!r} is numeric but for {int(bad.sum())} cell(s) "
                            f"(line {_first_line(bad)}: {frame[c][bad].iloc[0]!r}); fix them or leave the "
                            "column out with --features")
    if not chosen:
        raise DataError(f"{path}: no numeric feature column besides {client_col!r} and {label_col!r}")
    return chosen


def _labels(column: pd.Series, path: Path, label_col: str) -> tuple[np.ndarray, tuple[str, ...]]:
    text = column.astype(str).str.strip()
    if (text == "").any():
        raise DataError(f"{path}: label column {label_col!r} is empty at line {_first_line(text == '')}")
    values, bad = _numeric(text)
    if not bad.any() and (values == np.round(values)).all():
        ints = values.astype(np.int64)
        classes = sorted(set(ints.tolist()))
        index = {c: i for i, c in enumerate(classes)}
        return ints.map(index).to_numpy(np.int64), tuple(str(c) for c in classes)
    classes = sorted(set(text.tolist()))
    index = {c: i for i, c in enumerate(classes)}
    return text.map(index).to_numpy(np.int64), tuple(classes)


def _check_values(frame: pd.DataFrame, path: Path, features: list[str]) -> pd.DataFrame:
    out = pd.DataFrame(index=frame.index)
    for c in features:
        values, _ = _numeric(frame[c])
        bad = ~np.isfinite(values)
        if bad.any():
            raise DataError(f"{path}: feature column {c!r} has an empty, NaN or infinite value at line "
                            f"{_first_line(bad)}")
        out[c] = values
    return out


def load_csv(path: str | Path, client_col: str, label_col: str, features: list[str] | None = None,
             min_rows: int = MIN_ROWS, min_parties: int = MIN_PARTIES) -> FederatedDataset:
    """Read and check a user's federated table (module docstring); raises :class:`DataError`."""
    path = Path(path)
    frame, digest = _read(path)
    for role, col in (("client", client_col), ("label", label_col)):
        if col not in frame.columns:
            raise DataError(f"{path}: {role} column {col!r} not found; columns are {list(frame.columns)}")
    feats = _features(frame, path, client_col, label_col, features)
    parties = frame[client_col].astype(str).str.strip()
    if (parties == "").any():
        raise DataError(f"{path}: client column {client_col!r} is empty at line {_first_line(parties == '')}")
    x = _check_values(frame, path, feats)
    y, classes = _labels(frame[label_col], path, label_col)
    if len(classes) < 2:
        raise DataError(f"{path}: label column {label_col!r} has one class only ({classes[0]!r}); "
                        "a classifier needs at least two")
    sizes = parties.value_counts()
    small = sizes[sizes < min_rows]
    if len(small):
        raise DataError(f"{path}: client {small.index[0]!r} has {int(small.iloc[0])} row(s); "
                        f"every client needs at least {min_rows}")
    if len(sizes) < min_parties:
        raise DataError(f"{path}: {len(sizes)} client(s) in column {client_col!r}; at least {min_parties} are "
                        "needed (every 5th is held out for testing, and training needs two)")
    out = pd.DataFrame({"country": parties, "year": parties.groupby(parties).cumcount().astype(np.int64)})
    for c in feats:
        out[c] = x[c]
    out["label"] = y
    out = out.sort_values(["country", "year"], kind="stable").reset_index(drop=True)
    return FederatedDataset(name="csv", features=tuple(feats), classes=classes, frame=out,
                            source={"path": str(path), "sha256": digest, "rows_read": len(frame),
                                    "rows_used": len(out), "url": None})

"""The example federated CSV: the seed data under another schema, made on the user's machine.

``python -m carbonfed.data.example --out example.csv`` (or :func:`write_example_csv`) writes a
small table that exercises every path of :func:`carbonfed.data.user_csv.load_csv`: parties named
in a ``site`` column, text labels in ``level``, renamed numeric features in another order, a
text column that is not a feature (``note``), and rows in shuffled order. It is derived from
the seed data set at run time, so no data is stored in the repository.

Guarantees: the same seed data and arguments give the same file, byte for byte; each party has
``rows`` rows (its last ``rows`` years) and the labels keep the seed categories' meaning.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from carbonfed.data import load_dataset

LEVELS = ("very low", "low", "medium", "high", "very high")   # seed categories 0..4
FEATURES = {   # seed feature -> example column name
    "co2_per_capita": "co2_pc", "co2_per_gdp": "co2_gdp", "co2_per_unit_energy": "co2_energy",
    "coal_co2_per_capita": "coal_pc", "oil_co2_per_capita": "oil_pc", "methane_per_capita": "ch4_pc",
    "nitrous_oxide_per_capita": "n2o_pc", "energy_per_gdp": "energy_gdp", "cement_co2_per_capita": "cement_pc",
    "flaring_co2": "flaring",
}


def example_frame(data_dir: str | None = None, parties: int = 60, rows: int = 24, seed: int = 0) -> pd.DataFrame:
    """The example table (module docstring) from the seed data in ``data_dir``."""
    ds = load_dataset("seed", data_dir)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(ds.countries(), size=min(parties, len(ds.countries())), replace=False))
    parts = []
    for country in chosen:
        x, y = ds.client_arrays(country)
        x, y = x[-rows:], y[-rows:]
        part = pd.DataFrame({"site": country, "note": [f"row {i}" for i in range(len(y))]})
        for name, col in FEATURES.items():
            part[col] = x[:, ds.features.index(name)].astype(np.float64)
        part["level"] = [LEVELS[int(v)] for v in y]
        parts.append(part)
    frame = pd.concat(parts, ignore_index=True)
    order = ["level", *reversed(list(FEATURES.values())), "note", "site"]
    return frame.iloc[rng.permutation(len(frame))][order].reset_index(drop=True)


def write_example_csv(out: str | Path, data_dir: str | None = None, **kwargs) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example_frame(data_dir, **kwargs).to_csv(out, index=False, float_format="%.9g")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m carbonfed.data.example", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="where to write the CSV")
    ap.add_argument("--data-dir", default=None, help="folder with the seed CSV (default ../shared/data)")
    args = ap.parse_args(argv)
    path = write_example_csv(args.out, args.data_dir)
    print(f"wrote {path}: run it with  carbonfed run --data {path} --client-col site --label-col level")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

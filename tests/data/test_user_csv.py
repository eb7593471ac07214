"""Any federated CSV (data/user_csv.py): the example table loads with the schema it was written
with, and every bad input is one DataError that names the column, client or line."""

import numpy as np
import pandas as pd
import pytest

from carbonfed.data import DataError, load_dataset
from carbonfed.data.example import FEATURES, LEVELS, write_example_csv
from carbonfed.data.user_csv import load_csv


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return write_example_csv(tmp_path_factory.mktemp("ex") / "example.csv")


def test_example_loads_with_its_own_schema(example, seed_data):
    ds = load_csv(example, "site", "level")
    # default features: every numeric column but the two named ones, in file order (not 'note')
    assert set(ds.features) == set(FEATURES.values()) and "note" not in ds.features
    assert ds.classes == tuple(sorted(set(ds.classes))) and set(ds.classes) <= set(LEVELS)
    # the values are the seed data's: one party's rows, by position, against the seed loader
    country = ds.countries()[0]
    x, y = ds.client_arrays(country)
    sx, sy = seed_data.client_arrays(country)
    frame = pd.read_csv(example)
    rows = frame[frame.site == country]
    assert len(x) == len(rows) == 24
    col = ds.features.index("co2_pc")
    assert sorted(x[:, col].tolist()) == pytest.approx(sorted(sx[-24:, seed_data.features.index("co2_per_capita")].tolist()), rel=1e-6)
    assert sorted(ds.classes[i] for i in y) == sorted(LEVELS[i] for i in sy[-24:])


def test_integer_labels_and_explicit_features(tmp_path):
    p = tmp_path / "t.csv"
    pd.DataFrame({"who": list("aabbccdd"), "y": [3, 10, 3, 10, 3, 10, 3, 3], "f1": np.arange(8.0),
                  "f2": np.ones(8)}).to_csv(p, index=False)
    ds = load_csv(p, "who", "y", features=["f2"])
    assert ds.classes == ("3", "10") and ds.features == ("f2",)
    assert ds.class_counts() == [5, 3]


def _write(tmp_path, text):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    return p


GOOD = "site,level,a,b\n" + "".join(f"{s},{'hi' if i % 2 else 'lo'},{i},{i * 2}\n" for s in "pqrs" for i in range(3))


@pytest.mark.parametrize("text, args, message", [
    ("site,level,a\n", {}, "header but no data rows"),
    (GOOD, {"client_col": "party"}, "client column 'party' not found"),
    (GOOD, {"label_col": "cls"}, "label column 'cls' not found"),
    (GOOD, {"features": ["a", "zz"]}, "feature column(s) ['zz'] not found"),
    (GOOD.replace("p,hi,1,2", "p,hi,x1,2"), {"features": ["a"]}, "feature column 'a' is not numeric (line 3"),
    (GOOD.replace("p,hi,1,2", "p,hi,,2"), {}, "'a' has an empty, NaN or infinite value at line 3"),
    (GOOD.replace("p,hi,1,2", "p,hi,inf,2"), {}, "'a' has an empty, NaN or infinite value at line 3"),
    (GOOD.replace("p,hi,1,2", "p,hi,nan,2"), {}, "'a' has an empty, NaN or infinite value at line 3"),
    (GOOD.replace(",hi,", ",lo,"), {}, "has one class only ('lo')"),
    (GOOD + "t,lo,1,1\n", {}, "client 't' has 1 row(s)"),
    ("site,level,a\n" + "p,lo,1\np,hi,2\nq,lo,1\nq,hi,2\n", {}, "2 client(s) in column 'site'"),
    (GOOD.replace("p,hi,1,2", "p,,1,2"), {}, "label column 'level' is empty at line 3"),
])
def test_bad_inputs_name_what_is_wrong(tmp_path, text, args, message):
    kwargs = {"client_col": "site", "label_col": "level", **args}
    with pytest.raises(DataError) as exc:
        load_csv(_write(tmp_path, text), **kwargs)
    assert message in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_csv(tmp_path / "nope.csv", "site", "level")


def test_seed_loader_untouched():
    assert load_dataset("seed").name == "seed"

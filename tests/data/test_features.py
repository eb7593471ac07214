"""The log transform's range (data/features.py): a per-data-set public bound that no real value of
the bundled data sets reaches, carried by the scaler the statistics releases produce."""

from __future__ import annotations

import numpy as np
import pytest

from carbonfed.data import load_owid, load_seed, resolve_data_dir
from carbonfed.data.features import LOG_BOUND, Standardizer, transform
from carbonfed.data.owid import OWID_LOG_BOUND


@pytest.fixture(scope="module")
def arrays():
    out = {}
    for name, load in (("seed", load_seed), ("owid", load_owid)):
        ds = load(resolve_data_dir(None))
        out[name] = ds.all_arrays(ds.countries())
    return out


def test_no_value_of_a_bundled_data_set_saturates_its_range(arrays):
    """Every seed value stays inside the default range e^10, every OWID value inside e^14; at the
    default range 43 % of OWID's energy per capita would be clipped to one value."""
    seed_x, _ = arrays["seed"]
    owid_x, _ = arrays["owid"]
    assert np.abs(transform(seed_x)).max() < 1.0
    assert np.abs(transform(owid_x, OWID_LOG_BOUND)).max() < 1.0
    saturated = (np.abs(transform(owid_x)) == 1.0).mean(axis=0)
    assert saturated[0] > 0.4 and saturated[4] > 0.2       # energy and GDP per capita


def test_the_default_range_is_the_transform_every_run_had(arrays):
    x = arrays["seed"][0].astype(np.float64)
    expected = np.clip(np.sign(x) * np.log1p(np.abs(x)), -10, 10) / 10
    assert LOG_BOUND == 10.0
    np.testing.assert_array_equal(transform(x), expected)
    np.testing.assert_array_equal(transform(x, 10.0), expected)
    np.testing.assert_allclose(transform(x, 20.0) * 2, expected)      # no seed value is clipped at either range


def test_the_scaler_carries_its_range_through_every_stage_and_a_round_trip(arrays):
    """A scaler made at range 14 applies the transform at 14 (stage 1, its refinement, the asinh
    scale and its dict), and an older dict without the key is read at the default range."""
    x, y = arrays["owid"]
    for bound in (LOG_BOUND, OWID_LOG_BOUND):
        s = Standardizer.exact(x, y, 5, log_bound=bound)
        assert s.log_bound == bound
        np.testing.assert_allclose(s.features(x), transform(x, bound))
        np.testing.assert_allclose(s.apply(x).mean(axis=0), 0, atol=1e-5)
        assert s.refined(np.zeros(2 * x.shape[1])).log_bound == bound
        np.testing.assert_allclose(s.asinh_scale, np.expm1(bound * (np.abs(s.mean) + 3.5 * s.std)))
        again = Standardizer.from_dict(s.to_dict())
        assert again.log_bound == bound
        np.testing.assert_array_equal(again.apply(x), s.apply(x))
    d = Standardizer.exact(x, y, 5).to_dict()
    d.pop("log_bound")
    assert Standardizer.from_dict(d).log_bound == LOG_BOUND
    sums = np.concatenate([np.bincount(y, minlength=5), transform(x, 14).sum(0), 3 * (transform(x, 14) ** 2).sum(0)])
    assert Standardizer.from_sums(sums, x.shape[1], 5, 14.0).log_bound == 14.0
    assert Standardizer.from_sums(sums, x.shape[1], 5).log_bound == LOG_BOUND

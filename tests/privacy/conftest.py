"""Key fixtures of the HE tests: one keygen per test module (key generation is the slow part)."""

from __future__ import annotations

import pytest

from carbonfed.privacy.he import keygen, load_public_context, load_secret_context


def _keys(d):
    secret_path, public_path = keygen(d)
    return {"dir": d, "secret_path": secret_path, "public_path": public_path,
            "secret": load_secret_context(secret_path), "public": load_public_context(public_path)}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """The default keys (degree 4096, TenSEAL's data and special prime)."""
    return _keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory):
    """Another key of the same parameters."""
    return _keys(tmp_path_factory.mktemp("other-keys"))

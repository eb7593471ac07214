import os

import pytest

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(scope="session")
def seed_data():
    from carbonfed.data import load_dataset

    return load_dataset("seed")


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory):
    from carbonfed.privacy.he import keygen

    d = tmp_path_factory.mktemp("keys") / "k"
    keygen(d)
    return d

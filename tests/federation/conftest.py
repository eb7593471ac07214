"""Federations that several test modules read: each is built once per session (a real run costs a
minute or more). Tests that change a run folder copy it first."""

import pytest

from carbonfed.federation.config import RunConfig
from carbonfed.federation.report_command import main as report_main
from carbonfed.federation.simulation import run_simulation

# four faulty clients: a corrupt ciphertext, a wrong-length vector, NaN, another key's ciphertext
FAULTS = "Albania:corrupt,Algeria:wrong-length,Angola:nan,Argentina:foreign-key"


@pytest.fixture(scope="session")
def dphe_run(tmp_path_factory, keys_dir):
    """A real 2-round ``dp+he`` run on the seed data with the four :data:`FAULTS`, then
    ``carbonfed report DIR --keys KEYS``: ``(cfg, run folder, report's exit code)``. Read-only."""
    out = tmp_path_factory.mktemp("dphe") / "dphe"
    # average_last=2: the held-out clients evaluate, and model.pt is, the mean of rounds 1 and 2
    cfg = RunConfig(privacy="dp+he", rounds=2, keys_dir=str(keys_dir), out_dir=str(out), fault_drill=FAULTS,
                    stats_stages=3, average_last=2)
    run_simulation(cfg)
    return cfg, out, report_main([str(out), "--keys", str(keys_dir)])

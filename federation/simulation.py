"""Run a carbonfed federation in Flower's simulation engine (Ray), from Python.

This is what ``flwr run .`` does with the app declared in ``pyproject.toml``; ``carbonfed run``
calls it directly so that it can pass the run config, one SuperNode per country, and a
progress callback, and so that the key holder (this process, which made the keys) can decrypt
the result afterwards. The ServerApp still only receives the public context's path.

Guarantees: the ClientApps and the ServerApp receive ``cfg`` as their run config (through the
Flower internals wrapped in :mod:`carbonfed.federation.flower_compat`); the server waits for one
simulated SuperNode per country of the data set unless ``cfg.min_nodes`` says otherwise; the
temporary app folder lives in the run's own folder (``out-dir``), so a killed run leaves
nothing elsewhere, and it is removed when the run ends, fails or is interrupted (a signal that
:func:`carbonfed.federation.run_guard.stop_on_signals` turns into an exception); Ray is shut
down then too (:func:`carbonfed.federation.flower_compat.simulate`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import tomli_w

from carbonfed.federation.client.app import app as client_app
from carbonfed.federation.config import RunConfig, flower_app_toml
from carbonfed.federation.enrolment import sealed_simulation
from carbonfed.federation.flower_compat import simulate
from carbonfed.federation.run_data import load_run_data
from carbonfed.federation.server.app import make_server_app


def run_simulation(cfg: RunConfig, on_round=None, verbose: bool = False) -> Path:
    """Run the federation to completion; returns the output folder."""
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    num_nodes = len(load_run_data(cfg).countries())
    if not cfg.min_nodes:   # the server waits for every simulated SuperNode before its setup round
        cfg = replace(cfg, min_nodes=num_nodes)
    # The app folder (config only) lives in the run's own folder: a killed run leaves nothing elsewhere.
    parent = Path(cfg.out_dir) if cfg.out_dir else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    # its clients sign under a charter sealed before round 1 (carbonfed.federation.enrolment)
    with sealed_simulation(cfg) as cfg, tempfile.TemporaryDirectory(prefix=".carbonfed-app-", dir=parent) as app_dir:
        (Path(app_dir) / "pyproject.toml").write_text(tomli_w.dumps(
            {"project": {"name": "carbonfed-run", "version": "0.1.0"}, **flower_app_toml(cfg)}))
        simulate(make_server_app(on_round), client_app, num_nodes, cfg.to_flower(), app_dir,
                 backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                 "init_args": {"num_cpus": os.cpu_count() or 1, "logging_level": logging.ERROR,
                                               "log_to_driver": verbose}},
                 verbose=verbose)
    return Path(cfg.out_dir)

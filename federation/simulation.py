"""Run a carbonfed federation in Flower's simulation engine (Ray), from Python.

This is what ``flwr run .`` does with the app declared in ``pyproject.toml``; ``carbonfed run``
calls it directly so that it can pass the run config, one SuperNode per country, and a
progress callback, and so that the key holder (this process, which made the keys) can decrypt
the result afterwards. The ServerApp still only receives the public context's path.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import tomli_w
from flwr.app import Context, RecordDict
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.telemetry import EventType

from carbonfed.data import load_dataset
from carbonfed.federation.client.app import app as client_app
from carbonfed.federation.config import RunConfig
from carbonfed.federation.server.app import make_server_app


def app_config_toml(cfg: RunConfig) -> dict:
    """The ``[tool.flwr.app]`` table of a Flower app whose defaults are ``cfg``."""
    return {"tool": {"flwr": {"app": {
        "publisher": "carbonfed",
        "components": {"serverapp": "carbonfed.federation.server.app:app", "clientapp": "carbonfed.federation.client.app:app"},
        "config": cfg.to_flower()}}}}


def run_simulation(cfg: RunConfig, on_round=None, verbose: bool = False) -> Path:
    """Run the federation to completion; returns the output folder."""
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    num_nodes = len(load_dataset(cfg.dataset, cfg.data_dir or None).countries())
    if not cfg.min_nodes:   # the server waits for every simulated SuperNode before its setup round
        cfg = replace(cfg, min_nodes=num_nodes)
    # The app folder (config only) lives in the run's own folder: a killed run leaves nothing elsewhere.
    parent = Path(cfg.out_dir) if cfg.out_dir else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".carbonfed-app-", dir=parent) as app_dir:
        (Path(app_dir) / "pyproject.toml").write_text(tomli_w.dumps(
            {"project": {"name": "carbonfed-run", "version": "0.1.0"}, **app_config_toml(cfg)}))
        # As flwr.simulation.run_simulation does, plus our run config in the Run and contexts.
        run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
        run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
        run.federation_id = NOOP_FEDERATION_ID
        run.override_config = cfg.to_flower()
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
        ctx = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=cfg.to_flower())
        _run_simulation(
            num_supernodes=num_nodes, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE, client_app=client_app,
            server_app=make_server_app(on_round), backend_name="ray",
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"num_cpus": os.cpu_count() or 1, "logging_level": logging.ERROR,
                                          "log_to_driver": verbose}},
            app_dir=app_dir, run=run, server_app_context=ctx, verbose_logging=verbose, is_app=True)
    return Path(cfg.out_dir)

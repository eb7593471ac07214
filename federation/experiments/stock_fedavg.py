"""Stock Flower FedAvg on the seed data: the reference line of ``bench/round_time.py``.

Plain ``flwr.serverapp.strategy.FedAvg`` and a plain torch ClientApp, through Flower's public
API only (``flwr.app``, ``flwr.clientapp``, ``flwr.serverapp``, ``flwr.simulation.run_simulation``):
no encryption, no DP, no ledger, no checkpoint, no per-round state on disk. The model is the
main job's (linear 21→5); each of the data set's countries is one simulated SuperNode (node
``partition-id`` = index in the sorted country list, as in ``carbonfed run``); each round the
strategy samples as many nodes to train as the partition has training countries (131 of 164 on
the seed data) and as many to evaluate as it holds out (33). A training node runs the main job's
local schedule (``local-epochs`` epochs of ``batches-per-epoch`` batches, SGD with the run's
learning rate and momentum) on its rows' log features, standardised with the pooled training
rows' mean and std (the exact statistics a ``none`` run releases, without the asinh stage).

Guarantee: :func:`run_stock` returns ``mark()`` (default: the monotonic time) taken at the end of
each round (index 0: the start, before round 1), in the ServerApp by FedAvg's ``evaluate_fn``
hook, which Flower calls before the first round and after each round's training and evaluation.

This module lives in the package (not in ``bench/``) so that the simulation's Ray workers import
it by name, as they import carbonfed's own ClientApp: its data is then loaded once per worker.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from carbonfed.data import load_dataset, split_countries
from carbonfed.data.features import transform
from carbonfed.federation.config import RunConfig

N_FEATURES, N_CLASSES = 21, 5


@functools.lru_cache(maxsize=2)
def _data(data_dir: str, holdout_offset: int):
    """(countries, their standardised features and labels, train count, test count), once per worker."""
    ds = load_dataset("seed", data_dir or None)
    part = split_countries(ds.countries(), holdout_offset)
    x_train, _ = ds.all_arrays(part.train)
    xt = transform(x_train)
    mu, sd = xt.mean(0), np.maximum(xt.std(0), 1e-3)
    arrays = [ds.client_arrays(c) for c in ds.countries()]
    scaled = [(torch.from_numpy(((transform(x) - mu) / sd).astype(np.float32)), torch.from_numpy(y)) for x, y in arrays]
    return scaled, len(part.train), len(part.test)


def _model(seed: int | None = None) -> torch.nn.Linear:
    """The linear model; seeded on the server (the initial model), as it comes on a client."""
    if seed is not None:
        torch.manual_seed(seed)
    return torch.nn.Linear(N_FEATURES, N_CLASSES)


def _local(msg: Message, context: Context, cfg: RunConfig) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    torch.set_num_threads(1)
    scaled, _, _ = _data(cfg.data_dir, cfg.holdout_offset)
    x, y = scaled[int(context.node_config["partition-id"])]
    model = _model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model, x, y


def make_client_app(cfg: RunConfig) -> ClientApp:
    """The stock ClientApp: local SGD (train) and loss/accuracy (evaluate) on the node's rows."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        """Local SGD on this node's rows; the model and its number of rows back."""
        model, x, y = _local(msg, context, cfg)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        gen = torch.Generator().manual_seed(int(context.node_config["partition-id"]))
        batch = max(1, -(-len(y) // cfg.batches_per_epoch))
        for _ in range(cfg.local_epochs):
            perm = torch.randperm(len(y), generator=gen)
            for b in range(cfg.batches_per_epoch):
                idx = perm[b * batch:(b + 1) * batch]
                if len(idx):
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                    opt.step()
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"num-examples": len(y)})})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Loss and accuracy of the global model on this node's rows."""
        model, x, y = _local(msg, context, cfg)
        with torch.no_grad():
            logits = model(x)
            loss = float(torch.nn.functional.cross_entropy(logits, y))
            acc = float((logits.argmax(1) == y).float().mean())
        content = RecordDict({"metrics": MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(y)})})
        return Message(content=content, reply_to=msg)

    return app


def make_server_app(cfg: RunConfig, ends: list, result: dict, mark=time.monotonic) -> ServerApp:
    """The stock ServerApp: FedAvg for ``cfg.rounds`` rounds; appends ``mark()`` at each round's end
    to ``ends`` and puts Flower's ``Result`` in ``result["result"]``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        """FedAvg from the seeded initial model, sampling the partition's train and test counts."""
        _, n_train, n_test = _data(cfg.data_dir, cfg.holdout_offset)
        n = n_train + n_test
        strategy = FedAvg(fraction_train=n_train / n, min_train_nodes=n_train, fraction_evaluate=n_test / n,
                          min_evaluate_nodes=n_test, min_available_nodes=n)

        def stamp(server_round: int, arrays: ArrayRecord) -> None:
            ends.append(mark())

        result["result"] = strategy.start(grid, ArrayRecord(_model(0).state_dict()), num_rounds=cfg.rounds,
                                          evaluate_fn=stamp)

    return app


def run_stock(cfg: RunConfig, verbose: bool = False, mark=time.monotonic) -> tuple[list, object]:
    """Run stock FedAvg for ``cfg.rounds`` rounds on ``cfg``'s seed data (one SuperNode per
    country) in Flower's simulation engine; (``mark()`` at each round end, Flower's ``Result``)."""
    from flwr.simulation import run_simulation   # Flower's public simulation API (deprecated in 1.42 for `flwr run`)

    num_nodes = len(load_dataset("seed", cfg.data_dir or None).countries())
    ends: list = []
    result: dict = {}
    run_simulation(make_server_app(cfg, ends, result, mark), make_client_app(cfg), num_nodes,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": os.cpu_count() or 1, "logging_level": logging.ERROR,
                                                 "log_to_driver": verbose}},
                   verbose_logging=verbose)
    return ends, result.get("result")

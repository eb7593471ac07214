"""The sweep's centralized ceiling: the same model trained on the pooled rows of the training
countries, without privacy and without federation. An upper reference, not a federated result.

Guarantees
----------
* :func:`train_centralized` is deterministic in ``cfg.seed`` (model init and batch sampling), uses
  the clients' own training loop with DP off and scores the held-out countries' pooled rows into
  the same confusion matrix a federation sums.
* :func:`centralized_settings` holds everything that determines that result; its SHA-256
  (:func:`settings_digest`) is the run's ``provenance.config_sha256``, so a finished run with other
  settings is recognised.
* :func:`run_centralized` writes ``model.pt`` first and ``report.json`` last (atomically), so a run
  dir holding a ``report.json`` is finished.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from carbonfed.data import sha256_file, split_countries
from carbonfed.data.features import STD_FLOOR, Standardizer
from carbonfed.federation.config import RunConfig
from carbonfed.federation.experiments.sweep_plan import CENTRALIZED
from carbonfed.federation.report.build import scores
from carbonfed.federation.run_data import CSV, load_run_data
from carbonfed.models.mlp import build_model
from carbonfed.privacy.dp_sgd import TrainSettings, train_local
from carbonfed.privacy.randomness import NoiseSource


def centralized_settings(cfg: RunConfig) -> dict:
    """Everything that determines the centralized result (its config hash is over this)."""
    settings = {"trainer": CENTRALIZED, "dataset": cfg.dataset, "holdout_offset": cfg.holdout_offset,
                "seed": cfg.seed, "hidden": cfg.hidden, "lr": cfg.lr, "momentum": cfg.momentum,
                "epochs": cfg.rounds * cfg.local_epochs, "batches_per_epoch": cfg.batches_per_epoch,
                "class_weight_power": cfg.class_weight_power, "std_floor": STD_FLOOR,
                "standardization": "exact pooled mean/std of carbonfed.data.features.transform(x) over training rows"
                                   + (", then of asinh(x / c), c from them (Standardizer.exact)"
                                      if cfg.stats_stages == 3 else "")}
    if cfg.dataset == CSV:           # a user's table: which file, which columns (a bundled set is its name)
        settings.update(data=cfg.data, client_col=cfg.client_col, label_col=cfg.label_col, features=cfg.features)
    return settings


def train_centralized(cfg: RunConfig) -> dict:
    """Non-private, non-federated reference: one model on the pooled training countries' rows.

    Same model (``cfg.hidden``: the MLP or, with ``linear``, logistic regression; initialised from ``cfg.seed``), same optimiser (SGD, ``cfg.lr``,
    ``cfg.momentum``) and the clients' training loop (:func:`carbonfed.privacy.dp_sgd.train_local` with DP off:
    Poisson batches at the rate ``1 / batches_per_epoch``) for ``rounds × local_epochs`` epochs.
    Features: ``(transform(x) - mean) / std`` with the exact pooled mean/std of the training rows
    (std floored as the federated scaler floors it); with ``stats-stages = 3``, the asinh features
    of that setting instead, from exact pooled statistics (:meth:`Standardizer.exact`). Scored on the held-out countries' pooled rows,
    i.e. the same confusion matrix the federation sums.
    """
    import torch

    t0 = time.time()
    ds = load_run_data(cfg)
    part = split_countries(ds.countries(), cfg.holdout_offset)
    x, y = ds.all_arrays(part.train)
    scaler = Standardizer.exact(x, y, len(ds.classes), asinh=cfg.stats_stages == 3, log_bound=cfg.log_bound)
    model = build_model(len(ds.features), len(ds.classes), cfg.hidden_sizes, cfg.seed, class_counts=scaler.class_counts)
    settings = TrainSettings(lr=cfg.lr, momentum=cfg.momentum, local_epochs=cfg.rounds * cfg.local_epochs,
                             batches_per_epoch=cfg.batches_per_epoch, max_grad_norm=cfg.max_grad_norm)
    settings = settings.with_class_weights(tuple(scaler.class_weights(cfg.class_weight_power)))
    outcome = train_local(model, scaler.apply(x), y, settings, NoiseSource.derived(cfg.seed, "centralized"))
    x_test, y_test = ds.all_arrays(part.test)
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(scaler.apply(x_test))).argmax(1).numpy()
    k = len(ds.classes)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_test, pred), 1)
    return {"metrics": scores(cm), "confusion_matrix": cm.tolist(), "model": model, "scaler": scaler,
            "steps": outcome.steps, "train_rows": int(len(y)), "test_rows": int(len(y_test)),
            "clients": {"train": len(part.train), "test": len(part.test)}, "dataset": ds,
            "seconds": time.time() - t0}


def run_centralized(cfg: RunConfig, run_dir: Path) -> dict:
    """Train the centralized reference and write its ``report.json`` (last) in ``run_dir``."""
    import torch

    run_dir.mkdir(parents=True, exist_ok=True)
    res = train_centralized(cfg)
    ds, scaler = res["dataset"], res["scaler"]
    torch.save({"state_dict": res["model"].state_dict(), "features": list(ds.features), "classes": list(ds.classes),
                "hidden": list(cfg.hidden_sizes), "scaler": scaler.to_dict()}, run_dir / "model.pt")
    settings = centralized_settings(cfg)
    report = {
        "dataset": cfg.dataset, "privacy_mode": CENTRALIZED, "rounds": cfg.rounds, "seed": cfg.seed,
        "holdout_offset": cfg.holdout_offset, "clients": res["clients"],
        "metrics": res["metrics"], "confusion_matrix": res["confusion_matrix"],
        "privacy": None, "he": None,
        "timing": {"total_s": res["seconds"]},
        "training": {"steps": res["steps"], "train_rows": res["train_rows"], "test_rows": res["test_rows"]},
        "model": {"path": str(run_dir / "model.pt"), "samples": res["train_rows"]},
        "provenance": {"config_sha256": settings_digest(settings), "config": settings,
                       "data": {**ds.source, "sha256": ds.source.get("sha256") or sha256_file(ds.source["path"])}},
    }
    _write_json_atomic(run_dir / "report.json", report)
    return report


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)

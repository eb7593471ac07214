"""The audit's canaries and the attacker's view of a model (``carbonfed audit-attack``).

A canary is one out-of-distribution row: a random direction in the standardised feature space of
the training rows (plain mean/std of their transformed features), at :data:`CANARY_RADIUS` standard
deviations from the mean, a uniform random label, the unique year ``5000 + i`` and a random
training country. The attacker sees only a final model (``model.pt``) and scores rows by their
cross-entropy under it, after the run's own standardiser.

Guarantees
----------
* :func:`make_canaries` draws everything, including the secret fair inclusion coins, from the
  ``rng`` it is given; the canaries' transformed values stay inside the transform's range
  (clipped at :data:`CANARY_T_CLIP`), so the raw values are finite.
* :func:`write_canary_data` writes the source CSV byte for byte, then one row per *included*
  canary (same header; the other columns empty); the source file is not touched. It writes the
  bundled seed CSV and a user's federated CSV (its own party and label columns) alike.
* :func:`losses` is the per-row cross-entropy of the model on raw features, standardised exactly
  as in training (the saved :class:`~carbonfed.data.features.Standardizer`).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from carbonfed.data.features import LOG_BOUND, Standardizer, transform
from carbonfed.models.mlp import build_model

CANARY_YEAR0 = 5000
# Canaries: a random direction in the standardised feature space (plain mean/std of the
# transformed features of the training rows), at this many standard deviations from the mean.
CANARY_RADIUS = (8.0, 16.0)
CANARY_T_CLIP = 0.95                 # transformed values stay inside (-1, 1), the transform's range


def load_final_model(model_pt: str | Path):
    """(model, standardizer) from a report's ``model.pt``."""
    import torch

    saved = torch.load(model_pt, map_location="cpu", weights_only=False)
    model = build_model(len(saved["features"]), len(saved["classes"]), saved["hidden"])
    model.load_state_dict(saved["state_dict"])
    model.eval()
    return model, Standardizer.from_dict(saved["scaler"])


def losses(model, scaler, x_raw: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy of the model on raw features (standardised as in training)."""
    import torch

    with torch.no_grad():
        logits = model(torch.from_numpy(scaler.apply(np.asarray(x_raw, dtype=np.float32))))
        return torch.nn.functional.cross_entropy(logits, torch.from_numpy(np.asarray(y, dtype=np.int64)),
                                                 reduction="none").numpy().astype(np.float64)


def make_canaries(ds, train_countries, m: int, rng: np.random.Generator, log_bound: float = LOG_BOUND) -> dict:
    """m canary rows for training countries and the secret inclusion coins (fair, independent);
    ``log_bound``: the run's range of the log transform."""
    x_train, _ = ds.all_arrays(train_countries)
    t = transform(x_train, log_bound)
    mean, std = t.mean(0), np.maximum(t.std(0), 1e-3)
    d = len(ds.features)
    direction = rng.normal(size=(m, d))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    radius = rng.uniform(*CANARY_RADIUS, size=(m, 1))
    tc = np.clip(mean + std * direction * radius, -CANARY_T_CLIP, CANARY_T_CLIP)
    x = np.sign(tc) * np.expm1(np.abs(tc) * log_bound)
    return {"country": [str(c) for c in rng.choice(list(train_countries), size=m)],
            "year": [CANARY_YEAR0 + i for i in range(m)],
            "x": x, "label": rng.integers(0, len(ds.classes), size=m),
            "included": rng.random(m) < 0.5}


def write_canary_data(src_csv: Path, dst_dir: Path, canaries: dict, features, label_column: str,
                      party_column: str = "country", label_names=None) -> Path:
    """Copy ``src_csv`` into ``dst_dir`` and append the *included* canaries as rows: the party in
    ``party_column``, the label in ``label_column`` (its index, or its name in ``label_names``),
    the year in a ``year`` column if the file has one (a user's table needs none)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / src_csv.name
    raw = src_csv.read_bytes()
    header = [c.strip() for c in next(csv.reader(io.StringIO(raw.decode("utf-8-sig").splitlines()[0])))]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, restval="", lineterminator="\n")
    for i in np.flatnonzero(canaries["included"]):
        label = int(canaries["label"][i])
        row = {party_column: canaries["country"][i], label_column: label_names[label] if label_names else label}
        if "year" in header:
            row["year"] = canaries["year"][i]
        row.update({f: repr(float(v)) for f, v in zip(features, canaries["x"][i])})
        writer.writerow(row)
    with open(dst, "wb") as fh:
        fh.write(raw if raw.endswith(b"\n") else raw + b"\n")
        fh.write(buf.getvalue().encode())
    return dst

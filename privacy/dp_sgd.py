"""One client's local training: Opacus DP-SGD, or plain SGD on the same loop when DP is off.

Guarantees (DP on)
------------------
* Poisson sampling with rate ``1 / ceil(n / batch_size)`` and per-sample gradient clipping to
  ``max_grad_norm`` (Opacus ``make_private``), Gaussian noise of std
  ``noise_multiplier * max_grad_norm``: each optimizer step is the subsampled Gaussian
  mechanism that :class:`~privacy.accountant.ClientAccountant` accounts for.
* :func:`planned_mechanism` gives the exact ``(sample_rate, steps)`` a call will run before it
  runs, so a client can refuse a round that would exceed its budget *before* touching its data.
* Noise comes from torch's default generator (``secure_mode=False``): a seeded PRNG, not a
  cryptographically secure one; runs are reproducible, and reports say so.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@dataclass(frozen=True)
class TrainSettings:
    lr: float = 0.5
    momentum: float = 0.0
    local_epochs: int = 1
    batch_size: int = 32
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None  # None: DP off


@dataclass(frozen=True)
class TrainOutcome:
    steps: int
    sample_rate: float
    mean_loss: float


def planned_mechanism(n_samples: int, settings: TrainSettings) -> tuple[float, int]:
    """(sample rate, steps) that :func:`train_local` runs on ``n_samples`` rows."""
    batches = max(1, math.ceil(n_samples / settings.batch_size))
    return 1.0 / batches, batches * settings.local_epochs


def train_local(model: nn.Module, x: np.ndarray, y: np.ndarray, settings: TrainSettings, seed: int) -> TrainOutcome:
    """Train ``model`` in place on ``(x, y)``; returns what the accountant needs."""
    torch.manual_seed(seed)
    data = TensorDataset(torch.from_numpy(np.asarray(x, dtype=np.float32)), torch.from_numpy(np.asarray(y, dtype=np.int64)))
    loader = DataLoader(data, batch_size=settings.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    sample_rate, _ = planned_mechanism(len(data), settings)
    module = model
    if settings.noise_multiplier is not None:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="prv", secure_mode=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about secure_mode and its RNG on every call
            module, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, poisson_sampling=True,
                noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.max_grad_norm)
    loss_fn = nn.CrossEntropyLoss()
    module.train()
    steps, total, seen = 0, 0.0, 0
    for _ in range(settings.local_epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            if len(xb) == 0:          # an empty Poisson batch still takes a (noise-only) step
                optimizer.step()
                steps += 1
                continue
            loss = loss_fn(module(xb), yb)
            loss.backward()
            optimizer.step()
            steps += 1
            total += float(loss) * len(xb)
            seen += len(xb)
    if settings.noise_multiplier is not None:
        (sigma, q, st), = [(h[0], h[1], sum(s for *_, s in engine.accountant.history))
                           for h in engine.accountant.history[:1]] or [(settings.noise_multiplier, sample_rate, 0)]
        if abs(q - sample_rate) > 1e-12 or st != steps:
            raise RuntimeError(f"Opacus ran (q={q}, steps={st}), the plan said (q={sample_rate}, steps={steps})")
    return TrainOutcome(steps=steps, sample_rate=sample_rate, mean_loss=total / max(seen, 1))

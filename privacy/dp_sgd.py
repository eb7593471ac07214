"""One client's local training: Opacus DP-SGD, or the same loop without clipping and noise.

Guarantees (DP on)
------------------
* Poisson sampling with the *public* rate ``q = 1 / batches_per_epoch`` and ``batches_per_epoch
  × local_epochs`` steps per round, whatever the client's row count: the mechanism, and so the
  ε every client reports, reveals nothing about how many rows a client holds.
* Per-sample gradients are clipped to ``max_grad_norm`` and Gaussian noise of std
  ``noise_multiplier × max_grad_norm`` is added to their sum (Opacus ``make_private``): each step
  is the subsampled Gaussian mechanism that :class:`~privacy.accountant.ClientAccountant` accounts.
* :func:`planned_mechanism` gives that ``(sample_rate, steps)`` before training, so a client can
  charge its accountant — or refuse — before touching its data; :func:`train_local` checks that
  Opacus ran exactly that.
* Randomness (sampling and noise) comes from torch's generator seeded with ``seed``. Callers
  pass a secret seed (64 bits from the OS) unless the run asked for reproducible noise: torch's
  generator is a Mersenne Twister, not a cryptographically secure generator, and reports say so.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import TensorDataset


@dataclass(frozen=True)
class TrainSettings:
    lr: float = 0.1
    momentum: float = 0.9
    local_epochs: int = 2
    batches_per_epoch: int = 5
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None  # None: DP off
    class_weights: tuple[float, ...] | None = None

    def with_noise(self, sigma: float) -> "TrainSettings":
        return replace(self, noise_multiplier=sigma)

    def with_class_weights(self, weights: tuple[float, ...]) -> "TrainSettings":
        return replace(self, class_weights=tuple(float(w) for w in weights))


@dataclass(frozen=True)
class TrainOutcome:
    steps: int
    sample_rate: float
    mean_loss: float


def planned_mechanism(settings: TrainSettings) -> tuple[float, int]:
    """(sample rate, steps) of one call of :func:`train_local`; independent of the data."""
    return 1.0 / settings.batches_per_epoch, settings.batches_per_epoch * settings.local_epochs


def train_local(model: nn.Module, x: np.ndarray, y: np.ndarray, settings: TrainSettings, seed: int) -> TrainOutcome:
    """Train ``model`` in place on ``(x, y)``; returns what the accountant needs."""
    torch.manual_seed(seed)
    data = TensorDataset(torch.from_numpy(np.asarray(x, dtype=np.float32)),
                         torch.from_numpy(np.asarray(y, dtype=np.int64)))
    sample_rate, planned_steps = planned_mechanism(settings)
    loader = DPDataLoader(data, sample_rate=sample_rate, generator=torch.Generator().manual_seed(seed ^ 0x5EED))
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    module, engine = model, None
    if settings.noise_multiplier is not None:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="prv", secure_mode=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # secure_mode / RNG advice, repeated on every call
            module, optimizer, loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, poisson_sampling=False,
                noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.max_grad_norm)
        # Opacus averages by int(n·q), which is 0 for a client with fewer rows than batches.
        optimizer.expected_batch_size = max(1.0, len(data) * sample_rate)
    # Per-sample losses, weighted by class, averaged over the batch: the "mean" reduction
    # Opacus assumes when it rescales per-sample gradients.
    weights = torch.tensor(settings.class_weights, dtype=torch.float32) if settings.class_weights else None
    per_sample = nn.CrossEntropyLoss(reduction="none")

    def loss_fn(out, target):
        loss = per_sample(out, target)
        return (loss * weights[target]).mean() if weights is not None else loss.mean()
    module.train()
    steps, total, seen = 0, 0.0, 0
    for _ in range(settings.local_epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            # An empty Poisson batch is still a (noise-only) DP step: Opacus needs the backward
            # pass to set the (empty) per-sample gradients before it adds the noise.
            if len(xb) or engine is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # Opacus hooks on input-free modules
                    loss = loss_fn(module(xb), yb)
                    loss.backward()
                if len(xb):
                    total += float(loss.detach()) * len(xb)
                    seen += len(xb)
                optimizer.step()
            steps += 1
    if engine is not None:
        ran = [(q, s) for _, q, s in engine.accountant.history]
        if ran != [(sample_rate, planned_steps)]:
            raise RuntimeError(f"Opacus ran {ran}, the plan was {[(sample_rate, planned_steps)]}")
    elif steps != planned_steps:
        raise RuntimeError(f"ran {steps} steps, planned {planned_steps}")
    return TrainOutcome(steps=steps, sample_rate=sample_rate, mean_loss=total / max(seen, 1))

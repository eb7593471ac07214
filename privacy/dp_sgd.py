"""One client's local training: Opacus DP-SGD, or the same loop without clipping and noise.

Guarantees (DP on)
------------------
* Poisson sampling with the *public* rate ``q = 1 / batches_per_epoch`` and ``batches_per_epoch
  × local_epochs`` steps per round, whatever the client's row count: the mechanism, and so the
  ε every client reports, reveals nothing about how many rows a client holds.
* Per-sample gradients are clipped to ``max_grad_norm`` and Gaussian noise of std
  ``noise_multiplier × max_grad_norm`` is added to their sum (Opacus ``make_private``): each step
  is the subsampled Gaussian mechanism that :class:`~carbonfed.privacy.accountant.ClientAccountant` accounts.
* :func:`planned_mechanism` gives that ``(sample_rate, steps)`` before training, so a client can
  charge its accountant — or refuse — before touching its data; :func:`train_local` checks that
  Opacus ran exactly that.
* Randomness (Poisson sampling and Gaussian noise) comes from the caller's
  :class:`~carbonfed.privacy.randomness.NoiseSource`, a ChaCha20 stream keyed with 256 bits of OS entropy
  unless the run asked for reproducible noise, never from torch's Mersenne Twister; the noise is
  hardened against floating-point attacks as Opacus's ``secure_mode`` is (which itself needs the
  unmaintained ``torchcsprng``): :class:`HardenedNoiseDPOptimizer`.
* Audit hook: with ``canaries`` (:func:`carbonfed.privacy.canary_grad.audit_canaries`, only while
  ``carbonfed audit-attack`` runs its own canary federation) the included gradient canaries are
  Poisson-sampled at ``q`` into each step's clipped sum before the noise. Without them
  (:data:`~carbonfed.privacy.canary_grad.NO_CANARIES`, the default) nothing changes: the same
  draws from ``noise`` in the same order, the same model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import Sampler

from carbonfed.privacy.canary_grad import NO_CANARIES, audit_canaries  # noqa: F401  (the participant's hook)
from carbonfed.privacy.randomness import NoiseSource


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


class PoissonBatches(Sampler[list[int]]):
    """``batches`` Poisson-sampled batches of row indices: each row joins each batch
    independently with probability ``rate``, drawn from ``noise`` (what Opacus's
    ``UniformWithReplacementSampler`` does with a torch generator)."""

    def __init__(self, n_rows: int, rate: float, batches: int, noise: NoiseSource):
        self.n_rows, self.rate, self.batches, self.noise = n_rows, rate, batches, noise

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        for _ in range(self.batches):
            yield np.flatnonzero(self.noise.poisson_mask(self.n_rows, self.rate)).tolist()


class HardenedNoiseDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer (per-sample clipping, Gaussian noise of std ``noise_multiplier ×
    max_grad_norm`` on the clipped sum) with the noise drawn from a :class:`NoiseSource`
    (ChaCha20, sum-of-four hardening) instead of torch's generator."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise: NoiseSource, canaries=NO_CANARIES, **kwargs):
        super().__init__(optimizer, **kwargs)
        self.noise = noise
        self.canaries = canaries

    def add_noise(self):
        # the audit's fault drill may scale the noise actually drawn (1 outside it)
        std = self.noise_multiplier * self.max_grad_norm * self.canaries.noise_scale
        extra = self.canaries.step_gradients(self.params, self.max_grad_norm) if self.canaries else {}
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            draw = self.noise.normal(std, tuple(p.summed_grad.shape))
            grad = p.summed_grad + torch.from_numpy(draw).to(p.summed_grad.dtype)
            p.grad = (grad + extra[id(p)] if id(p) in extra else grad).view_as(p)
            _mark_as_processed(p.summed_grad)


def train_local(model: nn.Module, x: np.ndarray, y: np.ndarray, settings: TrainSettings,
                noise: NoiseSource, canaries=NO_CANARIES) -> TrainOutcome:
    """Train ``model`` in place on ``(x, y)``, every random draw from ``noise``; returns what the
    accountant needs. ``canaries``: the audit's gradient canaries (DP on only)."""
    xs, ys = torch.from_numpy(np.asarray(x, dtype=np.float32)), torch.from_numpy(np.asarray(y, dtype=np.int64))
    n_rows = len(ys)
    sample_rate, planned_steps = planned_mechanism(settings)
    # Each batch is the rows the Poisson sampler drew, indexed directly (an empty batch has shape
    # (0, d)): what a DataLoader over this sampler collates, without its per-row fetch and stack.
    batches = PoissonBatches(n_rows, sample_rate, settings.batches_per_epoch, noise)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    module, accountant = model, None
    if canaries:
        if settings.noise_multiplier is None:
            raise ValueError("gradient canaries audit DP-SGD: this client trains without DP")
        canaries.start(model, sample_rate)
    if settings.noise_multiplier is not None:
        # What PrivacyEngine.make_private assembles, with the noise from ``noise``.
        ModuleValidator.validate(model, strict=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        module.forbid_grad_accumulation()
        # Opacus averages by the expected batch n·q (at least 1 for a client with fewer rows than batches).
        optimizer = HardenedNoiseDPOptimizer(
            optimizer, noise=noise, canaries=canaries, noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm, expected_batch_size=max(1.0, n_rows * sample_rate))
        accountant = PRVAccountant()
        optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
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
        for rows in batches:
            xb, yb = xs[rows], ys[rows]
            optimizer.zero_grad()
            # An empty Poisson batch is still a (noise-only) DP step: Opacus needs the backward
            # pass to set the (empty) per-sample gradients before it adds the noise.
            if len(xb) or accountant is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # Opacus hooks on input-free modules
                    loss = loss_fn(module(xb), yb)
                    loss.backward()
                if len(xb):
                    total += float(loss.detach()) * len(xb)
                    seen += len(xb)
                optimizer.step()
            steps += 1
    if accountant is not None:
        ran = [(q, s) for _, q, s in accountant.history]
        if ran != [(sample_rate, planned_steps)]:
            raise RuntimeError(f"Opacus ran {ran}, the plan was {[(sample_rate, planned_steps)]}")
    elif steps != planned_steps:
        raise RuntimeError(f"ran {steps} steps, planned {planned_steps}")
    return TrainOutcome(steps=steps, sample_rate=sample_rate, mean_loss=total / max(seen, 1))

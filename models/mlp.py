"""The seed project's emission-category MLP (21→32→16→5, ReLU), width configurable.

Guarantees: only ``nn.Linear`` and ``nn.ReLU`` layers, which Opacus's GradSampleModule supports
with exact per-sample gradients; the same seed gives the same initial weights on every machine
(CPU, float32), which is how every client starts from one public initial model without the
server sending it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


class EmissionMLP(nn.Module):
    def __init__(self, n_features: int = 21, n_classes: int = 5, hidden: Sequence[int] = (32, 16)):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def describe(n_features: int, n_classes: int, hidden: Sequence[int]) -> str:
    """``"MLP 21→32→16→5 (ReLU)"``, or ``"linear 21→5 (multinomial logistic regression)"`` without hidden layers."""
    shape = "→".join(str(int(w)) for w in (n_features, *hidden, n_classes))
    return f"MLP {shape} (ReLU)" if hidden else f"linear {shape} (multinomial logistic regression)"


def prior_logits(class_counts: Sequence[float]) -> np.ndarray:
    """The centred log class frequencies of ``class_counts`` (each clamped at 1): the output bias
    under which a model with zero weights predicts the class prior."""
    log_freq = np.log(np.maximum(np.asarray(class_counts, dtype=np.float64), 1.0))
    return log_freq - log_freq.mean()


def build_model(n_features: int, n_classes: int, hidden: Sequence[int] = (32, 16), seed: int = 0,
                class_counts: Sequence[float] | None = None) -> EmissionMLP:
    """A freshly initialised model; identical for identical arguments. With ``class_counts``
    (the federation's released counts per class), the output layer's bias starts at the centred
    log class frequencies, so the untrained model predicts the class prior rather than uniform
    classes; the weights keep torch's initialisation."""
    gen_state = torch.random.get_rng_state()
    # the CPU generator alone: torch.manual_seed also queues seeds for CUDA/XPU/MTIA with a stack
    # trace each (milliseconds per call, every message), and initialisation runs on the CPU
    torch.random.default_generator.manual_seed(seed)
    try:
        model = EmissionMLP(n_features, n_classes, hidden)
    finally:
        torch.random.set_rng_state(gen_state)
    if class_counts is not None:
        with torch.no_grad():
            model.net[-1].bias.copy_(torch.from_numpy(prior_logits(class_counts)).to(torch.float32))
    return model

"""Flat float64 vectors of a model's parameters, in ``state_dict`` order.

Guarantee: ``load_flat_params(m, flatten_params(m))`` leaves ``m`` unchanged; a vector of the
wrong length or with non-finite entries is refused with a message that says which.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _params(model: nn.Module):
    # Opacus wraps modules as `_module.*`; parameters() order is the same either way.
    return [p for p in model.parameters()]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in _params(model))


def flatten_params(model: nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().cpu().numpy().ravel().astype(np.float64) for p in _params(model)])


def load_flat_params(model: nn.Module, flat: np.ndarray) -> None:
    flat = np.asarray(flat, dtype=np.float64)
    n = num_params(model)
    if flat.shape != (n,):
        raise ValueError(f"parameter vector has shape {flat.shape}, the model needs ({n},)")
    if not np.all(np.isfinite(flat)):
        raise ValueError("parameter vector contains NaN or infinite values")
    i = 0
    with torch.no_grad():
        for p in _params(model):
            k = p.numel()
            p.copy_(torch.from_numpy(flat[i:i + k].reshape(p.shape)).to(p.dtype))
            i += k

"""Models trained by carbonfed clients."""
from carbonfed.models.mlp import EmissionMLP, build_model
from carbonfed.models.params import flatten_params, load_flat_params, num_params

__all__ = ["EmissionMLP", "build_model", "flatten_params", "load_flat_params", "num_params"]

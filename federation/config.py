"""The run configuration: one typed record of every setting a run uses.

Guarantees: the defaults here are the single source of truth; ``pyproject.toml``'s
``[tool.flwr.app.config]`` mirrors them (a test checks), so ``flwr run .`` and
``carbonfed run`` run the same job. :meth:`RunConfig.from_flower` validates every value and says
which key is wrong; :meth:`RunConfig.digest` is the config hash reports cite. :func:`flower_app_toml`
is the one description of the Flower app (components and run-config defaults) that the simulation
and the deployment write for Flower, the same as ``pyproject.toml``'s.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields

from carbonfed.federation.faults import parse_drill
from carbonfed.privacy.accountant import stats_noise_floor

PRIVACY_MODES = ("none", "dp", "he", "dp+he")
# The Flower app's components, as in pyproject.toml's [tool.flwr.app.components] (a test checks).
APP_COMPONENTS = {"serverapp": "carbonfed.federation.server.app:app", "clientapp": "carbonfed.federation.client.app:app"}


_HELP = {"hidden": "hidden layer widths, comma-separated, or 'linear' (none: logistic regression); ",
         "average_last": "the run's model is the mean of the global models of the last N rounds, summed on "
                         "ciphertexts by the server (1: the final round's model); "}


@dataclass(frozen=True)
class RunConfig:
    dataset: str = "seed"
    data_dir: str = ""
    privacy: str = "dp+he"
    epsilon: float = 3.0
    delta: float = 1e-5
    rounds: int = 30
    seed: int = 0
    holdout_offset: int = 0
    local_epochs: int = 2
    batches_per_epoch: int = 5
    lr: float = 0.1
    momentum: float = 0.9
    max_grad_norm: float = 1.0
    class_weight_power: float = 0.0
    hidden: str = "32,16"
    average_last: int = 1
    stats_noise_multiplier: float = 4.0
    stats_stages: int = 2
    max_client_samples: int = 512
    param_clip: float = 8.0
    max_clients_per_round: int = 256
    min_train_clients: int = 2
    min_nodes: int = 0
    round_timeout: float = 600.0
    keys_dir: str = ""
    out_dir: str = ""
    state_dir: str = ""      # clients' state folder where the node config names none (carbonfed run)
    fault_drill: str = ""
    reproducible_noise: bool = False

    def __post_init__(self):
        errors = []
        if self.privacy not in PRIVACY_MODES:
            errors.append(f"privacy must be one of {PRIVACY_MODES}, got {self.privacy!r}")
        if self.dp and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            errors.append(f"epsilon must be a positive finite number when DP is on, got {self.epsilon}")
        if not (0 < self.delta < 1):
            errors.append(f"delta must lie in (0, 1), got {self.delta}")
        if self.rounds < 1:
            errors.append("rounds must be >= 1")
        if self.holdout_offset not in range(5):
            errors.append(f"holdout-offset must be 0..4, got {self.holdout_offset}")
        if self.average_last < 1:
            errors.append(f"average-last must be >= 1 (1: the final round's model), got {self.average_last}")
        if self.batches_per_epoch < 1 or self.local_epochs < 1:
            errors.append("batches-per-epoch and local-epochs must be >= 1")
        if self.stats_noise_multiplier < 0:
            errors.append("stats-noise-multiplier must be >= 0")
        if self.stats_stages not in (1, 2, 3):
            errors.append(f"stats-stages must be 1, 2 or 3, got {self.stats_stages}")
        try:
            self.hidden_sizes
        except ValueError:
            errors.append(f"hidden must be comma-separated layer widths, got {self.hidden!r}")
        try:
            parse_drill(self.fault_drill)
        except ValueError as exc:
            errors.append(str(exc))
        if errors:
            raise ValueError("invalid run config: " + "; ".join(errors))

    @property
    def dp(self) -> bool:
        return self.privacy in ("dp", "dp+he")

    @property
    def stats_sigma(self) -> float:
        """Noise multiplier of each statistics release; 0 (exact statistics, outside the
        guarantee) without DP or with ``stats-noise-multiplier = 0``. It is
        ``stats-noise-multiplier``, raised where a small ε needs it so that the planned releases
        spend at most half of ε (:func:`carbonfed.privacy.accountant.stats_noise_floor`): otherwise they
        could take the whole budget and leave DP-SGD none. At ε ≥ 3 (δ = 1e-5) the default 4 stands."""
        if not self.dp or self.stats_noise_multiplier <= 0:
            return 0.0
        return max(self.stats_noise_multiplier, stats_noise_floor(self.epsilon, self.delta, self.stats_stages))

    @property
    def stats_releases(self) -> int:
        """How many statistics releases the run makes. DP runs with noisy statistics make
        ``stats-stages`` (2, the default: a per-feature refinement of the log features; 3: then
        the asinh features of :mod:`carbonfed.data.features`, the seed main job's). Runs with exact
        statistics (no DP, or ``stats-noise-multiplier = 0``) need no refinement, so they make 1,
        except with ``stats-stages = 3``: the asinh features need ``c`` from the second stage, so
        they make all 3 (exactly), and a ``none`` or ``he`` run then trains on the main job's
        features, which is what a side-by-side comparison of the modes needs."""
        noisy = self.dp and self.stats_noise_multiplier > 0
        return self.stats_stages if noisy or self.stats_stages == 3 else 1

    @property
    def two_stage_stats(self) -> bool:
        """More than one statistics release."""
        return self.stats_releases > 1

    @property
    def he(self) -> bool:
        return self.privacy in ("he", "dp+he")

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        text = str(self.hidden).strip().lower()
        if text in ("linear", "none", "0"):
            return ()       # no hidden layer: multinomial logistic regression
        sizes = tuple(int(h) for h in text.split(",") if h.strip())
        if not sizes or min(sizes) < 1:
            raise ValueError(self.hidden)
        return sizes

    # Flower run-config keys use dashes: "holdout-offset".
    def to_flower(self) -> dict:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_flower(cls, run_config: dict) -> "RunConfig":
        kwargs = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in run_config:
                default = getattr(cls, f.name)
                value = run_config[key]
                if isinstance(default, bool) and isinstance(value, str):
                    value = {"true": True, "false": False}.get(value.lower(), value)
                try:
                    if isinstance(default, bool) and not isinstance(value, bool):
                        raise TypeError
                    kwargs[f.name] = type(default)(value)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"run config {key}={run_config[key]!r}: expected {type(default).__name__}") from exc
        return cls(**kwargs)

    @classmethod
    def add_options(cls, parser, skip: tuple[str, ...]) -> None:
        """One optional ``--key`` per setting not in ``skip`` (default None: the RunConfig default);
        a boolean setting is a flag (``--reproducible-noise``)."""
        defaults = cls()
        for f in fields(cls):
            if f.name not in skip:
                default = getattr(defaults, f.name)
                kind = {"action": "store_true"} if isinstance(default, bool) else {"type": type(default)}
                parser.add_argument("--" + f.name.replace("_", "-"), default=None, **kind,
                                    help=_HELP.get(f.name, "") + f"default {default!r}")

    @classmethod
    def options_given(cls, args, skip: tuple[str, ...]) -> dict:
        """The settings :meth:`add_options` parsed that the user gave, as RunConfig keyword arguments."""
        return {f.name: getattr(args, f.name) for f in fields(cls)
                if f.name not in skip and getattr(args, f.name, None) is not None}

    def digest(self) -> str:
        """SHA-256 of the settings that determine results (paths and the node-count wait excluded)."""
        d = asdict(self)
        for k in ("data_dir", "keys_dir", "out_dir", "min_nodes"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def flower_app_toml(cfg: RunConfig) -> dict:
    """The ``[tool.flwr.app]`` table (as a TOML document) of a Flower app whose run-config defaults are ``cfg``."""
    return {"tool": {"flwr": {"app": {"publisher": "carbonfed", "components": dict(APP_COMPONENTS),
                                      "config": cfg.to_flower()}}}}

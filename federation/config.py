"""The run configuration: one typed record of every setting a run uses.

Guarantees: the defaults here are the single source of truth (a preset-governed setting's
default is "auto": the data set's preset, :mod:`carbonfed.federation.presets`, resolved when the
config is made, so every later reader sees a concrete value); ``pyproject.toml``'s
``[tool.flwr.app.config]`` mirrors them (a test checks), so ``flwr run .`` and
``carbonfed run`` run the same job. :meth:`RunConfig.from_flower` validates every value and says
which key is wrong; every numeric setting is checked when a config is made (finite, in its range,
δ below 1/max-client-samples with DP: :func:`_range_errors`), so a bad value fails before a run
creates anything; :meth:`RunConfig.digest` is the config hash reports cite. :func:`flower_app_toml`
is the one description of the Flower app (components and run-config defaults) that the simulation
and the deployment write for Flower, the same as ``pyproject.toml``'s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields

from carbonfed.data.features import LOG_BOUND
from carbonfed.federation.faults import parse_drill
from carbonfed.federation.presets import AUTO, DDP_AUTO, is_auto, preset_help, resolve
from carbonfed.privacy.accountant import stats_noise_floor

PRIVACY_MODES = ("none", "dp", "he", "dp+he", "ddp+he")
DDP_ONLY = ("min_noise_clients", "server_opt", "ddp_sample_rate", "ddp_clip", "ddp_stats_sigma", "ddp_lr_z",
            "ddp_weight_decay")
MIN_NOISE_FRACTION = 0.8   # default min-noise-clients: ⌈0.8 · training clients⌉ (bench/ddp_twin.py's min_frac)
# The Flower app's components, as in pyproject.toml's [tool.flwr.app.components] (a test checks).
APP_COMPONENTS = {"serverapp": "carbonfed.federation.server.app:app", "clientapp": "carbonfed.federation.client.app:app"}


_HELP = {"hidden": "hidden layer widths, comma-separated, or 'linear' (none: logistic regression); ",
         "average_last": "the run's model is the mean of the global models of the last N rounds, summed on "
                         "ciphertexts by the server (1: the final round's model); ",
         "data": "a federated CSV file (one row per record; a party column and a label column): the csv data set; ",
         "client_col": "the CSV column naming each row's party (client); ",
         "label_col": "the CSV column of the label (text or integer; the classes are its distinct values); ",
         "features": "the CSV feature columns, comma-separated (empty: every numeric column but the party and "
                     "label columns); "}

# One line of meaning for every other option of `carbonfed run` (its default follows in --help).
_MEANINGS = {
    "epsilon": "the DP budget ε of each client over the whole run (statistics releases and training); ",
    "delta": "the DP δ of each client; must be below 1/max-client-samples (the rows one client may hold); ",
    "rounds": "training rounds; ", "seed": "random seed of the run (model initialisation, client split, batch sampling); ",
    "holdout_offset": "which fifth of the clients (0..4) is held out for the test; ",
    "local_epochs": "local epochs per round on each client; ", "batches_per_epoch": "batches per local epoch; ",
    "lr": "SGD learning rate; ", "momentum": "SGD momentum, in [0, 1); ",
    "max_grad_norm": "DP-SGD per-example gradient clip norm; ",
    "class_weight_power": "class weights are (class frequency)^-power in the loss (0: unweighted); ",
    "stats_noise_multiplier": "noise multiplier of the DP statistics releases (0: exact statistics, outside the "
                              "guarantee); ",
    "stats_stages": "statistics releases before training: 1, 2 (a refinement) or 3 (then the asinh features); ",
    "log_bound": "range of the signed-log feature transform: |log1p(x)| is clipped to it (the log of a public bound of "
                 "the variables' magnitude); ",
    "max_client_samples": "the most rows one client may hold (a public bound: it sizes the encodings); ",
    "param_clip": "each model parameter is clipped to ±param-clip before it is encoded; ",
    "max_clients_per_round": "the most updates one round sums (sizes the encoding's headroom); ",
    "min_train_clients": "fewer accepted updates than this and a round keeps the previous model; ",
    "min_nodes": "SuperNodes the server waits for before the setup (0: one per client of the data set); ",
    "round_timeout": "seconds the server waits for the replies of one round; ",
    "fault_drill": "make some clients misbehave, to test the server's defences (e.g. foreign-key:2); ",
    "reproducible_noise": "draw the DP noise from the seed (for tests; the noise is then predictable); ",
    "masks": "HE modes: pairwise masks inside the encrypted uploads, so that no key holder with the server sees one "
             "client's update (a masked round costs 1.6-1.8x an unmasked one); ",
    "mask_neighbours": "masks: each client's neighbours (0: every other training client; an even k: k of them on a "
                       "public ring, fewer bytes per round, a threshold of k - floor(k/3)); ",
    "charter": "the sealed charter the clients endorsed (charter.json; set by carbonfed run and deploy); ",
    "min_noise_clients": "ddp+he: each client's noise share is calibrated for this many contributors, and a round "
                         "with fewer is not released (0: ⌈0.8 · training clients⌉); ",
    "server_opt": "ddp+he: the optimizer the key holders apply to the released gradient sum (adam, momentum); ",
    "ddp_sample_rate": "ddp+he: Poisson rate q at which each client samples its rows every round; ",
    "ddp_clip": "ddp+he: per-example gradient clip norm C (one row moves a round's sum by at most C); ",
    "ddp_stats_sigma": "ddp+he: central noise multiplier of each statistics release (summed from shares); ",
    "ddp_lr_z": "ddp+he with adam: the largest lr x z, z the rounds' central noise multiplier (lr = min(lr, ddp-lr-z / z): "
                "a smaller step where noise dominates; a large value: no cap); ",
    "ddp_weight_decay": "ddp+he: decoupled weight decay toward the public start (w -= lr x decay x (w - w0) each "
                        "round; a noise-driven weight then reverts instead of wandering; 0: off; -1: the preset's); ",
}
for _name, _text in _MEANINGS.items():
    _HELP.setdefault(_name, _text)


_BOOL_AUTO = ("masks",)      # on/off settings whose default is "auto" (the preset's): --masks / --no-masks


def _positive(v) -> bool:
    """Finite and > 0 (NaN fails every comparison)."""
    return 0 < v < math.inf


def _nonneg(v) -> bool:
    return 0 <= v < math.inf


def _range_errors(cfg: "RunConfig") -> list[str]:
    """Every numeric setting finite and in its range, each error naming its run-config key.

    δ: with DP on, δ must be below 1/max-client-samples. A mechanism that publishes each row
    with probability δ is (0, δ)-DP, and publishes n·δ of a client's n rows on average: δ ≥ 1/n
    allows a whole row in the clear, so δ < 1/n for the largest n a client may hold (the privacy
    statement states the same bound)."""
    checks = {"epsilon": (lambda v: v > 0 and (math.isfinite(v) or not cfg.dp),
                          "a number > 0 (finite when DP is on)"),
              "delta": (lambda v: 0 < v < 1, "in (0, 1)"), "rounds": (lambda v: v >= 1, ">= 1"),
              "seed": (lambda v: v >= 0, ">= 0"), "holdout_offset": (lambda v: 0 <= v <= 4, "0..4"),
              "local_epochs": (lambda v: v >= 1, ">= 1"), "batches_per_epoch": (lambda v: v >= 1, ">= 1"),
              "lr": (_positive, "a finite number > 0"), "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
              "max_grad_norm": (_positive, "a finite number > 0"), "class_weight_power": (_nonneg, "finite and >= 0"),
              "average_last": (lambda v: v >= 1, ">= 1 (1: the final round's model)"),
              "stats_noise_multiplier": (_nonneg, "finite and >= 0"), "stats_stages": (lambda v: v in (1, 2, 3), "1, 2 or 3"),
              "log_bound": (_positive, "a finite number > 0"),
              "max_client_samples": (lambda v: v >= 1, ">= 1"), "param_clip": (_positive, "a finite number > 0"),
              "max_clients_per_round": (lambda v: v >= 1, ">= 1"), "min_train_clients": (lambda v: v >= 1, ">= 1"),
              "min_nodes": (lambda v: v >= 0, ">= 0"), "round_timeout": (_positive, "a finite number of seconds > 0"),
              "min_noise_clients": (lambda v: v >= 0, ">= 0 (0: ⌈0.8 · training clients⌉)"),
              "ddp_sample_rate": (lambda v: 0 < v <= 1, "in (0, 1]"), "ddp_clip": (_nonneg, "finite and >= 0"),
              "ddp_stats_sigma": (_nonneg, "finite and >= 0"), "ddp_lr_z": (_nonneg, "finite and >= 0"),
              "ddp_weight_decay": (lambda v: v == -1 or _nonneg(v), "finite and >= 0 (-1: the preset's)"),
              "mask_neighbours": (lambda v: v == 0 or (v >= 2 and v % 2 == 0), "0 or an even number >= 2")}
    errors = [f"{name.replace('_', '-')} must be {text}, got {getattr(cfg, name)!r}"
              for name, (ok, text) in checks.items() if not ok(getattr(cfg, name))]
    if cfg.ddp and cfg.server_opt not in ("adam", "momentum"):
        errors.append(f"server-opt must be adam or momentum, got {cfg.server_opt!r}")
    if cfg.dp and 0 < cfg.delta < 1 and cfg.max_client_samples >= 1 and not cfg.delta < 1 / cfg.max_client_samples:
        errors.append(f"delta must be below 1/max-client-samples = {1 / cfg.max_client_samples:.3g} when DP is on "
                      f"(δ ≥ 1/n lets a mechanism publish a whole row of a client's n), got {cfg.delta!r}")
    if cfg.min_train_clients > cfg.max_clients_per_round >= 1:
        errors.append(f"min-train-clients ({cfg.min_train_clients}) must not exceed max-clients-per-round "
                      f"({cfg.max_clients_per_round}): no round could keep its update")
    return errors


@dataclass(frozen=True)
class RunConfig:
    dataset: str = "seed"
    data_dir: str = ""
    # a user's federated CSV (dataset "csv"): the file, its party and label columns, the feature
    # columns (comma-separated; empty: every numeric column) and the class names (a JSON list);
    # `carbonfed run` resolves features and classes from the file (federation/run_data.py)
    data: str = ""
    client_col: str = ""
    label_col: str = ""
    features: str = ""
    classes: str = ""
    privacy: str = "auto"           # "auto": the data set's recommended mode (presets.py: owid ddp+he, else dp+he)
    epsilon: float = 3.0
    delta: float = 1e-5
    rounds: int = 0                 # 0: the data set's preset (30; ddp+he presets choose their own)
    seed: int = 0
    holdout_offset: int = 0
    local_epochs: int = 2
    batches_per_epoch: int = 5
    lr: float = 0.0                 # 0 (and the other "auto" values): the data set's preset (presets.py)
    momentum: float = 0.9
    max_grad_norm: float = 1.0
    class_weight_power: float = 0.0
    hidden: str = "auto"
    average_last: int = 0
    stats_noise_multiplier: float = 4.0
    stats_stages: int = 0
    log_bound: float = 0.0          # range of the log transform (data/features.py); 0: the preset's
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
    # pairwise masks inside the BFV plaintext (issue 22): HE modes only; "auto": on for ddp+he (whose single
    # uploads carry only a share of the noise), off for the local-DP modes (each upload is already ε-DP)
    masks: bool | str = "auto"
    mask_neighbours: int = 0     # 0: every other training client; k (even): a circulant neighbourhood of k
    # the sealed charter this run's clients endorsed (charter.json; carbonfed.privacy.charter): a local
    # path, so outside the digest and the charter itself
    charter: str = ""
    # ddp+he only (distributed DP-FedSGD, issue 19); "auto" values come from presets.DDP_PRESETS
    min_noise_clients: int = 0
    server_opt: str = "auto"
    ddp_sample_rate: float = 1.0
    ddp_clip: float = 0.0
    ddp_stats_sigma: float = 0.0
    ddp_lr_z: float = 0.0
    ddp_weight_decay: float = -1.0

    def __post_init__(self):
        if self.privacy == "ddp":
            raise ValueError("invalid run config: privacy 'ddp' is refused: distributed DP needs HE (a plaintext sum "
                             "would expose each client's noise share); use 'ddp+he'")
        self._resolve_preset()
        errors = self._data_errors()
        if self.privacy not in PRIVACY_MODES:
            errors.append(f"privacy must be one of {PRIVACY_MODES}, got {self.privacy!r}")
        errors += _range_errors(self)        # every numeric setting: finite, in range, key named
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

    def _resolve_preset(self) -> None:
        """Give each preset-governed setting at its "auto" value the data set's preset value
        (:mod:`carbonfed.federation.presets`; an explicit value wins). An unknown data set is
        an error at once: no preset, so no later check could say anything useful."""
        if isinstance(self.masks, str) and not is_auto("masks", self.masks):
            flag = {"true": True, "false": False}.get(self.masks.strip().lower())
            if flag is None:
                raise ValueError(f"invalid run config: masks must be true, false or auto, got {self.masks!r}")
            object.__setattr__(self, "masks", flag)
        try:
            chosen = resolve(self.dataset, {name: getattr(self, name) for name in (*AUTO, *DDP_AUTO)})
        except ValueError as exc:
            raise ValueError(f"invalid run config: {exc}") from None
        for name, value in chosen.items():
            object.__setattr__(self, name, value)      # frozen: set once, before anything reads it

    def _data_errors(self) -> list[str]:
        """A user's CSV (``data``) is the ``csv`` data set and names its party and label columns;
        the CSV settings mean nothing for a bundled data set."""
        csv_keys = ("data", "client_col", "label_col", "features", "classes")
        if self.dataset != "csv":
            given = [k.replace("_", "-") for k in csv_keys if getattr(self, k)]
            return [f"{', '.join(given)}: only for a CSV run (--data FILE.csv); this run uses the "
                    f"{self.dataset} data set"] if given else []
        errors = [f"the csv data set needs {k.replace('_', '-')} (--{k.replace('_', '-')})"
                  for k in ("data", "client_col", "label_col") if not getattr(self, k)]
        try:
            classes = json.loads(self.classes) if self.classes else []
            if not isinstance(classes, list):
                raise ValueError
        except ValueError:
            errors.append(f"classes must be a JSON list of class names, got {self.classes!r}")
        return errors

    @property
    def dp(self) -> bool:
        """Any DP mode: local (``dp``, ``dp+he``) or distributed (``ddp+he``)."""
        return self.privacy in ("dp", "dp+he", "ddp+he")

    @property
    def ddp(self) -> bool:
        """Distributed DP-FedSGD: Skellam noise shares summed under HE (:mod:`carbonfed.privacy.distributed_dp`)."""
        return self.privacy == "ddp+he"

    def noise_floor(self, n_train: int) -> int:
        """``ddp+he``: the contributors each noise share is calibrated for (``min-noise-clients``;
        0: ⌈MIN_NOISE_FRACTION · ``n_train``⌉); a round with fewer is not released."""
        return int(self.min_noise_clients) or max(1, math.ceil(MIN_NOISE_FRACTION * int(n_train) - 1e-9))

    def release_floor(self, n_train: int) -> int:
        """The fewest contributions an aggregate may sum to be decrypted: ``min-train-clients``,
        and with ``ddp+he`` at least :meth:`noise_floor`."""
        return max(self.min_train_clients, self.noise_floor(n_train)) if self.ddp else self.min_train_clients

    @property
    def stats_sigma(self) -> float:
        """Noise multiplier of each statistics release; 0 (exact statistics, outside the
        guarantee) without DP or with ``stats-noise-multiplier = 0``. It is
        ``stats-noise-multiplier``, raised where a small ε needs it so that the planned releases
        spend at most half of ε (:func:`carbonfed.privacy.accountant.stats_noise_floor`): otherwise they
        could take the whole budget and leave DP-SGD none. At ε ≥ 3 (δ = 1e-5) the default 4 stands."""
        if not self.dp or self.stats_noise_multiplier <= 0:
            return 0.0
        if self.ddp:      # central, summed from shares; accounted by the ddp plan, not this floor
            return float(self.ddp_stats_sigma)
        return max(self.stats_noise_multiplier, stats_noise_floor(self.epsilon, self.delta, self.stats_stages))

    @property
    def stats_releases(self) -> int:
        """How many statistics releases the run makes. DP runs with noisy statistics make
        ``stats-stages`` (2: a per-feature refinement of the log features, the owid and csv
        presets'; 3: then the asinh features of :mod:`carbonfed.data.features`, the seed preset's). Runs with exact
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
        return self.privacy in ("he", "dp+he", "ddp+he")

    @property
    def masked(self) -> bool:
        """Pairwise masks on the uploads (issue 22): on (``masks``) in an HE mode."""
        return self.he and self.masks

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
                flag = isinstance(default, bool) or f.name in _BOOL_AUTO
                kind = ({"action": argparse.BooleanOptionalAction if default is True or f.name in _BOOL_AUTO
                         else "store_true"} if flag else {"type": type(default)})
                parser.add_argument("--" + f.name.replace("_", "-"), default=None, **kind,
                                    help=_HELP.get(f.name, "") + (preset_help(f.name) or f"default {default!r}"))

    @classmethod
    def options_given(cls, args, skip: tuple[str, ...]) -> dict:
        """The settings :meth:`add_options` parsed that the user gave, as RunConfig keyword arguments."""
        return {f.name: getattr(args, f.name) for f in fields(cls)
                if f.name not in skip and getattr(args, f.name, None) is not None}

    def digest(self) -> str:
        """SHA-256 of the settings that determine results (paths and the node-count wait excluded)."""
        d = asdict(self)
        for k in ("data_dir", "keys_dir", "out_dir", "min_nodes", "charter") + (() if self.ddp else DDP_ONLY):
            d.pop(k)     # a run of another mode keeps the digest it had before ddp+he existed
        if not self.masked:
            d.pop("masks"), d.pop("mask_neighbours")   # unmasked runs keep the digest they had before masks existed
        if d["log_bound"] == LOG_BOUND:
            d.pop("log_bound")   # the range every run had before it was a setting: those runs keep their digest
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def flower_app_toml(cfg: RunConfig) -> dict:
    """The ``[tool.flwr.app]`` table (as a TOML document) of a Flower app whose run-config defaults are ``cfg``."""
    return {"tool": {"flwr": {"app": {"publisher": "carbonfed", "components": dict(APP_COMPONENTS),
                                      "config": cfg.to_flower()}}}}

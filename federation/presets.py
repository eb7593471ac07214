"""The recommended settings of each data set: what a run uses for a setting left at "auto".

As in scikit-learn, the recommended setting is the default: ``carbonfed run`` with no option runs
the seed data's main job, and ``--dataset owid`` or ``--data FILE.csv`` (``csv``) their own.

The privacy mode is part of a preset. The seed data and a user's CSV recommend ``dp+he`` (local
DP: every upload is ε-DP on its own). OWID recommends ``ddp+he`` with masks: its parties hold 4-27
rows, and local DP noise added to a gradient of a few rows swamps it (0.49 accuracy at ε = 3,
against 0.75 for distributed DP, where the noise is added in shares and only the sum carries it,
bench/RESULTS.md). A ``ddp+he`` upload carries only a share of the noise, so its preset turns the
pairwise masks on (``masks`` "auto": on for ``ddp+he``, off for the local-DP modes): then no key
holder with the server sees one client's update, only coalitions of the masks' threshold or more.

=======  =======  ======  ============  ============  ====  =========  ==================================
preset   mode     hidden  stats-stages  average-last  lr    log-bound  why
=======  =======  ======  ============  ============  ====  =========  ==================================
seed     dp+he    linear  3             10            0.1   10         the main job (bench/RESULTS.md)
owid     ddp+he   linear  2             10            0.1   14         small parties (above); with
                                                                       ``--privacy dp+he`` these values:
                                                                       no asinh stage (its ``c`` lands
                                                                       far above the data)
csv      dp+he    linear  2             10            0.1   10         two stages: the robust choice for
                                                                       a user's unknown, possibly
                                                                       heavy-tailed features
=======  =======  ======  ============  ============  ====  =========  ==================================

``log-bound`` is the range of the signed-log transform (:func:`carbonfed.data.features.transform`):
the log of a public bound of the data set's variables, so that no value saturates. Every seed
value stays below e^10; OWID's energy and GDP per capita (kWh and international-$ per person) reach
3·10^5 (e^12.7): its bound is ln(10^6) ≈ 14 (:data:`carbonfed.data.owid.OWID_LOG_BOUND`, and
``bench/ddp_twin.py``'s validation folds: 12 to 16 score alike, 10 loses 0.03).

Guarantees
----------
* One definition of each preset (:data:`PRESETS`). Every way of starting a run (``carbonfed
  run``, ``deploy local``, ``sweep``, ``flwr run .``, the bench scripts) gets it through
  :class:`~carbonfed.federation.config.RunConfig`, whose preset-governed settings default to
  their "auto" value (:data:`AUTO`) and are resolved in its ``__post_init__``: everything
  downstream (the config digest, ``to_flower()``, ``run.json``, ``server.json``) sees the
  concrete values.
* An explicit value always wins; only a setting at its "auto" value takes the preset's.
* :func:`preset_record` (``report.json``'s ``preset``) names the preset and lists which resolved
  values differ from it.
* ``ddp+he`` runs (distributed DP-FedSGD, issue 19) take their data set's :data:`DDP_PRESETS`
  instead, chosen on validation folds of the training countries by ``bench/ddp_twin.py`` (never on
  the held-out ones): the same four settings plus the ddp-only ones of :data:`DDP_AUTO`, which
  other modes leave at their "auto" value (unused).

=======  ===========  ========  ====  ====  =======  ============  ======  ============
ddp      server-opt   ddp-clip  lr    σ_s   stages   average-last  rounds  from
=======  ===========  ========  ====  ====  =======  ============  ======  ============
seed     adam         2         0.1   20    3        5             50      ddp_twin docstring
owid     momentum     2         3     10    2        5             50      ddp_twin docstring
csv      momentum     2         3     10    2        5             50      as owid (unknown features)
=======  ===========  ========  ====  ====  =======  ============  ======  ============

``rounds`` is part of every preset (30 for the local-DP presets, the main job's): a ``ddp+he`` round
is one clipped gradient sum, so its presets choose their own number, the fewest that keep the
validation accuracy, which also keeps a ddp+he run near 2× the main job's wall time. Seed, with the
weight decay below, validation folds 0–4 × 32 draws (``bench/eps1_probe.py``), accuracy / macro-F1:
ε = 3: 70 rounds 0.9487 / 0.7626, 60 0.9482 / 0.7594, 50 0.9476 / 0.7636 (40: 0.9455 / 0.7492 on 16
draws); ε = 1: 0.9432 / 0.7337, 0.9432 / 0.7323, 0.9426 / 0.7294. OWID: 50 rounds at lr 3 0.7456
against 100 at lr 2 0.7391.

``ddp-lr-z`` (every ddp preset: 1.27; it acts only with Adam) caps the key holders' step where the
noise dominates: lr = min(lr, ddp-lr-z / z), z the rounds' central noise multiplier. Adam divides
a noise-dominated coordinate by the noise level, so it moves like SGD with a step of lr/σ and its
spread grows with √(lr·z): holding lr·z at the ε = 3 seed preset's value when it was chosen (0.1 ×
12.64 = 1.27, 70 rounds) keeps that spread where it was validated. Over the preset's 50 rounds the
cap leaves lr at 0.1 at ε = 3 (z 10.69) and gives 0.042 at ε = 1 (z 30.56). Chosen over 70 rounds
(lr 0.035 at ε = 1, z 36.15) on validation folds of the training countries (``bench/eps1_probe.py``):
stray predictions of the rare classes fell from 8 to 4 of 32 and macro-F1 rose from 0.712 to 0.727
(bench/RESULTS.md, "Session 14").

``ddp-weight-decay`` (seed: 0.1; OWID, CSV: 0, their momentum presets were not validated with it) pulls
the weights back toward the public start each round (decoupled, AdamW-style: w -= lr·decay·(w - w0),
post-processing). A weight that only noise moves then reverts instead of wandering, so the rare classes
are predicted less often where they do not occur. Seed, ε = 3, validation folds 0–4 × 16 draws
(``bench/eps1_probe.py``): runs that predicted a class their fold lacks 5 → 1 of 48, macro-F1 0.7536 →
0.7686, accuracy 0.9471 → 0.9493; flat from 0.1 to 0.5; at ε = 1 neutral (0.7324 → 0.7355, 7 → 5 of 48).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from carbonfed.data.features import LOG_BOUND
from carbonfed.data.owid import OWID_LOG_BOUND


@dataclass(frozen=True)
class Preset:
    """The recommended values of the preset-governed settings of one data set."""

    hidden: str
    stats_stages: int
    average_last: int
    lr: float
    log_bound: float = LOG_BOUND
    rounds: int = 30
    privacy: str = "dp+he"
    masks: bool = False


PRESETS: dict[str, Preset] = {
    "seed": Preset(hidden="linear", stats_stages=3, average_last=10, lr=0.1),
    "owid": Preset(hidden="linear", stats_stages=2, average_last=10, lr=0.1, log_bound=OWID_LOG_BOUND,
                   privacy="ddp+he"),
    "csv": Preset(hidden="linear", stats_stages=2, average_last=10, lr=0.1),
}

# The "auto" value of each preset-governed RunConfig setting: "the data set's preset".
AUTO: dict[str, object] = {"hidden": "auto", "stats_stages": 0, "average_last": 0, "lr": 0.0, "log_bound": 0.0,
                           "rounds": 0, "privacy": "auto", "masks": "auto"}
_TEXT = ("hidden", "server_opt", "privacy", "masks")     # settings whose "auto" is the word


@dataclass(frozen=True)
class DDPPreset(Preset):
    """A ``ddp+he`` preset: the four settings of :class:`Preset` and the ddp-only ones (:data:`DDP_AUTO`)."""

    privacy: str = "ddp+he"
    masks: bool = True
    server_opt: str = "adam"
    ddp_clip: float = 2.0
    ddp_stats_sigma: float = 20.0
    ddp_lr_z: float = 1.27
    ddp_weight_decay: float = 0.0


DDP_PRESETS: dict[str, DDPPreset] = {
    "seed": DDPPreset(hidden="linear", stats_stages=3, average_last=5, lr=0.1, rounds=50, server_opt="adam",
                      ddp_clip=2.0, ddp_stats_sigma=20.0, ddp_weight_decay=0.1),
    "owid": DDPPreset(hidden="linear", stats_stages=2, average_last=5, lr=3.0, log_bound=OWID_LOG_BOUND, rounds=50,
                      server_opt="momentum", ddp_clip=2.0, ddp_stats_sigma=10.0),
    "csv": DDPPreset(hidden="linear", stats_stages=2, average_last=5, lr=3.0, rounds=50, server_opt="momentum",
                     ddp_clip=2.0, ddp_stats_sigma=10.0),
}

# The "auto" value of each setting only ``ddp+he`` runs use (resolved from :data:`DDP_PRESETS`).
DDP_AUTO: dict[str, object] = {"server_opt": "auto", "ddp_clip": 0.0, "ddp_stats_sigma": 0.0, "ddp_lr_z": 0.0,
                               "ddp_weight_decay": -1.0}


def is_auto(name: str, value) -> bool:
    """Whether ``value`` of setting ``name`` means "the data set's preset"."""
    if name in _TEXT:
        return isinstance(value, str) and value.strip().lower() == {**AUTO, **DDP_AUTO}[name]
    return value == {**AUTO, **DDP_AUTO}[name]


def effective(dataset: str, privacy: str) -> Preset:
    """The preset a run of ``dataset`` in mode ``privacy`` follows: :data:`DDP_PRESETS` for
    ``ddp+he``, else :data:`PRESETS`."""
    return (DDP_PRESETS if privacy == "ddp+he" else PRESETS)[dataset]


def resolve(dataset: str, values: dict) -> dict:
    """The preset values of ``dataset`` for those of ``values`` (setting → value, the settings of
    :data:`AUTO` and :data:`DDP_AUTO`) that are at their "auto" value. The privacy mode first (the
    data set's recommended one), then the rest from the preset of that mode (:func:`effective`;
    the ddp-only settings only for ``ddp+he``). Raises ``ValueError`` for an unknown data set."""
    if dataset not in PRESETS:
        raise ValueError(f"dataset must be one of {tuple(PRESETS)}, got {dataset!r}")
    chosen = {"privacy": PRESETS[dataset].privacy} if is_auto("privacy", values["privacy"]) else {}
    privacy = chosen.get("privacy", values["privacy"])
    preset = asdict(effective(dataset, privacy))
    names = [n for n in AUTO if n != "privacy"] + (list(DDP_AUTO) if privacy == "ddp+he" else [])
    return chosen | {name: preset[name] for name in names if is_auto(name, values[name])}


def preset_help(name: str) -> str | None:
    """The ``--help`` text of a preset-governed setting's default (None for other settings)."""
    if name in DDP_AUTO:
        per_set = "; ".join(f"{ds}: {getattr(p, name)}" for ds, p in DDP_PRESETS.items())
        return f"default: the data set's ddp preset ({per_set}); {DDP_AUTO[name]!r} asks for it"
    if name not in AUTO:
        return None
    per_set = "; ".join(f"{ds}: {getattr(p, name)}" for ds, p in PRESETS.items())
    if name == "privacy":
        return f"default: the data set's recommended mode ({per_set}); 'auto' asks for it"
    if name == "masks":
        return "default: on for ddp+he, off for the local-DP modes (each upload is already ε-DP)"
    ddp = "; ".join(f"{ds}: {getattr(p, name)}" for ds, p in DDP_PRESETS.items())
    return f"default: the data set's preset ({per_set}), with ddp+he ({ddp}); {AUTO[name]!r} asks for it"


def preset_record(dataset: str, values: dict) -> dict:
    """What ``report.json`` records: the preset's name and the values of the preset the run's mode
    follows (:func:`effective`, with the data set's recommended mode), the run's resolved values of
    the same settings (``values``: setting → value, at least those of :data:`AUTO`, and
    :data:`DDP_AUTO` for ``ddp+he``), and which of them an explicit option changed (``overridden``)."""
    if dataset not in PRESETS:
        return {"name": dataset, "preset": {}, "used": {n: values[n] for n in AUTO}, "overridden": []}
    names = list(AUTO) + (list(DDP_AUTO) if values["privacy"] == "ddp+he" else [])
    preset = asdict(effective(dataset, values["privacy"])) | {"privacy": PRESETS[dataset].privacy}
    preset = {n: preset[n] for n in names}
    used = {name: values[name] for name in names}
    return {"name": dataset, "preset": preset, "used": used,
            "overridden": [name for name in names if used[name] != preset[name]]}

"""The recommended settings of each data set: what a run uses for a setting left at "auto".

As in scikit-learn, the recommended setting is the default: ``carbonfed run`` with no option runs
the seed data's main job, and ``--dataset owid`` or ``--data FILE.csv`` (``csv``) their own.

=======  ======  ============  ============  ====  ===============================================
preset   hidden  stats-stages  average-last  lr    why
=======  ======  ============  ============  ====  ===============================================
seed     linear  3             10            0.1   the main job (bench/RESULTS.md)
owid     linear  2             10            0.1   the asinh stage (3) fails on OWID: its ``c``
                                                   lands far above the data
csv      linear  2             10            0.1   two stages: the robust choice for a user's
                                                   unknown, possibly heavy-tailed features
=======  ======  ============  ============  ====  ===============================================

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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preset:
    """The recommended values of the preset-governed settings of one data set."""

    hidden: str
    stats_stages: int
    average_last: int
    lr: float


PRESETS: dict[str, Preset] = {
    "seed": Preset(hidden="linear", stats_stages=3, average_last=10, lr=0.1),
    "owid": Preset(hidden="linear", stats_stages=2, average_last=10, lr=0.1),
    "csv": Preset(hidden="linear", stats_stages=2, average_last=10, lr=0.1),
}

# The "auto" value of each preset-governed RunConfig setting: "the data set's preset".
AUTO: dict[str, object] = {"hidden": "auto", "stats_stages": 0, "average_last": 0, "lr": 0.0}


def is_auto(name: str, value) -> bool:
    """Whether ``value`` of setting ``name`` means "the data set's preset"."""
    if name == "hidden":
        return str(value).strip().lower() == AUTO["hidden"]
    return value == AUTO[name]


def resolve(dataset: str, values: dict) -> dict:
    """The preset values of ``dataset`` for those of ``values`` (setting → value, the settings of
    :data:`AUTO`) that are at their "auto" value; raises ``ValueError`` for an unknown data set."""
    if dataset not in PRESETS:
        raise ValueError(f"dataset must be one of {tuple(PRESETS)}, got {dataset!r}")
    preset = asdict(PRESETS[dataset])
    return {name: preset[name] for name in AUTO if is_auto(name, values[name])}


def preset_help(name: str) -> str | None:
    """The ``--help`` text of a preset-governed setting's default (None for other settings)."""
    if name not in AUTO:
        return None
    per_set = "; ".join(f"{ds}: {getattr(p, name)}" for ds, p in PRESETS.items())
    return f"default: the data set's preset ({per_set}); {AUTO[name]!r} asks for it"


def preset_record(dataset: str, values: dict) -> dict:
    """What ``report.json`` records: the preset's name and values, the run's resolved values of
    the same settings, and which of them an explicit option changed (``overridden``)."""
    preset = asdict(PRESETS[dataset]) if dataset in PRESETS else {}
    used = {name: values[name] for name in AUTO}
    return {"name": dataset, "preset": preset, "used": used,
            "overridden": [name for name in AUTO if preset and used[name] != preset[name]]}

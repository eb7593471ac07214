"""What a sweep runs: its jobs, their run settings and the sweep's command-line options.

Light on purpose (no Flower, no torch): the ``carbonfed`` parser can build the ``sweep`` options
without importing the simulation. Running the plan is :mod:`carbonfed.federation.experiments.sweep`.

Guarantees
----------
* :func:`plan` lists the centralized job of every seed first, then, ε in the order given, every
  finite ε with the DP mode of each requested mode (:data:`DP_OF`) and ε = inf with their non-DP
  counterparts (:data:`PLAIN_OF`), each mode once per (ε, seed) however many requested modes map to it.
* A job's :attr:`Job.name` (``<mode>-eps<E>-seed<S>``) is unique within a plan and names its run dir.
* :func:`run_config` changes nothing of the base RunConfig but the privacy mode, the seed, the
  output dir, the key dir (HE modes only) and, for a finite ε, ε.
* The parsers accept comma-separated text or an iterable, drop duplicates in order, and raise
  :class:`ValueError` on an empty list, a non-positive or NaN ε, or an unknown mode.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace
from pathlib import Path

from carbonfed.data import DATASET_NAMES
from carbonfed.federation.config import RunConfig
from carbonfed.federation.run_data import CSV
from carbonfed.federation.presets import AUTO, DDP_AUTO, resolve

CSV_COLUMNS = ["mode", "epsilon", "seed", "accuracy", "macro_f1", "epsilon_max", "seconds"]
CENTRALIZED = "centralized"
DP_OF = {"none": "dp", "dp": "dp", "he": "dp+he", "dp+he": "dp+he", "ddp+he": "ddp+he"}
ENCRYPTED = ("he", "dp+he", "ddp+he")     # the modes whose runs need HE keys
PLAIN_OF = {"none": "none", "dp": "none", "he": "he", "dp+he": "he", "ddp+he": "he"}
INF = float("inf")
# settings the sweep sets per run, or takes under its own options
# (a CSV's classes are read from the file; a charter is sealed by `carbonfed run` and `deploy`, not here)
SWEEP_OWN = ("dataset", "data_dir", "privacy", "epsilon", "seed", "rounds", "keys_dir", "out_dir", "state_dir",
             "classes", "charter")


@dataclass(frozen=True)
class Job:
    mode: str          # a privacy mode or "centralized"
    epsilon: float     # inf for non-DP modes and centralized
    seed: int

    @property
    def name(self) -> str:
        return f"{self.mode}-eps{format_eps(self.epsilon)}-seed{self.seed}"


def format_eps(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def _parse_list(text, convert, what: str) -> list:
    """Comma-separated (or iterable) values, converted, de-duplicated in order; at least one."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        s = str(item).strip().lower()
        if s and (v := convert(s, item)) not in out:
            out.append(v)
    if not out:
        raise ValueError(f"no {what} given")
    return out


def _epsilon(s: str, item) -> float:
    eps = INF if s in ("inf", "infinity", "∞") else float(s)
    if math.isnan(eps) or eps <= 0:
        raise ValueError(f"epsilons must be positive numbers or inf, got {item!r}")
    return eps


def parse_epsilons(text) -> list[float]:
    return _parse_list(text, _epsilon, "epsilons")


def parse_ints(text) -> list[int]:
    return _parse_list(text, lambda s, _: int(s), "seeds")


def parse_modes(text) -> list[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    modes = [str(m).strip() for m in items if str(m).strip()]
    bad = [m for m in modes if m not in DP_OF]         # the modes a sweep knows how to pair (DP_OF, PLAIN_OF)
    if bad or not modes:
        raise ValueError(f"modes must be among {tuple(DP_OF)}, got {bad or modes}")
    return modes


def plan(epsilons, seeds, modes) -> list[Job]:
    """Centralized first (cheap), then the federated runs, ε in the order given."""
    jobs = [Job(CENTRALIZED, INF, s) for s in seeds]
    for eps in epsilons:
        table = PLAIN_OF if math.isinf(eps) else DP_OF
        for mode in dict.fromkeys(table[m] for m in modes):
            jobs += [Job(mode, eps, s) for s in seeds]
    return jobs


def _preset_settings_reset(base: RunConfig) -> dict:
    """The preset-governed settings of ``base`` that hold its own preset's value, set back to
    "auto": a ``ddp+he`` job of a sweep then takes the ddp preset, a ``dp+he`` job the local one
    (:mod:`carbonfed.federation.presets`); a value the user gave that differs from it stays."""
    auto = {name: value for name, value in {**AUTO, **DDP_AUTO}.items() if name != "privacy"}   # each job's own
    preset = resolve(base.dataset, {**auto, "privacy": base.privacy})
    return {name: value for name, value in auto.items() if name in preset and getattr(base, name) == preset[name]}


def run_config(job: Job, base: RunConfig, out: Path, keys: Path | None) -> RunConfig:
    """The RunConfig of a federated job (RunConfig defaults apart from mode, ε, seed, rounds, data)."""
    privacy = "none" if job.mode == CENTRALIZED else job.mode    # centralized reads only the training settings
    cfg = replace(base, privacy=privacy, seed=job.seed, out_dir=str(out / "runs" / job.name),
                  keys_dir=str(keys) if job.mode in ENCRYPTED else "", **_preset_settings_reset(base))
    if not math.isinf(job.epsilon):
        cfg = replace(cfg, epsilon=job.epsilon)
    return cfg


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``carbonfed sweep`` options (every ``carbonfed run`` setting the sweep does not set itself)."""
    p.add_argument("--epsilons", required=True, help="comma-separated ε values; inf = no DP (e.g. inf,8,3,1; required)")
    p.add_argument("--seeds", required=True, help="comma-separated seeds (e.g. 0,1,2; required)")
    p.add_argument("--out", required=True, help="sweep folder (runs/, keys/, sweep.csv, tradeoff.png/.md; required)")
    p.add_argument("--modes", default="dp+he", help=f"comma-separated, among {tuple(DP_OF)} (default dp+he)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per run (default: each job's preset, e.g. 30 for dp+he and 50 for ddp+he on the seed data)")
    p.add_argument("--dataset", choices=(*DATASET_NAMES, CSV), default=None,
                   help=f"the data set (default {RunConfig.dataset}; {CSV} with --data FILE.csv)")
    p.add_argument("--data-dir", default=None, help="folder with the bundled data sets' CSV files "
                                                    "(default $CARBONFED_DATA_DIR, else ../shared/data)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress display (default: bars on a terminal, else one line per run on stderr)")
    RunConfig.add_options(p, skip=SWEEP_OWN)
    return p

"""The privacy/utility trade-off: a sweep over ε and seeds, with a centralized ceiling.

    carbonfed sweep --epsilons inf,8,3,1 --seeds 0,1,2 --out DIR [--modes dp+he] [--rounds R]
                    [--dataset seed|owid] [--data-dir D] [--hidden linear --lr 0.4 ...]
    python -m carbonfed.federation.experiments.sweep ...   (same options)

What it runs, for every seed:

* every finite ε: the DP mode of each ``--modes`` entry (``he`` → ``dp+he``, ``none`` → ``dp``);
* ε = inf: the non-DP counterpart of each mode (``dp+he`` → ``he``, ``dp`` → ``none``; deduplicated),
  i.e. plaintext-equivalent FedAvg (``he`` gives exactly the model ``none`` gives);
* every other ``carbonfed run`` setting given (``--hidden``, ``--lr``, ...) applies to every run;
* ``centralized`` (ε = inf): the same model trained on the *pooled* rows of the training countries,
  standardised with their exact pooled mean/std, no privacy: an upper reference, not a
  federated result (see :func:`train_centralized`).

Guarantees
----------
* Each run lives in ``DIR/runs/<mode>-eps<E>-seed<S>/``. ``report.json`` is written last, so a run
  dir with a ``report.json`` is finished and is skipped on a rerun (an interrupted sweep keeps its
  finished runs); a run dir without one is half-finished and is deleted and run again.
* A finished run whose config hash differs from what this sweep would run (say, other
  ``--rounds`` into the same DIR) is an error, never silently mixed into the figures.
* HE modes use one fresh key pair per sweep directory, ``DIR/keys`` (``carbonfed.privacy.he.keygen``, mode
  0600); a rerun of the same sweep reuses it.
* Outputs: ``DIR/sweep.csv`` (one row per mode, ε, seed), ``DIR/tradeoff.png`` and
  ``DIR/tradeoff.md`` (table + provenance: each run's config hash, the data's SHA-256).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from carbonfed.federation.config import PRIVACY_MODES, RunConfig

CSV_COLUMNS = ["mode", "epsilon", "seed", "accuracy", "macro_f1", "epsilon_max", "seconds"]
CENTRALIZED = "centralized"
DP_OF = {"none": "dp", "dp": "dp", "he": "dp+he", "dp+he": "dp+he"}
PLAIN_OF = {"none": "none", "dp": "none", "he": "he", "dp+he": "he"}
INF = float("inf")


# ---- the plan -------------------------------------------------------------------------------
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
    bad = [m for m in modes if m not in PRIVACY_MODES]
    if bad or not modes:
        raise ValueError(f"modes must be among {PRIVACY_MODES}, got {bad or modes}")
    return modes


def plan(epsilons, seeds, modes) -> list[Job]:
    """Centralized first (cheap), then the federated runs, ε in the order given."""
    jobs = [Job(CENTRALIZED, INF, s) for s in seeds]
    for eps in epsilons:
        table = PLAIN_OF if math.isinf(eps) else DP_OF
        for mode in dict.fromkeys(table[m] for m in modes):
            jobs += [Job(mode, eps, s) for s in seeds]
    return jobs


def run_config(job: Job, base: RunConfig, out: Path, keys: Path | None) -> RunConfig:
    """The RunConfig of a federated job (RunConfig defaults apart from mode, ε, seed, rounds, data)."""
    privacy = "none" if job.mode == CENTRALIZED else job.mode    # centralized reads only the training settings
    cfg = replace(base, privacy=privacy, seed=job.seed, out_dir=str(out / "runs" / job.name),
                  keys_dir=str(keys) if job.mode in ("he", "dp+he") else "")
    if not math.isinf(job.epsilon):
        cfg = replace(cfg, epsilon=job.epsilon)
    return cfg


# ---- centralized ceiling --------------------------------------------------------------------
def centralized_settings(cfg: RunConfig) -> dict:
    """Everything that determines the centralized result (its config hash is over this)."""
    from carbonfed.data.features import STD_FLOOR

    return {"trainer": CENTRALIZED, "dataset": cfg.dataset, "holdout_offset": cfg.holdout_offset,
            "seed": cfg.seed, "hidden": cfg.hidden, "lr": cfg.lr, "momentum": cfg.momentum,
            "epochs": cfg.rounds * cfg.local_epochs, "batches_per_epoch": cfg.batches_per_epoch,
            "class_weight_power": cfg.class_weight_power, "std_floor": STD_FLOOR,
            "standardization": "exact pooled mean/std of carbonfed.data.features.transform(x) over training rows"
                               + (", then of asinh(x / c), c from them (Standardizer.exact)" if cfg.stats_stages == 3 else "")}


def train_centralized(cfg: RunConfig) -> dict:
    """Non-private, non-federated reference: one model on the pooled training countries' rows.

    Same model (``cfg.hidden``: the MLP or, with ``linear``, logistic regression; initialised from ``cfg.seed``), same optimiser (SGD, ``cfg.lr``,
    ``cfg.momentum``) and the clients' training loop (:func:`carbonfed.privacy.dp_sgd.train_local` with DP off:
    Poisson batches at the rate ``1 / batches_per_epoch``) for ``rounds × local_epochs`` epochs.
    Features: ``(transform(x) - mean) / std`` with the exact pooled mean/std of the training rows
    (std floored as the federated scaler floors it); with ``stats-stages = 3``, the asinh features
    of that setting instead, from exact pooled statistics (:meth:`Standardizer.exact`). Scored on the held-out countries' pooled rows,
    i.e. the same confusion matrix the federation sums.
    """
    import numpy as np
    import torch

    from carbonfed.data import load_dataset, split_countries
    from carbonfed.data.features import Standardizer
    from carbonfed.federation.report.build import scores
    from carbonfed.models.mlp import build_model
    from carbonfed.privacy.dp_sgd import TrainSettings, train_local
    from carbonfed.privacy.randomness import NoiseSource

    t0 = time.time()
    ds = load_dataset(cfg.dataset, cfg.data_dir or None)
    part = split_countries(ds.countries(), cfg.holdout_offset)
    x, y = ds.all_arrays(part.train)
    scaler = Standardizer.exact(x, y, len(ds.classes), asinh=cfg.stats_stages == 3)
    model = build_model(len(ds.features), len(ds.classes), cfg.hidden_sizes, cfg.seed, class_counts=scaler.class_counts)
    settings = TrainSettings(lr=cfg.lr, momentum=cfg.momentum, local_epochs=cfg.rounds * cfg.local_epochs,
                             batches_per_epoch=cfg.batches_per_epoch, max_grad_norm=cfg.max_grad_norm)
    settings = settings.with_class_weights(tuple(scaler.class_weights(cfg.class_weight_power)))
    outcome = train_local(model, scaler.apply(x), y, settings, NoiseSource.derived(cfg.seed, "centralized"))
    x_test, y_test = ds.all_arrays(part.test)
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(scaler.apply(x_test))).argmax(1).numpy()
    k = len(ds.classes)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_test, pred), 1)
    return {"metrics": scores(cm), "confusion_matrix": cm.tolist(), "model": model, "scaler": scaler,
            "steps": outcome.steps, "train_rows": int(len(y)), "test_rows": int(len(y_test)),
            "clients": {"train": len(part.train), "test": len(part.test)}, "dataset": ds,
            "seconds": time.time() - t0}


def run_centralized(cfg: RunConfig, run_dir: Path) -> dict:
    """Train the centralized reference and write its ``report.json`` (last) in ``run_dir``."""
    import torch

    from carbonfed.data import sha256_file

    run_dir.mkdir(parents=True, exist_ok=True)
    res = train_centralized(cfg)
    ds, scaler = res["dataset"], res["scaler"]
    torch.save({"state_dict": res["model"].state_dict(), "features": list(ds.features), "classes": list(ds.classes),
                "hidden": list(cfg.hidden_sizes), "scaler": scaler.to_dict()}, run_dir / "model.pt")
    settings = centralized_settings(cfg)
    report = {
        "dataset": cfg.dataset, "privacy_mode": CENTRALIZED, "rounds": cfg.rounds, "seed": cfg.seed,
        "holdout_offset": cfg.holdout_offset, "clients": res["clients"],
        "metrics": res["metrics"], "confusion_matrix": res["confusion_matrix"],
        "privacy": None, "he": None,
        "timing": {"total_s": res["seconds"]},
        "training": {"steps": res["steps"], "train_rows": res["train_rows"], "test_rows": res["test_rows"]},
        "model": {"path": str(run_dir / "model.pt"), "samples": res["train_rows"]},
        "provenance": {"config_sha256": settings_digest(settings), "config": settings,
                       "data": {**ds.source, "sha256": ds.source.get("sha256") or sha256_file(ds.source["path"])}},
    }
    _write_json_atomic(run_dir / "report.json", report)
    return report


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


# ---- the sweep ------------------------------------------------------------------------------
def expected_digest(job: Job, cfg: RunConfig) -> str:
    return settings_digest(centralized_settings(cfg)) if job.mode == CENTRALIZED else cfg.digest()


def _row(job: Job, report: dict) -> dict:
    p = report.get("privacy") or {}
    eps_max = p.get("epsilon_max")
    return {"mode": job.mode, "epsilon": job.epsilon, "seed": job.seed,
            "accuracy": report["metrics"]["accuracy"], "macro_f1": report["metrics"]["macro_f1"],
            "epsilon_max": float(eps_max) if eps_max is not None else float("nan"),
            "seconds": report["timing"]["total_s"]}


def _progress_display(enabled: bool):
    """(rich progress bars on a terminal, log) — ``log(text)`` prints a plain line on stderr when
    the progress display is on but stderr is not a terminal (logs, CI), and does nothing otherwise."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    live = enabled and console.is_terminal

    def log(text: str) -> None:
        if enabled and not live:
            print(text, file=sys.stderr, flush=True)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"), console=console, disable=not live), log


def run_sweep(epsilons, seeds, out, modes=("dp+he",), rounds=None, dataset="seed", data_dir=None,
              progress=True, settings=None):
    """Run (or resume) the sweep into ``out``; returns the table written to ``out/sweep.csv``.

    ``settings``: other RunConfig settings for every run (``{"hidden": "linear", "lr": 0.4}``).
    The returned DataFrame has ``attrs["ran"]`` and ``attrs["skipped"]``: the run names executed
    now and those found finished.
    """
    import pandas as pd

    from carbonfed.data import resolve_data_dir
    from carbonfed.federation.report.build import build_report
    from carbonfed.federation.simulation import run_simulation
    from carbonfed.privacy.he import PUBLIC_CONTEXT_FILE, SECRET_CONTEXT_FILE, keygen

    epsilons, seeds, modes = parse_epsilons(epsilons), parse_ints(seeds), parse_modes(modes)
    out = Path(out).resolve()
    base = RunConfig(dataset=dataset, data_dir=str(resolve_data_dir(data_dir)), **(settings or {}))
    if rounds is not None:
        base = replace(base, rounds=int(rounds))
    jobs = plan(epsilons, seeds, modes)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    keys = None
    if any(j.mode in ("he", "dp+he") for j in jobs):
        keys = out / "keys"
        if not ((keys / SECRET_CONTEXT_FILE).is_file() and (keys / PUBLIC_CONTEXT_FILE).is_file()):
            keygen(keys)

    rows, ran, skipped = [], [], []
    display, log = _progress_display(progress)
    with display:
        overall = display.add_task("sweep", total=len(jobs), info="")
        rounds_task = display.add_task("round", total=base.rounds, info="", visible=False)
        for job in jobs:
            cfg = run_config(job, base, out, keys)
            run_dir = out / "runs" / job.name
            report_path = run_dir / "report.json"
            if report_path.is_file():
                report = json.loads(report_path.read_text())
                found = report.get("provenance", {}).get("config_sha256")
                if found != expected_digest(job, cfg):
                    raise ValueError(f"{run_dir} holds a finished run with other settings (config hash {found}); "
                                     "use another --out or remove it")
                skipped.append(job.name)
                display.update(overall, advance=1, info=f"{job.name}: done earlier, skipped")
                log(f"sweep {len(rows) + 1}/{len(jobs)}: {job.name}: done earlier, skipped")
                rows.append(_row(job, report))
                continue
            if run_dir.exists():          # half-finished (interrupted or failed): start it afresh
                shutil.rmtree(run_dir)
            display.update(overall, info=f"{job.name} …")
            if job.mode == CENTRALIZED:
                report = run_centralized(cfg, run_dir)
            else:
                display.reset(rounds_task, total=cfg.rounds, visible=True, info="setup: statistics release")

                def on_round(s: dict, _task=rounds_task) -> None:
                    eps = f"ε_max={s['epsilon_max']:.3f}" if s.get("epsilon_max") is not None else "no DP"
                    display.update(_task, advance=1, info=f"{s['accepted']} accepted, {s['rejected']} rejected, "
                                                          f"{eps}, {s['seconds']:.1f}s")
                run_simulation(cfg, on_round=on_round)
                report = build_report(run_dir, keys)   # writes report.json last
                display.update(rounds_task, visible=False)
            ran.append(job.name)
            rows.append(_row(job, report))
            m = report["metrics"]
            display.update(overall, advance=1, info=f"{job.name}: acc {m['accuracy']:.3f}, F1 {m['macro_f1']:.3f}")
            log(f"sweep {len(rows)}/{len(jobs)}: {job.name}: accuracy {m['accuracy']:.4f}, "
                f"macro-F1 {m['macro_f1']:.4f}, {report['timing']['total_s']:.1f}s")

    df = pd.DataFrame(rows, columns=CSV_COLUMNS)
    df.to_csv(out / "sweep.csv", index=False)
    plot_tradeoff(df, out / "tradeoff.png")
    (out / "tradeoff.md").write_text(tradeoff_markdown(df, out, jobs, dict(
        epsilons=epsilons, seeds=seeds, modes=modes, rounds=base.rounds, dataset=dataset,
        model=base.hidden, overrides=dict(settings or {}))))
    df.attrs.update(ran=ran, skipped=skipped)
    return df


# ---- outputs --------------------------------------------------------------------------------
def summary(df):
    """Per (mode, ε): n, mean/std/min/max of accuracy and macro-F1, worst ε_max, mean seconds."""
    g = df.groupby(["mode", "epsilon"], sort=False)
    s = g.agg(n=("seed", "count"),
              acc_mean=("accuracy", "mean"), acc_std=("accuracy", "std"),
              acc_min=("accuracy", "min"), acc_max=("accuracy", "max"),
              f1_mean=("macro_f1", "mean"), f1_std=("macro_f1", "std"),
              f1_min=("macro_f1", "min"), f1_max=("macro_f1", "max"),
              epsilon_max=("epsilon_max", "max"), seconds=("seconds", "mean")).reset_index()
    # Centralized first, then by ε from ∞ down.
    s["_c"] = (s["mode"] != CENTRALIZED).astype(int)
    return s.sort_values(["_c", "epsilon", "mode"], ascending=[True, False, True], kind="stable").drop(columns="_c")


def _x_positions(epsilons):
    """Categorical x axis: finite ε ascending, then ∞ at the right."""
    finite = sorted(e for e in set(epsilons) if not math.isinf(e))
    order = finite + ([INF] if any(math.isinf(e) for e in epsilons) else [])
    return {e: i for i, e in enumerate(order)}, [format_eps(e).replace("inf", "∞") for e in order]


def plot_tradeoff(df, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary(df)
    fed = s[s["mode"] != CENTRALIZED]
    cent = s[s["mode"] == CENTRALIZED]
    pos, labels = _x_positions(fed["epsilon"].tolist() or [INF])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dp_modes = [m for m in dict.fromkeys(fed["mode"]) if m in ("dp", "dp+he")]
    plain_modes = [m for m in dict.fromkeys(fed["mode"]) if m in ("none", "he")]
    for ax, metric, title in ((axes[0], "acc", "accuracy"), (axes[1], "f1", "macro-F1")):
        for i, mode in enumerate(dp_modes):
            # The family: the DP mode at finite ε, its non-DP counterpart at ε = ∞.
            fam = fed[(fed["mode"] == mode) | ((fed["mode"] == PLAIN_OF[mode]) & fed["epsilon"].map(math.isinf))]
            fam = fam.sort_values("epsilon", key=lambda c: c.map(pos))
            x = fam["epsilon"].map(pos).to_numpy()
            mean = fam[f"{metric}_mean"].to_numpy()
            err = [mean - fam[f"{metric}_min"].to_numpy(), fam[f"{metric}_max"].to_numpy() - mean]
            label = f"{mode} (ε = ∞: {PLAIN_OF[mode]})" if (fam["mode"] != mode).any() else mode
            ax.errorbar(x, mean, yerr=err, fmt="o-", capsize=4, color=colors[i % len(colors)], label=label)
        for j, mode in enumerate(plain_modes):
            row = fed[(fed["mode"] == mode) & fed["epsilon"].map(math.isinf)]
            if len(row):
                y = float(row[f"{metric}_mean"].iloc[0])
                ax.axhline(y, ls="--", lw=1, color="0.35", label=f"plaintext FedAvg, ε = ∞ ({mode}): {y:.3f}")
                if mode not in [PLAIN_OF[m] for m in dp_modes]:   # not already drawn as a family's ∞ point
                    ax.errorbar([pos[INF]], [y], yerr=[[y - float(row[f"{metric}_min"].iloc[0])],
                                                      [float(row[f"{metric}_max"].iloc[0]) - y]],
                                fmt="s", capsize=4, color="0.35")
        if len(cent):
            c = cent.iloc[0]
            ax.axhline(c[f"{metric}_mean"], ls="-", lw=1.5, color="black",
                       label=f"centralized (pooled, no privacy): {c[f'{metric}_mean']:.3f}")
            ax.axhspan(c[f"{metric}_min"], c[f"{metric}_max"], color="black", alpha=0.08, lw=0)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlim(-0.4, len(labels) - 0.6)
        ax.set_xlabel("ε (privacy budget per client, δ = 1e-5)")
        ax.set_ylabel(f"held-out {title}")
        ax.set_title(f"{title} vs ε")
        ax.grid(alpha=0.3)
    n_seeds = df.groupby(["mode", "epsilon"])["seed"].count().max()
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"carbonfed privacy/utility trade-off — mean over {n_seeds} seed(s), bars: min–max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _pm(mean, std, n) -> str:
    if mean != mean:   # NaN
        return "—"
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def tradeoff_markdown(df, out: Path, jobs: list[Job], settings: dict) -> str:
    from importlib.metadata import PackageNotFoundError, version

    s = summary(df)
    lines = ["# Privacy/utility trade-off", "",
             f"Held-out countries' accuracy and macro-F1 (mean ± sample std over seeds {settings['seeds']}); "
             f"{settings['dataset']} data, {settings['rounds']} rounds. ε_max: the largest ε any client spent "
             "(worst over seeds, δ = 1e-5); seconds: mean per run (federated: server-measured run time; "
             "centralized: training wall time). Figure: `tradeoff.png`.", "",
             "| mode | ε | seeds | accuracy | macro-F1 | ε_max | seconds |", "|---|---|---|---|---|---|---|"]
    for _, r in s.iterrows():
        eps_max = "—" if r["epsilon_max"] != r["epsilon_max"] else f"{r['epsilon_max']:.3f}"
        lines.append(f"| {r['mode']} | {format_eps(r['epsilon']).replace('inf', '∞')} | {int(r['n'])} "
                     f"| {_pm(r['acc_mean'], r['acc_std'], r['n'])} | {_pm(r['f1_mean'], r['f1_std'], r['n'])} "
                     f"| {eps_max} | {r['seconds']:.1f} |")
    lines += ["", "`centralized` is a reference ceiling, not a federated result: the same model trained on the "
              "pooled rows of the training countries (exact pooled standardisation, no DP, no encryption). "
              "ε = ∞ federated rows are the non-DP counterparts (`he` gives exactly the model `none` gives).", ""]

    lines += ["## Provenance", ""]
    versions = []
    for pkg in ("torch", "flwr", "opacus", "tenseal"):
        try:
            versions.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    lines.append(f"- sweep: epsilons {[format_eps(e) for e in settings['epsilons']]}, seeds {settings['seeds']}, "
                 f"modes {settings['modes']}, rounds {settings['rounds']}, dataset {settings['dataset']}, "
                 f"hidden layers {settings.get('model', RunConfig.hidden)!r}; other settings "
                 + (", ".join(f"{k}={v!r}" for k, v in sorted(settings.get("overrides", {}).items()) if k != "hidden")
                    or "RunConfig defaults"))
    lines.append(f"- software: {', '.join(versions)}; written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    data_lines, run_lines = set(), []
    for job in jobs:
        rep = json.loads((out / "runs" / job.name / "report.json").read_text())
        prov = rep.get("provenance", {})
        data = prov.get("data", {})
        data_lines.add(f"- data: `{Path(str(data.get('path', '?'))).name}` sha256 `{data.get('sha256', '?')}`")
        run_lines.append(f"| `runs/{job.name}` | `{prov.get('config_sha256', '?')}` |")
    lines += sorted(data_lines)
    lines += ["", "Config hash of each run (`provenance.config_sha256` of its `report.json`; federated runs: "
              "`RunConfig.digest()`, centralized: SHA-256 of its training settings):", "",
              "| run | config_sha256 |", "|---|---|", *run_lines, ""]
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------
# settings the sweep sets per run, or takes under its own options
SWEEP_OWN = ("dataset", "data_dir", "privacy", "epsilon", "seed", "rounds", "keys_dir", "out_dir", "state_dir")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--epsilons", required=True, help="comma-separated ε values; inf = no DP (e.g. inf,8,3,1)")
    p.add_argument("--seeds", required=True, help="comma-separated seeds (e.g. 0,1,2)")
    p.add_argument("--out", required=True, help="sweep folder (runs/, keys/, sweep.csv, tradeoff.png/.md)")
    p.add_argument("--modes", default="dp+he", help=f"comma-separated, among {PRIVACY_MODES} (default dp+he)")
    p.add_argument("--rounds", type=int, default=None, help=f"rounds per run (default {RunConfig.rounds})")
    p.add_argument("--dataset", choices=("seed", "owid"), default="seed")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    RunConfig.add_options(p, skip=SWEEP_OWN)
    return p


def cmd_sweep(args) -> int:
    import logging

    import carbonfed.federation.simulation  # noqa: F401  (flwr sets its logger's level on import; quiet it after)

    logging.getLogger("flwr").setLevel(logging.ERROR)
    t0 = time.time()
    df = run_sweep(args.epsilons, args.seeds, args.out, modes=args.modes, rounds=args.rounds,
                   dataset=args.dataset, data_dir=args.data_dir, progress=not args.no_progress,
                   settings=RunConfig.options_given(args, skip=SWEEP_OWN))
    out = Path(args.out).resolve()
    print(f"{len(df.attrs['ran'])} run(s) done, {len(df.attrs['skipped'])} skipped (finished earlier), "
          f"{(time.time() - t0) / 60:.1f} min")
    print(f"table: {out / 'sweep.csv'}  figure: {out / 'tradeoff.png'}  summary: {out / 'tradeoff.md'}")
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="carbonfed sweep", description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        return cmd_sweep(args)
    except (ValueError, OSError) as exc:
        print(f"carbonfed sweep: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The privacy/utility trade-off: a sweep over ε and seeds, with a centralized ceiling.

    carbonfed sweep --epsilons inf,8,3,1 --seeds 0,1,2 --out DIR [--modes dp+he] [--rounds R]
                    [--dataset seed|owid] [--data-dir D] [--hidden linear --lr 0.4 ...]
    carbonfed sweep ... --data FILE.csv --client-col C --label-col L [--features A,B]   (your own table)
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
* HE modes use one fresh key pair per sweep directory, ``DIR/keys`` (``carbonfed.federation.keys.keygen_for``
  of every HE job: the ring of their largest requirement; mode 0600); a rerun of the same sweep reuses it.
* Outputs: ``DIR/sweep.csv`` (one row per mode, ε, seed), ``DIR/tradeoff.png`` and
  ``DIR/tradeoff.md`` (table + provenance: each run's config hash, the data's SHA-256).
"""
# (The docstring is `carbonfed sweep --help`.) Parts: the plan and the options (sweep_plan.py), the
# centralized ceiling (centralized.py: train_centralized), the outputs (tradeoff.py); this module runs them.

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from carbonfed.data import resolve_data_dir
from carbonfed.federation.cli import Parser
from carbonfed.federation.config import RunConfig
from carbonfed.federation.experiments.centralized import centralized_settings, run_centralized, settings_digest
from carbonfed.federation.experiments.sweep_plan import (CENTRALIZED, CSV_COLUMNS, ENCRYPTED, SWEEP_OWN, Job, add_arguments,
                                                         parse_epsilons, parse_ints, parse_modes, plan, run_config)
from carbonfed.federation.experiments.tradeoff import write_outputs
from carbonfed.federation.keys import keygen_for
from carbonfed.federation.report.build import build_report
from carbonfed.federation.run_data import CSV, with_data_schema
from carbonfed.federation.simulation import run_simulation
from carbonfed.privacy.he import PUBLIC_CONTEXT_FILE, SECRET_CONTEXT_FILE

__all__ = ["add_arguments", "cmd_sweep", "main", "run_sweep", "sweep_base"]


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


def _sweep_keys(out: Path, jobs: list[Job], base: RunConfig) -> Path | None:
    """``out/keys`` when a job needs HE (made once, reused by a rerun), else None; one key pair
    for every HE job, so of the ring of their largest requirement."""
    he_jobs = [j for j in jobs if j.mode in ENCRYPTED]
    if not he_jobs:
        return None
    keys = out / "keys"
    if not ((keys / SECRET_CONTEXT_FILE).is_file() and (keys / PUBLIC_CONTEXT_FILE).is_file()):
        keygen_for([run_config(j, base, out, keys) for j in he_jobs], keys)
    return keys


def _finished_report(job: Job, cfg: RunConfig, run_dir: Path) -> dict | None:
    """The report of a finished run of this job, None if there is none; an error if it ran other settings."""
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        return None
    report = json.loads(report_path.read_text())
    found = report.get("provenance", {}).get("config_sha256")
    if found != expected_digest(job, cfg):
        raise ValueError(f"{run_dir} holds a finished run with other settings (config hash {found}); "
                         "use another --out or remove it")
    return report


def _run_job(job: Job, cfg: RunConfig, run_dir: Path, keys: Path | None, display, rounds_task) -> dict:
    """Run one job afresh (a half-finished run dir is deleted first); returns its report."""
    if run_dir.exists():          # half-finished (interrupted or failed): start it afresh
        shutil.rmtree(run_dir)
    if job.mode == CENTRALIZED:
        return run_centralized(cfg, run_dir)
    display.reset(rounds_task, total=cfg.rounds, visible=True, info="setup: statistics release")

    def on_round(s: dict, _task=rounds_task) -> None:
        eps = f"ε_max={s['epsilon_max']:.3f}" if s.get("epsilon_max") is not None else "no DP"
        display.update(_task, advance=1, info=f"{s['accepted']} accepted, {s['rejected']} rejected, "
                                              f"{eps}, {s['seconds']:.1f}s")
    run_simulation(cfg, on_round=on_round)
    report = build_report(run_dir, keys)   # writes report.json last
    display.update(rounds_task, visible=False)
    return report


def _run_jobs(jobs: list[Job], base: RunConfig, out: Path, keys: Path | None, progress: bool):
    """(table rows, names run now, names found finished), one row per job in plan order."""
    rows, ran, skipped = [], [], []
    display, log = _progress_display(progress)
    with display:
        overall = display.add_task("sweep", total=len(jobs), info="")
        rounds_task = display.add_task("round", total=base.rounds, info="", visible=False)
        for job in jobs:
            cfg = run_config(job, base, out, keys)
            run_dir = out / "runs" / job.name
            report = _finished_report(job, cfg, run_dir)
            if report is not None:
                skipped.append(job.name)
                display.update(overall, advance=1, info=f"{job.name}: done earlier, skipped")
                log(f"sweep {len(rows) + 1}/{len(jobs)}: {job.name}: done earlier, skipped")
                rows.append(_row(job, report))
                continue
            display.update(overall, info=f"{job.name} …")
            report = _run_job(job, cfg, run_dir, keys, display, rounds_task)
            ran.append(job.name)
            rows.append(_row(job, report))
            m = report["metrics"]
            display.update(overall, advance=1, info=f"{job.name}: acc {m['accuracy']:.3f}, F1 {m['macro_f1']:.3f}")
            log(f"sweep {len(rows)}/{len(jobs)}: {job.name}: accuracy {m['accuracy']:.4f}, "
                f"macro-F1 {m['macro_f1']:.4f}, {report['timing']['total_s']:.1f}s")
    return rows, ran, skipped


def sweep_base(dataset: str | None, data_dir=None, rounds=None, settings=None) -> RunConfig:
    """The settings every run of the sweep shares: ``dataset`` (None: ``csv`` when ``settings``
    name a CSV file, ``data``, else the default), ``rounds`` and the other RunConfig ``settings``;
    a CSV is read and checked whole (:func:`carbonfed.federation.run_data.with_data_schema`), so a
    bad table or setting fails before the sweep makes anything (ValueError, one line)."""
    settings = dict(settings or {})
    dataset = dataset or (CSV if settings.get("data") else RunConfig.dataset)
    folder = "" if dataset == CSV else str(resolve_data_dir(data_dir))      # a CSV run reads its file only
    if rounds is not None:
        settings["rounds"] = int(rounds)
    return with_data_schema(RunConfig(dataset=dataset, data_dir=folder, **settings))


def run_sweep(epsilons, seeds, out, modes=("dp+he",), rounds=None, dataset=None, data_dir=None,
              progress=True, settings=None):
    """Run (or resume) the sweep into ``out``; returns the table written to ``out/sweep.csv``.

    ``settings``: other RunConfig settings for every run (``{"hidden": "linear", "lr": 0.4}``).
    The returned DataFrame has ``attrs["ran"]`` and ``attrs["skipped"]``: the run names executed
    now and those found finished.
    """
    import pandas as pd

    epsilons, seeds, modes = parse_epsilons(epsilons), parse_ints(seeds), parse_modes(modes)
    out = Path(out).resolve()
    base = sweep_base(dataset, data_dir, rounds, settings)
    jobs = plan(epsilons, seeds, modes)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    keys = _sweep_keys(out, jobs, base)
    rows, ran, skipped = _run_jobs(jobs, base, out, keys, progress)
    df = pd.DataFrame(rows, columns=CSV_COLUMNS)
    per_job = sorted({run_config(job, base, out, keys).rounds for job in jobs})   # each mode's preset may differ
    shown = per_job[0] if len(per_job) == 1 else "/".join(map(str, per_job))
    write_outputs(df, out, jobs, dict(epsilons=epsilons, seeds=seeds, modes=modes, rounds=shown,
                                      dataset=base.dataset, model=base.hidden, overrides=dict(settings or {})))
    df.attrs.update(ran=ran, skipped=skipped)
    return df


# ---- command line ---------------------------------------------------------------------------
def cmd_sweep(args) -> int:
    """Run the sweep of parsed ``add_arguments`` options; prints where the outputs are."""
    logging.getLogger("flwr").setLevel(logging.ERROR)   # flwr sets its logger's level on import; quiet it after
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
    parser = add_arguments(Parser(prog="carbonfed sweep", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        return cmd_sweep(args)
    except (ValueError, OSError) as exc:
        print(f"carbonfed sweep: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

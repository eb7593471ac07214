"""The run lifecycle that ``carbonfed run``, ``carbonfed run --resume`` and ``carbonfed deploy local`` share.

A run lives in one output folder. Before it starts, the folder is checked (:class:`RunFolder`),
the run's own HE keys are made if it needs keys and was given none, and a ``carbonfed run``
records its config in ``run.json`` (for ``--resume``) and gets a private ``.client-state`` folder
for its simulated clients (:class:`Lifecycle`). Once it has run, while the keys still exist,
:func:`write_results` builds ``report.json`` (decrypting with them), audits the ledger
independently (``verify``) and writes ``report.html`` and ``privacy_statement.md``; then the
run's own keys and its clients' state are deleted. ``carbonfed deploy local`` checks its folder
and writes its results the same way (its keys live and die with the deployment). Under
``flwr run .`` the ServerApp keeps the same folder rules through its checkpoint (a second
submission with the same out-dir resumes), and the key holder runs ``carbonfed report``.

Every command that starts a run parses the same options (:func:`add_run_options`).

Guarantees
----------
* :meth:`RunFolder.check_new` refuses a folder that holds a run (``ledger.jsonl`` or
  ``run.json``), or anything else, and touches nothing in it: a run writes only into a new or
  empty folder; for an unfinished ``carbonfed run`` its message says how to resume it.
* :meth:`Lifecycle.start` validates every setting before it creates anything; the run's own
  keys are made in a private temporary folder (mode 0700) outside the run folder; a failure
  (or a signal) after that removes what it made.
* :meth:`Lifecycle.complete` writes the report, the audit and the pages before it deletes the
  run's own keys and ``.client-state``. A run that fails or is interrupted after its first
  checkpoint keeps both (``run.json`` names the keys), so that :meth:`Lifecycle.resume` can
  continue it; one that stops before it has nothing to resume and leaves nothing
  (:mod:`carbonfed.federation.run_guard`). :func:`run_in_console` ends either with one line on stderr.
* :meth:`Lifecycle.resume` accepts only a folder with ``run.json``, no ``report.json`` and, for an
  HE run, its secret context still in place; it reruns exactly the recorded config, and refuses
  options given with it that differ from that config, naming each.
* :func:`write_results` first checks that an HE run's keys are its own
  (:func:`carbonfed.federation.run_guard.check_results_keys`).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from carbonfed.data import DATASET_NAMES, resolve_data_dir
from carbonfed.federation.config import PRIVACY_MODES, RunConfig
from carbonfed.federation.presets import PRESETS, is_auto, preset_help
from carbonfed.federation.enrolment import charter_sha256, check_sealable, seal_run
from carbonfed.federation.keys import keygen_for
from carbonfed.federation.report.build import build_report
from carbonfed.federation.report.html import write_all
from carbonfed.federation.run_data import CSV, with_data_schema
from carbonfed.federation.run_guard import (check_results_keys, forget, has_checkpoint, rejection_hint,
                                            resume_conflicts, stopped)
from carbonfed.privacy.audit.verify import verify_run
from carbonfed.privacy.he import SECRET_CONTEXT_FILE

RUN_FILE = "run.json"            # the config of a `carbonfed run`, for --resume
CLIENT_STATE = ".client-state"   # the simulated clients' accountant state and replay cache
LEDGER_FILE = "ledger.jsonl"
REPORT_FILE = "report.json"
# settings that the run commands take under their own names (--dataset, --data-dir, --privacy,
# --out, --keys) or set themselves (state-dir; a CSV's classes, read from the file)
OWN_OPTIONS = ("dataset", "data_dir", "privacy", "keys_dir", "out_dir", "state_dir", "classes")


class RunError(ValueError):
    """A run cannot start or resume in this folder; the message says why and what to do."""


# -- the options of a run -------------------------------------------------------------------------

def add_run_options(parser, out_prefix: str = "") -> None:
    """The options of every command that starts a run: ``--dataset``, ``--data-dir``,
    ``--privacy``, ``--out`` (default ``runs/<out_prefix><dataset>-<mode>-<time>``), ``--keys``, and
    one ``--key`` per other :class:`RunConfig` setting (:meth:`RunConfig.add_options`: typed, a
    boolean as a flag). :func:`settings_from` reads them back."""
    defaults = RunConfig()
    parser.add_argument("--dataset", choices=(*DATASET_NAMES, CSV), default=None,
                        help=f"the data set (default {defaults.dataset}; {CSV} with --data FILE.csv)")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the bundled data sets' CSV files (default $CARBONFED_DATA_DIR, else ../shared/data)")
    parser.add_argument("--privacy", choices=PRIVACY_MODES, default=None,
                        help="none, dp (local DP-SGD and DP statistics), he (encrypted sums), dp+he, or ddp+he (distributed "
                             "DP: noise shares summed under HE); " + preset_help("privacy"))
    parser.add_argument("--out", default=None, help=f"output folder (default runs/{out_prefix}<dataset>-<mode>-<time>)")
    parser.add_argument("--keys", default=None,
                        help="folder from `carbonfed keygen` (default: fresh keys in a private temp dir)")
    RunConfig.add_options(parser, skip=OWN_OPTIONS)


def settings_from(args) -> dict:
    """The run's settings parsed by :func:`add_run_options`, as RunConfig keyword arguments:
    dataset, data dir ("" if not given) and privacy mode, and every other setting the user gave."""
    dataset = args.dataset or (CSV if getattr(args, "data", None) else RunConfig.dataset)
    return {"dataset": dataset, "data_dir": args.data_dir or "", "privacy": args.privacy or RunConfig.privacy,
            **RunConfig.options_given(args, skip=OWN_OPTIONS)}


def explicit_settings(args) -> dict:
    """Only the settings of :func:`add_run_options` that the user gave (RunConfig keyword
    arguments, ``--keys`` as keys_dir): what ``--resume`` compares with the recorded run."""
    named = {"dataset": args.dataset, "data_dir": args.data_dir, "privacy": args.privacy, "keys_dir": args.keys}
    return {**{k: v for k, v in named.items() if v is not None}, **RunConfig.options_given(args, skip=OWN_OPTIONS)}


def default_out(out: str | None, settings: dict, prefix: str = "") -> Path:
    """``out``, else ``runs/<prefix><dataset>-<mode>-<time>``."""
    dataset = settings.get("dataset", RunConfig.dataset)
    mode = settings.get("privacy", RunConfig.privacy)
    mode = (PRESETS[dataset].privacy if is_auto("privacy", mode) and dataset in PRESETS else mode).replace("+", "")
    return Path(out or f"runs/{prefix}{dataset}-{mode}-{time.strftime('%Y%m%d-%H%M%S')}")


# -- the folder ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunFolder:
    """The output folder of one run (an absolute path)."""

    path: Path

    @classmethod
    def at(cls, path: str | Path) -> "RunFolder":
        return cls(Path(path).resolve())

    @property
    def finished(self) -> bool:
        return (self.path / REPORT_FILE).exists()

    def check_new(self) -> None:
        """Raise :class:`RunError` if the folder already holds a run, or anything else: a run
        writes only into a new or empty folder, so it overwrites nothing."""
        unfinished = (self.path / RUN_FILE).exists() and not self.finished
        if (self.path / LEDGER_FILE).exists() or unfinished:
            hint = (f"it is unfinished: continue it with `carbonfed run --resume --out {self.path}`, or choose another --out"
                    if unfinished else "choose another --out")
            raise RunError(f"{self.path} already holds a run ({LEDGER_FILE if (self.path / LEDGER_FILE).exists() else RUN_FILE}); {hint}")
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"--out {self.path} is a file, not a folder; choose a new or empty folder")
        found = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
        if found:
            shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
            raise RunError(f"{self.path} is not empty and holds no carbonfed run ({shown}): a run writes report.json, "
                           "report.html and more into its folder, so --out must be a new or empty folder; choose another")

    def record(self, cfg: RunConfig, own_keys: bool) -> None:
        """``run.json``: the config and whether the keys are the run's own (deleted at its end)."""
        (self.path / RUN_FILE).write_text(json.dumps({"config": cfg.to_flower(), "own_keys": own_keys}, indent=1))

    def recorded(self) -> tuple[RunConfig, bool]:
        """The config and own-keys flag of an unfinished ``carbonfed run`` in this folder."""
        if not (self.path / RUN_FILE).exists():
            raise RunError(f"{self.path / RUN_FILE} not found: {self.path} holds no run started by `carbonfed run`")
        if self.finished:
            raise RunError(f"{self.path} holds a finished run ({REPORT_FILE}); nothing to resume")
        saved = json.loads((self.path / RUN_FILE).read_text())
        cfg = RunConfig.from_flower(saved["config"])
        if cfg.he and not (Path(cfg.keys_dir) / SECRET_CONTEXT_FILE).exists():
            raise RunError(f"the run's keys ({cfg.keys_dir}) are gone: its encrypted state cannot be used; "
                           "start a new run")
        return cfg, saved.get("own_keys", False)

    def client_state(self) -> Path:
        """The simulated clients' private state folder (mode 0700)."""
        private = self.path / CLIENT_STATE
        private.mkdir(mode=0o700, exist_ok=True)
        return private


# -- keys and results ----------------------------------------------------------------------------

def new_private_keys(cfg: RunConfig) -> str:
    """Fresh HE keys of ``cfg``'s ring (:func:`carbonfed.federation.keys.keygen_for`) in a new
    private temporary folder (mode 0700) outside any run folder; returns the keys folder.
    :func:`delete_private_keys` removes it."""
    keys = Path(tempfile.mkdtemp(prefix="carbonfed-keys-")) / "keys"
    try:
        keygen_for(cfg, keys)
    except BaseException:
        delete_private_keys(keys)        # no half-made secret left in the temporary folder
        raise
    return str(keys)


def delete_private_keys(keys: str | Path) -> None:
    """Delete the private temporary folder :func:`new_private_keys` made for ``keys``."""
    shutil.rmtree(Path(keys).parent, ignore_errors=True)


@dataclass(frozen=True)
class Results:
    report: dict
    page: Path
    statement: Path
    audit: object          # the VerifyResult of verify_run: .ok, .problems


def write_results(out: str | Path, keys: str | Path | None, baseline: dict | None = None) -> Results:
    """``report.json`` (decrypted with ``keys``, the key holders' folder, for HE runs), the
    independent audit of the run folder (with no key, as a reviewer runs it), and
    ``report.html`` and ``privacy_statement.md`` from the same records (``baseline``: a
    non-private run's report.json, to compare accuracy). Call it while the keys exist: a run
    with its own keys cannot be decrypted later. ``carbonfed run`` and ``carbonfed report``
    (:mod:`carbonfed.federation.report_command`) both write their results with it."""
    check_results_keys(Path(out), keys)       # another run's keys, or temporary keys gone: say so first
    report = build_report(out, keys)
    audit = verify_run(out)                   # with no key: what a reviewer of the folder can check
    page, statement = write_all(out, report, audit, baseline)
    return Results(report, page, statement, audit)


# -- one run, start to end -----------------------------------------------------------------------

@dataclass(frozen=True)
class Lifecycle:
    """A run ready to execute in its folder: ``cfg`` names the folder, the keys and the clients'
    state folder; ``own_keys``: the keys were made for this run (deleted at its end)."""

    folder: RunFolder
    cfg: RunConfig
    own_keys: bool
    made_folder: bool = field(default=False, compare=False)   # the run made its folder (a failed start removes it)

    @classmethod
    def start(cls, out: str | Path, settings: dict, keys: str | None) -> "Lifecycle":
        """A new run of ``settings`` (RunConfig keyword arguments) in ``out``; ``keys``: a folder
        from ``carbonfed keygen``, else fresh keys for an HE run. Checks the data folder, the run
        folder and every setting before it creates anything; writes ``run.json``."""
        if not settings.get("data"):                          # a CSV run (--data) needs no data folder
            settings = {**settings, "data_dir": str(resolve_data_dir(settings.get("data_dir") or None))}
        folder = RunFolder.at(out)
        folder.check_new()
        cfg = with_data_schema(RunConfig(**settings))         # invalid settings or CSV: fails here, nothing created
        check_sealable(cfg)                                   # and settings no charter can state
        made_folder, keys_dir = not folder.path.exists(), keys or ""
        try:                       # everything is validated: from here on, a failure leaves nothing
            folder.path.mkdir(parents=True, exist_ok=True)
            if keys is None and cfg.he:
                keys_dir = new_private_keys(cfg)
            cfg = replace(cfg, keys_dir=keys_dir, out_dir=str(folder.path), state_dir=str(folder.client_state()))
            cfg = seal_run(cfg)      # the clients' signing keys (keys-dir, else .client-state) and charter.json
            folder.record(cfg, own_keys=keys is None)
        except BaseException:
            forget(folder.path, keys_dir, keys is None, made_folder)
            raise
        return cls(folder, cfg, own_keys=keys is None, made_folder=made_folder)

    @classmethod
    def resume(cls, out: str | Path | None, given: dict | None = None) -> "Lifecycle":
        """The interrupted ``carbonfed run`` in ``out``, with its recorded config and keys;
        ``given``: the settings given with ``--resume`` (:func:`explicit_settings`), refused
        if any differs from the recorded one."""
        if not out:
            raise RunError("--resume needs --out, the folder of the interrupted run")
        folder = RunFolder.at(out)
        cfg, own_keys = folder.recorded()
        conflicts = resume_conflicts(cfg, given or {})
        if conflicts:
            raise RunError(f"--resume continues the run exactly as {folder.path / RUN_FILE} records it, but these "
                           f"options differ from it: {', '.join(conflicts)}; drop them, or start a new run in another --out")
        return cls(folder, cfg, own_keys)

    def complete(self, execute: Callable[[RunConfig], object]) -> Results:
        """``execute(cfg)`` (the federation, to its end), then :func:`write_results`, then the
        run's own keys and its clients' state are deleted. If ``execute`` raises (or is
        interrupted) after the run's first checkpoint, nothing is deleted: the run can resume;
        before it, there is nothing to resume, and the run leaves nothing (:meth:`forget`)."""
        try:
            execute(self.cfg)
        except BaseException as exc:
            hint = rejection_hint(self.folder.path)           # read the ledger before it may go
            if hint:
                exc.add_note(hint)
            if not has_checkpoint(self.folder.path):
                self.forget()
            raise
        keys = self.cfg.keys_dir or None
        results = write_results(self.folder.path, keys)
        if self.own_keys and keys:
            delete_private_keys(keys)
        if self.cfg.state_dir and Path(self.cfg.state_dir) == self.folder.path / CLIENT_STATE:
            shutil.rmtree(self.cfg.state_dir, ignore_errors=True)   # finished: the ledger is the record
        return results

    def forget(self) -> None:
        """Remove a run that has no checkpoint: its own keys and its folder's contents."""
        forget(self.folder.path, self.cfg.keys_dir, self.own_keys, self.made_folder)


# -- on the console ------------------------------------------------------------------------------

def run_in_console(run: Lifecycle, engine: Callable, verbose: bool) -> int:
    """``carbonfed run``: :meth:`Lifecycle.complete` with ``engine(cfg, on_round=..., verbose=...)``
    (the simulation) under a progress display, then the summary; exit code 0 if the audit
    passed, else 1."""
    cfg, out = run.cfg, run.folder.path
    print(f"carbonfed: {cfg.dataset} data, privacy={cfg.privacy}"
          + (f", ε={cfg.epsilon}, δ={cfg.delta}" if cfg.dp else "") + f", {cfg.rounds} rounds → {out}")
    print(f"charter SHA-256 {charter_sha256(cfg.charter)} (endorsed by every client: the anchor for "
          "`carbonfed verify --charter-sha256`)")
    if not verbose:      # a client's error is in the ledger and in the one-line error below
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
        logging.getLogger("carbonfed").setLevel(logging.ERROR)
    progress, on_round = round_progress(cfg)

    def execute(c: RunConfig) -> None:
        with progress:
            engine(c, on_round=on_round, verbose=verbose)
    try:
        results = run.complete(execute)
    except BaseException as exc:      # an error or a signal (Interrupted): one line, then exit
        return stopped(run.folder.path, exc)
    print_summary(results.report, out)
    audit = results.audit
    print(f"html: {results.page}  privacy statement: {results.statement}  audit: {'passed' if audit.ok else 'FAILED'}")
    for problem in ([] if audit.ok else audit.problems):
        print(f"  {problem}", file=sys.stderr)
    return 0 if audit.ok else 1


def round_progress(cfg: RunConfig):
    """(display, on_round) for a simulation of ``cfg``: a live progress bar on a terminal, one
    plain line per round on stdout otherwise (logs, CI, pipes). Used by ``carbonfed run`` and
    ``carbonfed audit-attack``: ``with display: run_simulation(cfg, on_round=on_round)``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    live = console.is_terminal
    progress = Progress(TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[info]}"), transient=False, console=console, disable=not live)
    task = progress.add_task("rounds", total=cfg.rounds, info="setup: statistics release")

    def on_round(s: dict) -> None:
        eps = f"ε_max={s['epsilon_max']:.3f}" if s.get("epsilon_max") is not None else "ε=∞ (no DP)"
        up = f", {s['upload_bytes_per_client'] / 1e3:.1f} kB/client" if s.get("upload_bytes_per_client") else ""
        info = f"{s['accepted']} accepted, {s['rejected']} rejected, {eps}, {s['seconds']:.1f}s{up}"
        if live:
            progress.update(task, advance=1, info=info)
        else:
            print(f"round {s['round']}/{cfg.rounds}: {info}", flush=True)
    return progress, on_round


def print_summary(report: dict, out: Path) -> None:
    """Accuracy, ε, HE cost, floored features, time and file paths of a finished run."""
    m, p, h = report["metrics"], report["privacy"], report["he"]
    parties = "clients" if report.get("dataset") == CSV else "countries"     # a CSV's parties are no countries
    print(f"held-out accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f} "
          f"({report['clients']['test']} test {parties}, {report['clients']['train']} training)")
    if p:
        print(f"privacy: ε_max={p['epsilon_max']:.4f} (target {p['epsilon_target']}) at δ={p['delta']}, accountant {p['accountant']}")
    if h:
        print(f"HE: {h['scheme']} N={h['poly_modulus_degree']}, {h['security_bits']}-bit, "
              f"{h['upload_bytes_per_client_round'] / 1e3:.1f} kB upload per client per round")
    floored = (report.get("preprocessing") or {}).get("floored_std_features")
    if floored:
        print(f"note: released std at the floor (nearly constant, or variance pulled down by the DP noise) for "
              f"{len(floored)} feature(s): " + ", ".join(floored))
    print(f"time: {report['timing']['total_s']:.1f}s ({report['timing']['per_round_s']:.2f}s per round)")
    print(f"report: {out / 'report.json'}  ledger: {out / 'ledger.jsonl'}")

"""The ``carbonfed`` command.

    carbonfed run [--dataset seed|owid] [--privacy none|dp|he|dp+he] [--epsilon E] ... --out DIR
    carbonfed run --resume --out DIR      (an interrupted run, from its last complete round)
    carbonfed keygen --out DIR
    carbonfed deploy local --clients N --out DIR [run options]
    carbonfed report DIR [--keys DIR] [--baseline DIR]
    carbonfed verify DIR
    carbonfed sweep --epsilons inf,8,3,1 --seeds 0,1,2 --out DIR
    carbonfed audit-attack DIR [--canaries M] [--json]
    carbonfed bench he --params N --clients K [--json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from carbonfed.federation.config import PRIVACY_MODES, RunConfig


# settings `carbonfed run` takes under its own names (--out, --keys) or sets itself (state-dir)
_OWN_OPTIONS = ("dataset", "data_dir", "privacy", "keys_dir", "out_dir", "state_dir")


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="run a federation in Flower's simulation engine and write a report")
    defaults = RunConfig()
    p.add_argument("--dataset", choices=("seed", "owid"), default=defaults.dataset)
    p.add_argument("--data-dir", default=None, help="folder with the CSV files (else $CARBONFED_DATA_DIR, else ../shared/data)")
    p.add_argument("--download-owid", metavar="CACHE_DIR", default=None,
                   help="download OWID's current CSV into CACHE_DIR (SHA-256 written beside it) and use it")
    p.add_argument("--privacy", choices=PRIVACY_MODES, default=defaults.privacy)
    p.add_argument("--out", required=False, default=None, help="output folder (default runs/<dataset>-<mode>-<time>)")
    p.add_argument("--keys", default=None, help="folder from `carbonfed keygen` (default: fresh keys in a private temp dir)")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out after its last complete round (same config)")
    RunConfig.add_options(p, skip=_OWN_OPTIONS)


def _progress(cfg: RunConfig):
    """A live progress bar on a terminal; one plain line per round otherwise (logs, CI, pipes)."""
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


def cmd_run(args) -> int:
    from carbonfed.data import resolve_data_dir
    from carbonfed.privacy.he import keygen

    if args.resume:
        return _resume(args)
    overrides = RunConfig.options_given(args, skip=_OWN_OPTIONS)
    if args.download_owid:
        from carbonfed.data import download_owid

        path = download_owid(args.download_owid)
        print(f"downloaded {path} (sha256 in {path}.sha256)")
        args.data_dir = str(path.parent)
    data_dir = str(resolve_data_dir(args.data_dir))
    out = Path(args.out or f"runs/{args.dataset}-{args.privacy.replace('+', '')}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if (out / "ledger.jsonl").exists():
        hint = (f"it is unfinished: continue it with `carbonfed run --resume --out {out}`, or choose another --out"
                if (out / RUN_FILE).exists() and not (out / "report.json").exists() else "choose another --out")
        print(f"error: {out} already holds a run (ledger.jsonl); {hint}", file=sys.stderr)
        return 2
    RunConfig(dataset=args.dataset, data_dir=data_dir, privacy=args.privacy, **overrides)   # invalid: fail here
    out.mkdir(parents=True, exist_ok=True)
    keys = args.keys
    if keys is None and args.privacy in ("he", "dp+he"):
        # fresh keys in a private temp dir (0700), deleted once the report is written; an
        # interrupted run keeps them (run.json names the folder), so that it can resume
        keys = str(Path(tempfile.mkdtemp(prefix="carbonfed-keys-")) / "keys")
        keygen(keys)
    private = out / CLIENT_STATE
    private.mkdir(mode=0o700, exist_ok=True)
    cfg = RunConfig(dataset=args.dataset, data_dir=data_dir, privacy=args.privacy, keys_dir=keys or "",
                    out_dir=str(out), state_dir=str(private), **overrides)
    (out / RUN_FILE).write_text(json.dumps({"config": cfg.to_flower(), "own_keys": args.keys is None}, indent=1))
    return _simulate(cfg, out, args.verbose, own_keys=args.keys is None)


RUN_FILE = "run.json"            # the config of a `carbonfed run`, for --resume
CLIENT_STATE = ".client-state"   # the simulated clients' accountant state and replay cache


def _resume(args) -> int:
    from carbonfed.privacy.he import SECRET_CONTEXT_FILE

    if not args.out:
        print("error: --resume needs --out, the folder of the interrupted run", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    if not (out / RUN_FILE).exists():
        print(f"error: {out / RUN_FILE} not found: {out} holds no run started by `carbonfed run`", file=sys.stderr)
        return 2
    if (out / "report.json").exists():
        print(f"error: {out} holds a finished run (report.json); nothing to resume", file=sys.stderr)
        return 2
    saved = json.loads((out / RUN_FILE).read_text())
    cfg = RunConfig.from_flower(saved["config"])
    if cfg.he and not (Path(cfg.keys_dir) / SECRET_CONTEXT_FILE).exists():
        print(f"error: the run's keys ({cfg.keys_dir}) are gone: its encrypted state cannot be used; "
              "start a new run", file=sys.stderr)
        return 2
    print(f"carbonfed: resuming {out} from its last checkpoint")
    return _simulate(cfg, out, args.verbose, own_keys=saved.get("own_keys", False))


def _simulate(cfg: RunConfig, out: Path, verbose: bool, own_keys: bool) -> int:
    """Run (or resume) the simulation, then the report; a run's own keys are deleted at the end."""
    import shutil

    from carbonfed.federation.report.build import build_report
    from carbonfed.federation.simulation import run_simulation

    print(f"carbonfed: {cfg.dataset} data, privacy={cfg.privacy}"
          + (f", ε={cfg.epsilon}, δ={cfg.delta}" if cfg.dp else "") + f", {cfg.rounds} rounds → {out}")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
    progress, on_round = _progress(cfg)
    with progress:
        run_simulation(cfg, on_round=on_round, verbose=verbose)
    keys = cfg.keys_dir or None
    report = build_report(out, keys)
    # while the keys still exist: a run with its own keys cannot be decrypted later
    page, statement, audit = _audit_pages(out, report, keys)
    if own_keys and keys:
        shutil.rmtree(Path(keys).parent, ignore_errors=True)   # the private temp dir made for them
    if cfg.state_dir and Path(cfg.state_dir) == out / CLIENT_STATE:
        shutil.rmtree(cfg.state_dir, ignore_errors=True)   # finished: the ledger is the record
    _print_summary(report, out)
    print(f"html: {page}  privacy statement: {statement}  audit: {'passed' if audit.ok else 'FAILED'}")
    if not audit.ok:
        for problem in audit.problems:
            print(f"  {problem}", file=sys.stderr)
    return 0 if audit.ok else 1


def _audit_pages(out: Path, report: dict, keys: str | None):
    from carbonfed.federation.report.html import write_all
    from carbonfed.privacy.audit.verify import verify_run

    audit = verify_run(out, keys_dir=keys)
    page, statement = write_all(out, report, audit)
    return page, statement, audit


def _print_summary(report: dict, out: Path) -> None:
    m, p, h = report["metrics"], report["privacy"], report["he"]
    print(f"held-out accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f} "
          f"({report['clients']['test']} test countries, {report['clients']['train']} training)")
    if p:
        print(f"privacy: ε_max={p['epsilon_max']:.4f} (target {p['epsilon_target']}) at δ={p['delta']}, accountant {p['accountant']}")
    if h:
        print(f"HE: {h['scheme']} N={h['poly_modulus_degree']}, {h['security_bits']}-bit, "
              f"{h['upload_bytes_per_client_round'] / 1e3:.1f} kB upload per client per round")
    floored = (report.get("preprocessing") or {}).get("floored_std_features")
    if floored:
        print(f"note: released std at the floor (nearly constant, or variance pulled down by the DP noise) for "
              f"{len(floored)} feature(s): "
              + ", ".join(floored))
    print(f"time: {report['timing']['total_s']:.1f}s ({report['timing']['per_round_s']:.2f}s per round)")
    print(f"report: {out / 'report.json'}  ledger: {out / 'ledger.jsonl'}")


def cmd_keygen(args) -> int:
    from carbonfed.privacy.he import keygen

    secret, public = keygen(args.out)
    print(f"clients' secret context: {secret}\nserver's public context: {public}\n(both mode 0600; never commit them)")
    return 0


# subcommand → (module, function taking the remaining argv); imported only when used
DELEGATED = {"report": ("carbonfed.federation.report.html", "main"), "verify": ("carbonfed.privacy.audit.verify", "main"),
             "deploy": ("carbonfed.federation.deploy.local", "main"), "audit-attack": ("carbonfed.federation.experiments.audit_attack", "main"),
             "bench": ("carbonfed.federation.experiments.bench_he", "main")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="carbonfed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    _run_parser(sub)
    k = sub.add_parser("keygen", help="write the clients' secret and the server's public HE context")
    k.add_argument("--out", required=True)
    r = sub.add_parser("report", help="rebuild report.json, report.html and privacy_statement.md of a run "
                                      "(`DIR [--keys DIR] [--baseline DIR]`; HE runs need the secret context)")
    r.add_argument("rest", nargs=argparse.REMAINDER)
    v = sub.add_parser("verify", help="check a run's ledger chain and recompute every ε independently")
    v.add_argument("rest", nargs=argparse.REMAINDER)
    a = sub.add_parser("audit-attack", help="empirical privacy audit: one-run canary ε lower bound and a "
                                            "loss-based membership-inference attack (`DIR [--canaries M] [--json]`)")
    a.add_argument("rest", nargs=argparse.REMAINDER)
    from carbonfed.federation.experiments.sweep import add_arguments as sweep_arguments

    sweep_arguments(sub.add_parser("sweep", help="accuracy–privacy sweep over ε and seeds with a centralized "
                                                 "ceiling: sweep.csv, tradeoff.png, tradeoff.md"))
    d = sub.add_parser("deploy", help="Flower's deployment engine on loopback with TLS and node authentication: "
                                      "`carbonfed deploy local --clients N --out DIR [run options]`")
    d.add_argument("rest", nargs=argparse.REMAINDER)
    b = sub.add_parser("bench", help="benchmarks: `carbonfed bench he --params N --clients K [--json]`")
    b.add_argument("what", choices=("he",))
    b.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "run":
            return cmd_run(args)
        if args.cmd == "keygen":
            return cmd_keygen(args)
        if args.cmd == "sweep":
            from carbonfed.federation.experiments.sweep import cmd_sweep
            return cmd_sweep(args)
        module, func = DELEGATED[args.cmd]          # commands that parse their own arguments
        return getattr(importlib.import_module(module), func)(args.rest)
    except (ValueError, OSError) as exc:   # DataError, ContextFileError, config errors: say what, no traceback
        print(f"carbonfed: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())

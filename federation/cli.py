"""The ``carbonfed`` command: argument parsing and dispatch, nothing else.

    carbonfed run [--dataset seed|owid] [--privacy none|dp|he|dp+he] [--epsilon E] ... --out DIR
    carbonfed run --data FILE.csv --client-col C --label-col L [--features A,B] ...   (your own table)
    carbonfed run --resume --out DIR      (an interrupted run, from its last complete round)
    carbonfed keygen --out DIR [--dataset seed|owid] [run options]   (keys of that job's ring)
    carbonfed deploy local --clients N --out DIR [run options]
    carbonfed report DIR [--keys DIR] [--baseline DIR] [--registry [--curator NAME] [--region TEXT]]
    carbonfed verify DIR [--trusted-keys FILE] [--charter-sha256 HEX]   (no keys needed)
    carbonfed sweep --epsilons inf,8,3,1 --seeds 0,1,2 --out DIR [run options, --data FILE.csv ...]
    carbonfed audit-attack DIR [--canaries M] [--json]
    carbonfed bench he --params N --clients K [--json]

Every command is wired the same way: a function that takes the command's own arguments and
returns its exit code, named in ``COMMANDS`` as ``module:function`` and imported only when that
command runs (the only function-level imports of carbonfed modules in the package are here).
``carbonfed COMMAND --help`` lists a command's options, each with one line of meaning and its
default (:class:`Parser`). ``run``, ``keygen``, ``deploy local`` and ``sweep`` take a user's
CSV (``--data FILE.csv --client-col C --label-col L``) alike; ``audit-attack`` audits a CSV run.
The run lifecycle (folder rules, keys, resume, report and audit) is
:mod:`carbonfed.federation.run`, shared with ``deploy local``.
Guarantee: a user error (bad data, settings, keys or folder: a ``ValueError`` or ``OSError``;
a bad argument, :class:`Parser`; a folder that does not exist or holds no run given to
``report``, ``verify`` or ``audit-attack``) ends with one line on stderr and exit code 2, without
a traceback. ``carbonfed run`` ends a failed run with one line too (exit code 1), and SIGTERM or
SIGINT with one line and 128 + the signal, after it has shut Ray down and removed its app
folder, keeping the checkpoint (:mod:`carbonfed.federation.run_guard`). ``keygen`` does not
replace keys without ``--force``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from pathlib import Path

# command → ("module:function" taking the command's argv, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("carbonfed.federation.cli:run_command",
            "run a federation in Flower's simulation engine and write a report"),
    "keygen": ("carbonfed.federation.cli:keygen_command",
               "write the clients' secret and the server's public HE context, the clients' signing keys "
               "and the job's charter"),
    "deploy": ("carbonfed.federation.deploy.local:main",
               "Flower's deployment engine on loopback with TLS and node authentication: "
               "`carbonfed deploy local --clients N --out DIR [run options]`"),
    "report": ("carbonfed.federation.report_command:main",
               "rebuild report.json, report.html and privacy_statement.md of a run "
               "(`DIR [--keys DIR] [--baseline DIR] [--registry]`; HE runs need the secret context; "
               "--registry: registry.yaml, a DP Deployments Registry entry)"),
    "verify": ("carbonfed.federation.cli:verify_command",
               "check a run folder with no keys: the clients' signatures, every ε recomputed independently "
               "(`DIR [--trusted-keys clients.pub.json] [--charter-sha256 HEX]`)"),
    "sweep": ("carbonfed.federation.experiments.sweep:main",
              "accuracy–privacy sweep over ε and seeds with a centralized ceiling: sweep.csv, tradeoff.png, tradeoff.md"),
    "audit-attack": ("carbonfed.federation.experiments.audit_attack:main",
                     "empirical privacy audit: one-run canary ε lower bound and a loss-based "
                     "membership-inference attack (`DIR [--canaries M] [--json]`)"),
    "bench": ("carbonfed.federation.cli:bench_command",
              "benchmarks: `carbonfed bench he --params N --clients K [--json]`"),
}
BENCHES = {"he": "carbonfed.federation.experiments.bench_he:main"}
DESCRIPTION = ("Privacy-hardened federated learning: Opacus DP-SGD clients, TenSEAL-encrypted FedAvg in "
               "Flower, a per-client privacy ledger.")


class Parser(argparse.ArgumentParser):
    """A command's argument parser whose errors are one line on stderr (exit code 2), and whose
    ``--help`` gives every option its default (:func:`show_defaults`)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (options: `{self.prog} --help`)\n")

    def format_help(self) -> str:
        show_defaults(self)
        return super().format_help()


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """End the help of every option of ``parser`` that names no default with its default ("off"
    for a flag, "none" for no value), or with "required"; a help that names one is left as it is."""
    for action in parser._actions:
        text = action.help
        if not action.option_strings or not text or text == argparse.SUPPRESS or action.default == argparse.SUPPRESS:
            continue
        if "default" in text or "required" in text:
            continue
        if action.required:
            action.help = f"{text} (required)"
        else:
            value = "off" if action.nargs == 0 else "none" if action.default is None else action.default
            action.help = f"{text} (default: {value})"


def _call(target: str, argv: list[str]) -> int:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)(argv)


def run_command(argv: list[str]) -> int:
    """``carbonfed run``: a new run, or ``--resume`` of an interrupted one."""
    from carbonfed.federation import run as lifecycle

    p = Parser(prog="carbonfed run", description=COMMANDS["run"][1])
    lifecycle.add_run_options(p)
    p.add_argument("--download-owid", metavar="CACHE_DIR", default=None,
                   help="download OWID's current CSV into CACHE_DIR (SHA-256 written beside it) and use it "
                        "(default: the CSV already in the data folder)")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs (default: progress only)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out after its last complete round (its recorded config; "
                        "other options must agree with it; default: a new run)")
    args = p.parse_args(argv)
    from carbonfed.federation.run_guard import Interrupted, stop_on_signals
    from carbonfed.federation.simulation import run_simulation

    with stop_on_signals():             # SIGTERM/SIGINT: the run unwinds, keeps its checkpoint, says how to resume
        try:
            run = _start_or_resume(args)
        except lifecycle.RunError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except Interrupted as stop:
            print(f"carbonfed run: interrupted ({stop}) before the run started; nothing was kept", file=sys.stderr)
            return 128 + stop.signum
        return lifecycle.run_in_console(run, run_simulation, args.verbose)


def _start_or_resume(args):
    """The :class:`carbonfed.federation.run.Lifecycle` of ``carbonfed run``'s parsed ``args``."""
    from carbonfed.federation import run as lifecycle

    if args.resume:
        if args.download_owid:
            raise lifecycle.RunError("--download-owid: a resumed run reads the data its run.json records; drop it")
        run = lifecycle.Lifecycle.resume(args.out, lifecycle.explicit_settings(args))
        print(f"carbonfed: resuming {run.folder.path} from its last checkpoint")
        return run
    settings = lifecycle.settings_from(args)
    if args.download_owid:
        from carbonfed.data import download_owid

        path = download_owid(args.download_owid)
        print(f"downloaded {path} (sha256 in {path}.sha256)")
        settings["data_dir"] = str(path.parent)
    return lifecycle.Lifecycle.start(lifecycle.default_out(args.out, settings), settings, args.keys)


def keygen_command(argv: list[str]) -> int:
    """``carbonfed keygen --out DIR [--dataset D] [run options]``: keys of the ring that job needs."""
    from carbonfed.data import DATASET_NAMES
    from carbonfed.federation import run as lifecycle
    from carbonfed.federation.config import PRIVACY_MODES, RunConfig
    from carbonfed.federation.keys import he_params_for
    from carbonfed.federation.run_data import CSV, with_data_schema
    from carbonfed.privacy.he import keygen

    p = Parser(
        prog="carbonfed keygen", description=COMMANDS["keygen"][1] + ", for one job: the smallest BFV ring "
        "(128-bit security) whose sums of that job's vectors decrypt exactly. Give the job's --dataset and run "
        "options (as for `carbonfed run`); without them, the keys fit the default job. A run refuses keys too "
        "small for it; keys of a larger ring work, with larger uploads.")
    p.add_argument("--out", required=True, help="folder for secret.ctx (clients) and public.ctx (server)")
    p.add_argument("--force", action="store_true",
                   help="replace the keys already in --out (what was encrypted under them can no longer be decrypted; "
                        "default: refuse)")
    p.add_argument("--dataset", choices=(*DATASET_NAMES, CSV), default=None,
                   help=f"the job's data set (default {RunConfig.dataset}; {CSV} with --data FILE.csv)")
    p.add_argument("--data-dir", default=None,
                   help="accepted as for `carbonfed run`; the ring does not depend on it (default: none)")
    p.add_argument("--privacy", choices=PRIVACY_MODES, default=RunConfig.privacy,
                   help="the job's privacy mode (default: the data set's recommended one, as for `carbonfed run`)")
    RunConfig.add_options(p, skip=lifecycle.OWN_OPTIONS)
    args = p.parse_args(argv)
    refuse_existing_keys(args.out, args.force)
    cfg = with_data_schema(RunConfig(**lifecycle.settings_from(args)))
    params = he_params_for(cfg)
    secret, public = keygen(args.out, params)
    print(f"clients' secret context: {secret}\nserver's public context: {public}\n(both mode 0600; never commit them)\n"
          f"ring: BFV N={params.poly_modulus_degree}, coefficient modulus {list(params.coeff_mod_bit_sizes)} bits, "
          f"{params.security_bits()}-bit security, for the {cfg.dataset} job given")
    from dataclasses import replace

    from carbonfed.federation.enrolment import charter_sha256, seal_run

    sealed = seal_run(replace(cfg, keys_dir=str(args.out), charter=""), out=args.out)   # every privacy mode signs
    print(f"clients' signing keys: {args.out}/signing/ (one per client, mode 0600; a deployment gives each node "
          f"its own), public keys: {args.out}/clients.pub.json\ncharter of this job, endorsed by every client: "
          f"{sealed.charter} (SHA-256 {charter_sha256(sealed.charter)}); for `flwr run`, pass run config "
          f"keys-dir='{args.out}' charter='{sealed.charter}'")
    return 0


def refuse_existing_keys(out: str, force: bool) -> None:
    """``keygen --out``: a folder that holds keys is not overwritten unless ``force`` (ValueError)."""
    from carbonfed.privacy.he import PUBLIC_CONTEXT_FILE, SECRET_CONTEXT_FILE

    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file, not a folder")
    found = [name for name in (SECRET_CONTEXT_FILE, PUBLIC_CONTEXT_FILE) if (folder / name).exists()]
    if found and not force:
        raise ValueError(f"{folder} already holds HE keys ({', '.join(found)}): new keys would replace them, and "
                         "whatever was encrypted under them could not be decrypted again; choose another --out, "
                         "or give --force to replace them")


def bench_command(argv: list[str]) -> int:
    """``carbonfed bench WHAT ...``: the benchmark's own arguments go to its module."""
    p = Parser(prog="carbonfed bench", description=COMMANDS["bench"][1])
    p.add_argument("what", choices=BENCHES)
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's options (carbonfed bench WHAT --help)")
    args = p.parse_args(argv)
    return _call(BENCHES[args.what], args.args)


def verify_command(argv: list[str]) -> int:
    """``carbonfed verify DIR ...`` (:func:`carbonfed.privacy.audit.verify.main`), after one check:
    a DIR that does not exist or holds no run is a user error (one line, exit code 2), not a
    failed audit."""
    from carbonfed.federation.run_guard import existing_run
    from carbonfed.privacy.audit import verify

    parser = verify._parser()                                 # --help and the options: verify's own parser,
    parser.error = functools.partial(Parser.error, parser)    # its errors one line and its defaults shown,
    show_defaults(parser)                                     # as every command's
    run = Path(parser.parse_args(argv).run_dir)
    try:
        if not run.is_file():                                 # a ledger file is verified as it is
            existing_run(run)
    except ValueError as exc:
        print(f"carbonfed verify: error: {exc}", file=sys.stderr)
        return 2
    return verify.main(argv)


def installed_version() -> str:
    """``carbonfed X.Y.Z``: the version of the installed distribution (its package metadata)."""
    from importlib.metadata import version

    return f"carbonfed {version('carbonfed')}"


def main(argv=None) -> int:
    parser = Parser(
        prog="carbonfed", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<13} {text}" for name, (_, text) in COMMANDS.items())
               + "\n\n" + __doc__.split("\n\n")[1])
    parser.add_argument("--version", action="version", version=installed_version(),
                        help="print the installed carbonfed version and exit")
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="...", help="the command's options (carbonfed COMMAND --help)")
    args = parser.parse_args(argv)
    try:
        return _call(COMMANDS[args.command][0], args.args)
    except (ValueError, OSError) as exc:   # DataError, ContextFileError, config errors: say what, no traceback
        print(f"carbonfed: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``carbonfed`` command: argument parsing and dispatch, nothing else.

    carbonfed run [--dataset seed|owid] [--privacy none|dp|he|dp+he] [--epsilon E] ... --out DIR
    carbonfed run --resume --out DIR      (an interrupted run, from its last complete round)
    carbonfed keygen --out DIR
    carbonfed deploy local --clients N --out DIR [run options]
    carbonfed report DIR [--keys DIR] [--baseline DIR]
    carbonfed verify DIR
    carbonfed sweep --epsilons inf,8,3,1 --seeds 0,1,2 --out DIR
    carbonfed audit-attack DIR [--canaries M] [--json]
    carbonfed bench he --params N --clients K [--json]

Every command is wired the same way: a function that takes the command's own arguments and
returns its exit code, named in ``COMMANDS`` as ``module:function`` and imported only when that
command runs (the only function-level imports of carbonfed modules in the package are here).
``carbonfed COMMAND --help`` lists a command's options. The run lifecycle (folder rules, keys,
resume, report and audit) is :mod:`carbonfed.federation.run`, shared with ``deploy local``.
Guarantee: a user error (bad data, settings, keys or folder: a ``ValueError`` or ``OSError``)
ends with one line on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command → ("module:function" taking the command's argv, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("carbonfed.federation.cli:run_command",
            "run a federation in Flower's simulation engine and write a report"),
    "keygen": ("carbonfed.federation.cli:keygen_command",
               "write the clients' secret and the server's public HE context"),
    "deploy": ("carbonfed.federation.deploy.local:main",
               "Flower's deployment engine on loopback with TLS and node authentication: "
               "`carbonfed deploy local --clients N --out DIR [run options]`"),
    "report": ("carbonfed.federation.report.html:main",
               "rebuild report.json, report.html and privacy_statement.md of a run "
               "(`DIR [--keys DIR] [--baseline DIR]`; HE runs need the secret context)"),
    "verify": ("carbonfed.privacy.audit.verify:main",
               "check a run's ledger chain and recompute every ε independently"),
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


def _call(target: str, argv: list[str]) -> int:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)(argv)


def run_command(argv: list[str]) -> int:
    """``carbonfed run``: a new run, or ``--resume`` of an interrupted one."""
    from carbonfed.federation import run as lifecycle

    p = argparse.ArgumentParser(prog="carbonfed run", description=COMMANDS["run"][1])
    lifecycle.add_run_options(p)
    p.add_argument("--download-owid", metavar="CACHE_DIR", default=None,
                   help="download OWID's current CSV into CACHE_DIR (SHA-256 written beside it) and use it")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out after its last complete round (same config)")
    args = p.parse_args(argv)
    from carbonfed.federation.simulation import run_simulation

    try:
        if args.resume:
            run = lifecycle.Lifecycle.resume(args.out)
            print(f"carbonfed: resuming {run.folder.path} from its last checkpoint")
        else:
            settings = lifecycle.settings_from(args)
            if args.download_owid:
                from carbonfed.data import download_owid

                path = download_owid(args.download_owid)
                print(f"downloaded {path} (sha256 in {path}.sha256)")
                settings["data_dir"] = str(path.parent)
            run = lifecycle.Lifecycle.start(lifecycle.default_out(args.out, settings), settings, args.keys)
    except lifecycle.RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return lifecycle.run_in_console(run, run_simulation, args.verbose)


def keygen_command(argv: list[str]) -> int:
    """``carbonfed keygen --out DIR``."""
    from carbonfed.privacy.he import keygen

    p = argparse.ArgumentParser(prog="carbonfed keygen", description=COMMANDS["keygen"][1])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    secret, public = keygen(args.out)
    print(f"clients' secret context: {secret}\nserver's public context: {public}\n(both mode 0600; never commit them)")
    return 0


def bench_command(argv: list[str]) -> int:
    """``carbonfed bench WHAT ...``: the benchmark's own arguments go to its module."""
    p = argparse.ArgumentParser(prog="carbonfed bench", description=COMMANDS["bench"][1])
    p.add_argument("what", choices=BENCHES)
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's options (carbonfed bench WHAT --help)")
    args = p.parse_args(argv)
    return _call(BENCHES[args.what], args.args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="carbonfed", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<13} {text}" for name, (_, text) in COMMANDS.items())
               + "\n\n" + __doc__.split("\n\n")[1])
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

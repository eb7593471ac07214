"""``carbonfed report DIR [--keys DIR] [--baseline DIR] [--registry [--curator NAME] [--region TEXT]]``.

Rebuilds a run's results exactly as ``carbonfed run`` writes them at its end, with the same
function (:func:`carbonfed.federation.run.write_results`): ``report.json`` (decrypted with the
clients' secret context for HE runs), the independent audit of the ledger, ``report.html`` and
``privacy_statement.md``. With ``--registry`` it also writes ``registry.yaml``, the run's tier-3
entry of the DP Deployments Registry (:func:`carbonfed.federation.report.registry.write_registry`,
checked against the registry's schema).

Guarantees
----------
* Exit code 0 when the audit passed, 1 when it failed (after writing every file, the failure
  shown at the top of the page), 2 on a user error (a bad option; a folder that does not exist or
  holds no run; keys that are not the run's): one line on stderr, no traceback.
* ``--registry`` on a run without DP is refused before anything is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from carbonfed.federation.cli import Parser
from carbonfed.federation.config import RunConfig
from carbonfed.federation.report.html import load_baseline
from carbonfed.federation.report.registry import write_registry
from carbonfed.federation.run import write_results
from carbonfed.federation.run_guard import existing_run
from carbonfed.privacy.audit.verify import summary_text


def _parser() -> Parser:
    ap = Parser(prog="carbonfed report",
                                 description="Rebuild report.json (decrypts with the clients' secret context), audit "
                                             "the ledger, and write report.html and privacy_statement.md "
                                             "(with --registry, registry.yaml too).")
    ap.add_argument("dir", metavar="DIR", help="run directory (ledger.jsonl, server.json, aggregates/)")
    ap.add_argument("--keys", default=None, help="folder with secret.ctx, for HE runs (default: the run config's "
                                                 "keys-dir)")
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help="a non-private run (e.g. --privacy none) of the same config, to compare accuracy "
                         "(default: none, no comparison)")
    ap.add_argument("--registry", action="store_true",
                    help="also write registry.yaml: a tier-3 entry of the DP Deployments Registry (OpenDP) for "
                         "this run, status Draft (DP runs only; default: off)")
    ap.add_argument("--curator", default="", metavar="NAME",
                    help="the entry's data curator (default: the federation's parties, the key holders)")
    ap.add_argument("--region", default="", metavar="TEXT",
                    help="the entry's data product region (default: the parties' jurisdictions)")
    return ap


def main(argv=None) -> int:
    """``carbonfed report``: exit code 0 (audit passed), 1 (audit failed) or 2 (user error)."""
    args = _parser().parse_args(argv)
    try:
        run = existing_run(args.dir, "server.json")
        cfg = RunConfig.from_flower(json.loads((run / "server.json").read_text())["config"])
        if args.registry and not cfg.dp:
            raise ValueError(f"--registry: a registry entry describes a DP deployment; this run has "
                             f"privacy={cfg.privacy}")
        baseline = load_baseline(args.baseline) if args.baseline else None
        # the key holders' folder (HE runs: one for the report and the audit): --keys, else the run config's
        keys = (args.keys or cfg.keys_dir or None) if cfg.he else None
        results = write_results(run, keys, baseline)
        registry = write_registry(run, results.report, args.curator, args.region) if args.registry else None
    except (ValueError, OSError, KeyError) as exc:
        print(f"carbonfed report: error: {exc}", file=sys.stderr)
        return 2
    print(f"report.json:          {run / 'report.json'}")
    print(f"report.html:          {results.page}")
    print(f"privacy statement:    {results.statement}")
    if registry is not None:
        print(f"registry entry:       {registry} (status Draft: complete and submit it)")
    audit = results.audit
    print(summary_text(audit, args.dir).splitlines()[-1] if audit.ok else summary_text(audit, args.dir))
    return 0 if audit.ok else 1

"""Run a federation on Flower's deployment engine, on this machine, as it would run across many.

``carbonfed deploy local --clients N --out DIR [every option of carbonfed run]`` (and
:func:`deploy_local`; with ``--data FILE.csv --client-col C --label-col L``, N of the table's
parties, the table checked whole before anything starts) starts, on the loopback interface only:

* one **SuperLink** with TLS (a fresh CA and a server certificate for 127.0.0.1/localhost) and
  SuperNode authentication (``--enable-supernode-auth``), its state in an SQLite file so that a
  restarted SuperLink still knows the registered nodes;
* N **SuperNodes**, one per country, each with its own EC P-384 key pair whose public half is
  registered with ``flwr supernode register`` before the node starts, the CA certificate
  (``--root-certificates``), and a node config naming its country, data folder, the clients'
  secret HE context and a private state folder (where its accountant survives restarts);
* the run, submitted with ``flwr run <app> <connection> --run-config <file>``. The ServerApp is
  given a keys folder that holds ``public.ctx`` only; ``secret.ctx`` lives elsewhere and is
  named, by absolute path, in the SuperNodes' node config only.

It follows the run through the ledger (one line per round) and ``flwr ls``, then stops every
process it started (also on Ctrl-C, SIGTERM or an error) and, as the key holder, writes
``report.json``, ``report.html`` and ``privacy_statement.md`` exactly as after a simulation
(:func:`carbonfed.federation.run.write_results`), the audit checking the clients' signed
statements with their public keys only (``charter.json`` in the run folder).

The parts: :mod:`.certs` (TLS and node keys), :mod:`.processes` (the supervisor),
:mod:`.flower_cli` (the Flower command line), :mod:`.deployment` (SuperLink, SuperNodes, the
private folder), :mod:`.drills` (fault drills, following the ledger).

Guarantees
----------
* Every process started here carries a private marker in its environment; on the way out every
  process with that marker (the SuperLink, the SuperNodes and what they spawned: SuperExec,
  ServerApp, ClientApps) is sent SIGTERM, then SIGKILL, by PID. Nothing is left running.
* Key material (CA key, server key, node keys, HE contexts, Flower's config) is written into a
  private temporary folder (mode 0700, files 0600) that is deleted at the end; nothing is
  written to ``~/.flwr`` (``FLWR_HOME`` points into that folder) nor into the repository (the
  app is copied into a temporary folder before ``flwr run`` builds its FAB, because ``flwr run``
  rewrites a ``pyproject.toml`` that still has a ``[tool.flwr.federations]`` table).
* A folder that already holds a run is refused before anything starts (the rule of
  ``carbonfed run``: :meth:`carbonfed.federation.run.RunFolder.check_new`).
* Fault drills (:mod:`.drills`): a SuperNode SIGKILLed during a round and started again after it;
  the SuperLink and ServerApp SIGKILLed after a round, restarted, and the run resumed.
* The processes' logs are in ``OUT/deploy-logs``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from carbonfed.data import resolve_data_dir
from carbonfed.federation.cli import Parser
from carbonfed.federation.config import RunConfig
from carbonfed.federation.deploy.deployment import (Deployment, choose_countries, local_deployment,
                                                   with_deployed_noise_floor)
from carbonfed.federation.deploy.drills import Drills, round_lines, say, show_rounds
from carbonfed.federation.deploy.flower_cli import write_app
from carbonfed.federation.deploy.processes import DeployError
from carbonfed.federation.run import RunFolder, add_run_options, default_out, settings_from, write_results
from carbonfed.federation.run_data import with_data_schema

STATUS_EVERY_S = 30.0                   # `flwr ls` of the run (between, the ledger shows progress)


def deploy_local(cfg: RunConfig, n_clients: int, out_dir, *, kill_client_in_round: int | None = None,
                 restart_server_after_round: int | None = None, keys_dir: str | os.PathLike | None = None,
                 timeout: float | None = None, on_event=None) -> Path:
    """Run ``cfg`` on a local deployment of ``n_clients`` SuperNodes; returns ``out_dir`` (with
    ``report.json``). ``keys_dir``: the key holders' folder from ``carbonfed keygen`` (default:
    fresh keys in the private temporary folder). ``on_event(name, info)`` is called at
    ``"started"`` (SuperNodes online, before the run; ``info`` has the process marker, the
    address, the CA file and the server's keys folder), ``"killed"``, ``"restarted-server"``
    and ``"restarted-client"``."""
    folder = RunFolder.at(out_dir)
    folder.check_new()
    out = folder.path
    if not cfg.data:                    # a bundled data set's folder; a CSV run reads its file (checked whole)
        cfg = replace(cfg, data_dir=str(resolve_data_dir(cfg.data_dir or None)))
    cfg = replace(with_data_schema(cfg), out_dir=str(out))
    countries = choose_countries(cfg, n_clients)
    floored = with_deployed_noise_floor(cfg, countries)
    if floored is not cfg:
        say(f"ddp+he: min-noise-clients={floored.min_noise_clients} (of the training SuperNodes deployed)")
    cfg = floored
    drills = Drills(kill_client_in_round, restart_server_after_round, emit=on_event or (lambda name, info: None))
    drills.check(cfg.rounds)
    timeout = timeout or max(900.0, 3 * cfg.rounds * min(cfg.round_timeout, 300.0) + 300)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    with local_deployment(cfg, out, keys_dir=keys_dir) as dep:
        run_id, app_dir = _bring_up(dep, countries, drills.emit)
        run_id = _follow(dep, run_id, app_dir, drills, timeout)
        say(f"run {run_id} finished, {time.time() - t_start:.1f}s after start; stopping every process")
        dep.procs.close()
        # while the keys exist: the report decrypts with them (the audit needs no key)
        audit = write_results(out, dep.key_holders).audit
    say(f"report: {out / 'report.json'}; audit {'passed' if audit.ok else 'FAILED: ' + '; '.join(audit.problems)}")
    return out


def _bring_up(dep: Deployment, countries: list[str], emit) -> tuple[int, Path]:
    """Register and start one SuperNode per country, wait until all are online, submit the run."""
    dep.add_nodes(countries)
    dep.seal()                          # each node endorses the charter with its own key, before round 1
    say(f"SuperLink on {dep.address} (TLS, SuperNode authentication); {len(dep.nodes)} SuperNodes: "
        + ", ".join(f"{n.country} ({n.role})" for n in dep.nodes) + f"; logs in {dep.procs.log_dir}")
    dep.register(dep.nodes)
    for n in dep.nodes:
        dep.start_node(n)
    dep.wait_online(dep.nodes)
    app_dir = write_app(dep.cfg, dep.secret / "app")
    emit("started", {"marker": dep.procs.marker, "address": dep.address, "ca": str(dep.tls["ca"]),
                     "server_keys_dir": dep.cfg.keys_dir, "nodes": {n.country: n.node_id for n in dep.nodes}})
    run_id = dep.submit(app_dir)
    say(f"all SuperNodes online; run {run_id} submitted")
    return run_id, app_dir


def _follow(dep: Deployment, run_id: int, app_dir: Path, drills: Drills, timeout: float) -> int:
    """Show each round as the ledger records it and fire the drills, until ``flwr ls`` says the
    run finished (``DeployError`` if it failed or ``timeout`` passed); returns the final run id."""
    ledger = dep.out / "ledger.jsonl"
    seen, last_check = 0, 0.0
    deadline = time.monotonic() + timeout
    while True:
        rounds = round_lines(ledger)
        seen = show_rounds(rounds, seen)
        done = {r["round"] for r in rounds}
        run_id = drills.step(dep, done, run_id, app_dir)
        now = time.monotonic()
        if now - last_check > STATUS_EVERY_S or dep.cfg.rounds in done:
            last_check = now
            status = dep.run_status(run_id)
            if status.startswith("finished"):
                if status != "finished:completed" or not (dep.out / "server.json").exists():
                    raise DeployError(f"run {run_id} ended as {status}; see {dep.procs.log_dir}")
                break
        if now > deadline:
            raise DeployError(f"run {run_id} did not finish within {timeout:.0f}s; see {dep.procs.log_dir}")
        time.sleep(0.5)
    show_rounds(round_lines(ledger), seen)
    return run_id


# -- command line --------------------------------------------------------------------------------

def _parser() -> Parser:
    ap = Parser(prog="carbonfed deploy",
                                 description="Run a federation on Flower's deployment engine (SuperLink + SuperNodes).")
    sub = ap.add_subparsers(dest="where", required=True, metavar="WHERE", help="where the roles run: local")
    p = sub.add_parser("local", help="every role on this machine, on 127.0.0.1, with TLS and node authentication")
    p.add_argument("--clients", type=int, required=True, help="number of SuperNodes (parties: countries, or a CSV's clients), at least 3 "
                                                                  "(required)")
    add_run_options(p, out_prefix="deploy-")
    p.add_argument("--verbose", action="store_true", help="debug logging of this command (Flower's logs are "
                                                           "always in OUT/deploy-logs; default: warnings only)")
    p.add_argument("--kill-client-in-round", type=int, default=None,
                   help="fault drill: SIGKILL one training SuperNode during this round (it restarts after it; "
                        "default: none)")
    p.add_argument("--restart-server-after-round", type=int, default=None,
                   help="fault drill: kill the SuperLink and ServerApp after this round, restart, resume "
                        "(default: none)")
    return ap


def main(argv=None) -> int:
    """``carbonfed deploy local ...``; exit code 0 after a finished run, 2 on an error, 128+n on a signal."""
    args = _parser().parse_args(argv)
    settings = settings_from(args)
    out = default_out(args.out, settings, prefix="deploy-")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    try:
        out = deploy_local(RunConfig(**settings), args.clients, out, kill_client_in_round=args.kill_client_in_round,
                           restart_server_after_round=args.restart_server_after_round, keys_dir=args.keys)
    except (ValueError, OSError, DeployError) as exc:
        print(f"carbonfed deploy: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as exc:
        code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 130
        print("carbonfed deploy: interrupted; every process it started is stopped", file=sys.stderr)
        return code
    report = json.loads((out / "report.json").read_text())
    m, t, p = report["metrics"], report["timing"], report["privacy"]
    print(f"held-out accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}"
          + (f"; ε_max={p['epsilon_max']:.4f} at δ={p['delta']}" if p else "")
          + f"; {t['per_round_s']:.1f}s per round; report: {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

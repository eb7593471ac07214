"""Independent audit of a run folder, with no keys: ``carbonfed verify RUN`` (or
``python -m carbonfed.privacy.audit.verify RUN``).

A signed run (one with ``charter.json``) is checked against the charter its clients endorsed,
with their public keys only (:mod:`carbonfed.privacy.charter`, :mod:`carbonfed.privacy.statements`):

1. **Charter.** Every client's endorsement verifies; with ``--trusted-keys`` (the enrolment's
   ``clients.pub.json``, obtained from the clients) or ``--charter-sha256`` (as they published
   it), the charter is anchored to the real clients. Without either, the verdict says that
   this is the one thing it could not check.
2. **Statements.** Every client fact is a statement its client signed, chained to its previous
   one; each client's chain is whole and reaches the charter's last round or its closing
   statement (:mod:`carbonfed.privacy.audit.signed`).
3. **Accounting.** Each client's ε is recomputed from its own signed history with an accountant
   that shares no code with the clients' (:mod:`carbonfed.privacy.audit.pld`) and checked
   against its claims and against the charter's budget (and ``--epsilon``, if stricter). No
   line the server wrote on its own (``resume``, round summaries, ``server.json``) removes or
   excuses a client fact; those are checked for contradicting the signed record
   (:mod:`carbonfed.privacy.audit.server_lines`).
4. **Files.** The aggregate files are the ones the clients signed they received, and none the
   ledger implies is missing (:mod:`carbonfed.privacy.audit.files`); report.json, report.html and
   privacy_statement.md state what was proved (:mod:`carbonfed.privacy.audit.claims`).

A run folder without ``charter.json`` fails: its facts are not signed by its clients, so any
party that wrote it could have written any of them (the verdict says UNSIGNED).

Guarantees: bad arguments (a non-finite or non-positive ``--epsilon``, ``--delta`` outside
(0, 1), a negative ``--rel-tol``) are errors (:class:`ValueError`; exit 2 on the command line),
never a check switched off. The result lists what was checked and what could not be.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from carbonfed.privacy.audit import claims, ddp_verify, files, server_lines, signed
from carbonfed.privacy.audit.histories import account_client, budget_problems
from carbonfed.privacy.audit.pld import ACCOUNTANT_NAME, VALUE_DISCRETIZATION_INTERVAL, accountant_version, pld_epsilon
from carbonfed.privacy.charter import CHARTER_FILE, Charter, check_charter
from carbonfed.privacy.ledger import LedgerError, check_chain, read_ledger
from carbonfed.privacy.signing import SigningError, load_public_keys

__all__ = ["VerifyResult", "verify_run", "check_arguments", "summary_text", "main", "pld_epsilon"]


@dataclass
class VerifyResult:
    ok: bool
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    per_client: dict[str, dict] = field(default_factory=dict)
    epsilon_max_claimed: float | None = None
    epsilon_max_recomputed: float | None = None
    epsilon_budget: float | None = None
    delta: float | None = None
    lines: int = 0
    accountant: str = ACCOUNTANT_NAME
    accountant_version: str = field(default_factory=accountant_version)
    value_discretization_interval: float = VALUE_DISCRETIZATION_INTERVAL
    signed: bool = False                  # a charter was found and parsed: the signed audit ran
    charter_sha256: str | None = None
    anchored: bool = False                # the charter matched a key list or SHA-256 given from outside
    statements_checked: int = 0           # ledger lines whose client signature verified
    files_matched: int = 0                # aggregate files matched to a hash the clients signed
    documents_checked: list[str] = field(default_factory=list)
    ddp: dict | None = None               # ddp+he: the central ε from the signed contributors of each round
    checked: list[str] = field(default_factory=list)       # what the verdict rests on
    not_checked: list[str] = field(default_factory=list)   # what it could not check, and why

    def to_dict(self) -> dict:
        return asdict(self)


def check_arguments(epsilon_budget: float | None, delta: float | None, rel_tol: float) -> None:
    """Refuse arguments that would switch a check off or make it meaningless."""
    if epsilon_budget is not None and not (isinstance(epsilon_budget, (int, float)) and math.isfinite(epsilon_budget)
                                           and epsilon_budget > 0):
        raise ValueError(f"--epsilon must be a positive finite number, got {epsilon_budget!r}")
    if delta is not None and not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"--delta must lie in (0, 1), got {delta!r}")
    if not (isinstance(rel_tol, (int, float)) and math.isfinite(rel_tol) and rel_tol >= 0):
        raise ValueError(f"--rel-tol must be a finite number >= 0, got {rel_tol!r}")


def _ledger_path(run: Path) -> Path:
    return run if run.is_file() else run / "ledger.jsonl"


def _read_json(path: Path, problems: list[str]) -> dict | None:
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        problems.append(f"{path.name}: unreadable ({exc})")
        return None
    if not isinstance(doc, dict):
        problems.append(f"{path.name}: not a JSON object")
        return None
    return doc


def verify_run(run_dir, epsilon_budget: float | None = None, delta: float | None = None, rel_tol: float = 0.05,
               trusted_keys=None, charter_sha256: str | None = None) -> VerifyResult:
    """Audit the run folder ``run_dir`` (or its ledger file) with no key. ``trusted_keys``: a path
    to, or the mapping of, the clients' public keys obtained from them; ``charter_sha256``: the
    charter's SHA-256 as the clients published it. A run without a charter fails."""
    check_arguments(epsilon_budget, delta, rel_tol)
    if isinstance(trusted_keys, (str, Path)):
        trusted_keys = load_public_keys(trusted_keys)
    run = Path(run_dir)
    folder = run.parent if run.is_file() else run
    res = VerifyResult(ok=False)
    server = _read_json(folder / "server.json", res.problems) or {}
    path = _ledger_path(run)
    try:
        records = read_ledger(path)
    except LedgerError as exc:
        res.problems.append(str(exc))
        return res
    res.lines = len(records)
    blanks = [i for i, line in enumerate(path.read_text().splitlines(), 1) if not line.strip()]
    if blanks:
        res.problems.append(f"{path}: blank line(s) {blanks}; line numbers below count non-blank lines")
    res.problems.extend(check_chain(records))
    if not records:
        res.problems.append(f"{path}: the ledger is empty")
    doc = _read_json(folder / CHARTER_FILE, res.problems)
    if doc is not None:
        _audit_signed(folder, records, doc, server, res, epsilon_budget, delta, rel_tol, trusted_keys, charter_sha256)
    elif not (folder / CHARTER_FILE).exists():
        res.problems.append(f"UNSIGNED: no {CHARTER_FILE} in {folder}: the run's facts are not signed by its "
                            "clients, so whoever wrote the folder could have written any of them")
        res.not_checked.append("everything: the run has no charter and no signed statement")
    res.ok = not res.problems
    return res


def _proven(res: VerifyResult, charter: Charter | None) -> dict:
    """What the audit established, in the keys documents state (:data:`claims.KEYS`)."""
    out = {"epsilon_max": res.epsilon_max_claimed,
           "epsilon_per_client": {w: e["claimed"] for w, e in res.per_client.items() if e["claimed"] is not None}}
    if charter is not None:
        out.update(privacy_mode=charter.privacy, rounds=charter.rounds,
                   epsilon_budget=charter.epsilon if charter.dp else None, delta=charter.delta if charter.dp else None)
        if not charter.dp:
            out.update(epsilon_max=None, epsilon_per_client=None)
    return out


def _account_ddp(charter: Charter, chains: dict, res: VerifyResult, rel_tol, records, valid) -> None:
    """3 (``ddp+he``): each client's Skellam history and the central ε of the signed rounds."""
    res.accountant = "ddp_epsilon (Skellam RDP in mpmath, dp_accounting conversion)"
    res.per_client, priors = ddp_verify.account_clients(chains, res.delta, rel_tol, res.problems)
    res.ddp = ddp_verify.central_epsilon(charter, records, chains, priors, valid, res.delta, res.problems)
    if res.ddp["epsilon"] > res.epsilon_budget:
        res.problems.append(f"central ε={res.ddp['epsilon']:.6g} of the signed rounds exceeds the budget "
                            f"ε={res.epsilon_budget:g} at δ={res.delta:g}")
    res.checked.append(f"central ε={res.ddp['epsilon']:.4f} recomputed with ddp_epsilon from {res.ddp['released_rounds']} "
                       f"released round(s), each at its signed contributors (floor {res.ddp['min_noise_clients']})")


def _account(charter: Charter, chains: dict, res: VerifyResult, epsilon_budget, delta, rel_tol,
             records=(), valid=frozenset()) -> None:
    """3. Each client from its own signed history; the budget of the charter (and --epsilon)."""
    res.delta = float(delta) if delta is not None else charter.delta
    if not charter.dp:
        res.notes.append(f"the charter's privacy mode is {charter.privacy!r}: no DP, no ε to re-account")
        return
    if charter.config["privacy"] == "ddp+he":
        res.epsilon_budget = min(charter.epsilon, epsilon_budget or math.inf)
        _account_ddp(charter, chains, res, rel_tol, records, valid)
        res.problems.extend(budget_problems(res.per_client, res.epsilon_budget, res.delta, "the budget"))
        return
    for who, chain in sorted(chains.items()):
        entry = account_client(who, signed.claims_of(who, chain), res.delta, charter.delta, rel_tol, res.problems)
        if entry is not None:
            res.per_client[who] = entry
        elif charter.roles[who] == "train":
            res.problems.append(f"{who}: a training client of a DP charter, but none of its signed statements "
                                "carries an accountant history")
    res.epsilon_budget = charter.epsilon
    res.problems.extend(budget_problems(res.per_client, charter.epsilon, res.delta, "the signed charter's"))
    if epsilon_budget is not None and epsilon_budget < charter.epsilon:
        res.epsilon_budget = float(epsilon_budget)
        res.problems.extend(budget_problems(res.per_client, res.epsilon_budget, res.delta, "--epsilon"))
    res.checked.append(f"ε of {len(res.per_client)} client(s) recomputed with {ACCOUNTANT_NAME} from their own signed "
                       f"histories, against the budget ε={res.epsilon_budget:g} at δ={res.delta:g}")


def _audit_signed(folder: Path, records: list[dict], doc: dict, server: dict, res: VerifyResult,
                  epsilon_budget, delta, rel_tol, trusted_keys, charter_sha256) -> None:
    cc = check_charter(doc, trusted_keys, charter_sha256)
    res.problems.extend(cc.problems)
    res.notes.extend(cc.notes)
    res.anchored = cc.anchored
    if cc.charter is None:
        res.not_checked.append("everything the charter fixes: charter.json is not a valid charter")
        return
    charter = cc.charter
    res.signed, res.charter_sha256 = True, charter.sha256
    counted, hashes = [0], {}
    per = signed.read_statements(records, charter, res.problems, counted, hashes)
    chains = {who: signed.check_chain(who, items, res.problems, res.notes, hashes) for who, items in sorted(per.items())}
    res.statements_checked = counted[0]
    signed.check_complete(charter, chains, records, res.problems)
    signed.check_plan(charter, chains, res.problems)
    valid = {n for items in per.values() for n, _ in items}
    _account(charter, chains, res, epsilon_budget, delta, rel_tol, records, valid)
    _extremes(res)
    server_lines.check_summaries(records, valid, res.problems, res.notes)
    last = max((st["round"] for c in chains.values() for _, st in c if st["kind"] != "close"), default=0)
    server_lines.check_server_json(server, charter, last, res.problems)
    res.files_matched = files.check_files(folder, records, chains, charter, res.problems)
    manifests = files.check_manifests(folder, records, res.problems)
    res.documents_checked = claims.check_documents(folder, _proven(res, charter), True, res.problems, res.notes)
    res.checked[:0] = [f"charter {charter.sha256[:12]}…: {len(charter.keys)} client endorsement(s)",
                       f"{res.statements_checked} signed statement(s) of {len(chains)} client(s), each client's chain "
                       f"whole through round {charter.rounds} or its closing statement"]
    res.checked.append(f"{res.files_matched} aggregate file(s) matched to what the clients signed they received"
                       + (f"; {manifests} against the server's manifests" if manifests else ""))
    if res.documents_checked:
        res.checked.append("stated figures of " + ", ".join(res.documents_checked))
    _not_checked(res, charter)


def _extremes(res: VerifyResult) -> None:
    claimed = [e["claimed"] for e in res.per_client.values() if e["claimed"] is not None]
    recomputed = [e["recomputed"] for e in res.per_client.values() if e["recomputed"] is not None]
    res.epsilon_max_claimed = max(claimed) if claimed else None
    res.epsilon_max_recomputed = max(recomputed) if recomputed else None


def _not_checked(res: VerifyResult, charter: Charter) -> None:
    if not res.anchored:
        res.not_checked.append("that the charter's public keys are the clients' own: give --trusted-keys "
                               "(clients.pub.json from the clients) or --charter-sha256; without it, a party that "
                               "rewrote the whole run folder with keys of its own would pass")
    res.not_checked.append("that each client ran the mechanisms it signed (a client's own honesty)")
    res.not_checked.append("the content of aggregates no client received (each round's metrics"
                           + (", the averaged model" if charter.config.get("average-last", 1) > 1 else "")
                           + "): bound in their check slots, which only the key holders' report can read")


# -- command line --------------------------------------------------------------------------------

def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def summary_text(res: VerifyResult, run_dir) -> str:
    out = [f"ledger: {_ledger_path(Path(run_dir))} ({res.lines} lines)"
           + (f", charter {res.charter_sha256[:16]}…" if res.charter_sha256 else ", UNSIGNED (no charter.json)"),
           f"accountant: {res.accountant} {res.accountant_version} "
           f"(value_discretization_interval={res.value_discretization_interval:g}), δ={res.delta}",
           f"clients with an accountant history: {len(res.per_client)}",
           f"ε max: claimed {_fmt(res.epsilon_max_claimed)}, recomputed {_fmt(res.epsilon_max_recomputed)}, "
           f"budget {res.epsilon_budget if res.epsilon_budget is not None else '-'}"]
    groups: dict[tuple, list[str]] = {}
    for who, e in res.per_client.items():
        groups.setdefault((e["claimed"], e["recomputed"]), []).append(who)
    for (cl, rc), names in sorted(groups.items(), key=lambda kv: -(kv[0][1] or 0)):
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        out.append(f"  claimed {_fmt(cl)}  recomputed {_fmt(rc)}  {len(names)} client(s): {shown}")
    out += [f"checked: {c}" for c in res.checked] + [f"NOT checked: {c}" for c in res.not_checked]
    out += [f"note: {n}" for n in res.notes]
    if res.ok:
        out.append("OK (signed): every signature verified, every client's history whole"
                   + (", every claim re-accounted" if res.per_client else " (no DP claims to re-account)")
                   + (", every client within budget" if res.epsilon_budget is not None and res.per_client else "")
                   + ("; the charter is anchored" if res.anchored else "; NOT anchored (see NOT checked)"))
    else:
        out.append(f"FAILED: {len(res.problems)} problem(s)")
        out += [f"  - {p}" for p in res.problems]
    return "\n".join(out)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="carbonfed verify",
                                 description="Check a run folder with no keys: the clients' signatures, each client's "
                                             "ε re-accounted with an independent accountant (dp_accounting PLD), the "
                                             "budget of the signed charter, the aggregate files and the reports.")
    ap.add_argument("run_dir", metavar="DIR", help="run folder holding ledger.jsonl, charter.json and server.json")
    ap.add_argument("--epsilon", type=float, default=None, help="a budget of your own (checked if below the charter's)")
    ap.add_argument("--delta", type=float, default=None, help="recompute ε at this δ (default: the charter's)")
    ap.add_argument("--rel-tol", type=float, default=0.05, help="allowed relative gap claimed vs recomputed ε")
    ap.add_argument("--trusted-keys", default=None, metavar="FILE",
                    help="clients.pub.json obtained from the clients: anchors the charter's keys")
    ap.add_argument("--charter-sha256", default=None, metavar="HEX", help="the charter's SHA-256 as the clients published it")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    return ap


def main(argv=None) -> int:
    ap = _parser()
    ap.error = lambda message: ap.exit(2, f"{ap.prog}: error: {message}\n")   # one line, no usage block
    args = ap.parse_args(argv)
    try:
        res = verify_run(args.run_dir, epsilon_budget=args.epsilon, delta=args.delta, rel_tol=args.rel_tol,
                         trusted_keys=args.trusted_keys, charter_sha256=args.charter_sha256)
    except (ValueError, SigningError) as exc:
        ap.error(str(exc))           # exits 2
    print(json.dumps(res.to_dict(), indent=2) if args.json else summary_text(res, args.run_dir))
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Independent audit of a run's privacy ledger: ``python -m carbonfed.privacy.audit.verify DIR``.

What it checks, for ``DIR/ledger.jsonl`` (and ``DIR/server.json`` when present):

1. **Chain.** Every line parses and the hash chain is intact
   (:func:`carbonfed.privacy.ledger.check_chain`); a break is reported with its line number.
2. **Claims.** For every client (country), the last ``stats``/``train`` line that carries a
   ``history`` is re-accounted with an accountant that shares no code with the clients':
   Google's ``dp_accounting`` PLD accountant (the clients use Opacus's PRV accountant). A claimed
   ε that differs from the recomputed one by more than ``rel_tol`` (relative) is a problem.
   Along each client's lines the history may only grow (each history extends the one before it),
   so total steps never decrease; ε never decreases (beyond the PRV error bound); a train line's
   last mechanism is the ``(noise_multiplier, sample_rate, steps)`` it reports, and its
   ``total_steps`` is the sum of the history's steps.
3. **Budget.** No client's recomputed (or claimed) ε exceeds the budget: ``epsilon_budget``, else
   ``server.json["config"]["epsilon"]``.
4. **Round lines.** Each ``round`` line's ``accepted``/``rejected`` counts and ``epsilon_max``
   match the train lines of that round, and ``server.json["rounds_completed"]`` rounds all have
   their summary line (a hash chain alone cannot show that its tail was cut off).
5. **Attestations** (with ``--keys DIR``, the key holders' secret context). Every ``stats`` and
   ``train`` line that carries client facts carries the client's HMAC of them
   (:mod:`carbonfed.privacy.attest`), and it matches the line's country, kind, stage, round, facts and the
   run config's digest: the server, which holds no secret context, wrote what the clients sent.

Limits (see ``threat_model.md``): the ledger is written by the server from facts the clients
report. The chain detects editing, deleting, inserting or reordering lines after they were
written, but not a ledger rewritten from scratch by its writer (the hash chain is not signed or
anchored outside the server); the attestations (HE runs, checked with the keys) detect a
rewritten or invented client fact, not a dropped line or a forgery by a key holder (all clients
share one key). Re-accounting checks that a client's *claims* are consistent with its
*reported* mechanisms, not that it ran them.

Accuracy: with ``value_discretization_interval=1e-3`` the PLD ε (pessimistic estimate) is
within about 1.1% of Opacus's PRV ε on this project's mechanisms, always slightly below it
(PRV returns an upper bound padded by its ``eps_error=0.01``); see ``tests/test_verify.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from carbonfed.privacy.ledger import LedgerError, check_chain, read_ledger

ACCOUNTANT_NAME = "dp_accounting.pld"
VALUE_DISCRETIZATION_INTERVAL = 1e-3
# Opacus's PRV estimate may be off by up to its eps_error (0.01) in either direction of the true
# ε, so a client's claimed ε may dip by that much between two histories that barely differ.
MONOTONE_SLACK = 0.01
# Floats in the ledger are JSON round-trips of Python floats: compare mechanisms exactly up to
# this relative slack only.
_FLOAT_SLACK = 1e-12


def accountant_version() -> str:
    try:
        return metadata.version("dp-accounting")
    except metadata.PackageNotFoundError:  # pragma: no cover - installed as a dependency
        return "unknown"


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
    attestations_checked: int | None = None   # lines whose client attestation matched; None: not checked

    def to_dict(self) -> dict:
        return asdict(self)


# -- the independent accountant ------------------------------------------------------------------

def _canonical_history(history) -> tuple[tuple[float, float, int], ...]:
    """Group identical mechanisms: composition is commutative, and one self-composition of
    ``k`` steps is much faster (and no less exact) than ``k`` separate ones."""
    steps: Counter = Counter()
    for sig, q, st in history:
        steps[(float(sig), float(q))] += int(st)
    return tuple(sorted((sig, q, n) for (sig, q), n in steps.items() if n > 0))


@functools.lru_cache(maxsize=4096)
def _pld_epsilon(history: tuple, delta: float) -> float:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    acc = PLDAccountant(value_discretization_interval=VALUE_DISCRETIZATION_INTERVAL)
    for sig, q, steps in history:
        event = dp_accounting.GaussianDpEvent(sig)
        if q < 1.0:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        acc.compose(event, int(steps))
    return float(acc.get_epsilon(delta))


def pld_epsilon(history, delta: float) -> float:
    """ε at ``delta`` of ``(noise_multiplier, sample_rate, steps)`` mechanisms, by dp_accounting's
    PLD accountant (add-or-remove-one neighbours, as Opacus). Memoised on the grouped history."""
    canon = _canonical_history(history)
    if not canon:
        return 0.0
    return _pld_epsilon(canon, float(delta))


# -- helpers -------------------------------------------------------------------------------------

def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _FLOAT_SLACK * max(1.0, abs(a), abs(b))


def _parse_history(raw, where: str, problems: list[str]) -> list[tuple[float, float, int]] | None:
    if not isinstance(raw, list):
        problems.append(f"{where}: history is not a list")
        return None
    out = []
    for i, item in enumerate(raw):
        try:
            sig, q, st = item
            sig, q = float(sig), float(q)
            if isinstance(st, bool) or float(st) != int(st):
                raise ValueError
            st = int(st)
        except (TypeError, ValueError):
            problems.append(f"{where}: history entry {i} is {item!r}, expected [noise_multiplier, sample_rate, steps]")
            return None
        if not (math.isfinite(sig) and sig > 0 and 0 < q <= 1 and st >= 1):
            problems.append(f"{where}: history entry {i} {item!r} is not a valid mechanism "
                            "(noise multiplier > 0, 0 < sample rate <= 1, steps >= 1)")
            return None
        out.append((sig, q, st))
    return out


def _is_prefix(a: list, b: list) -> bool:
    return len(a) <= len(b) and all(_close(x[0], y[0]) and _close(x[1], y[1]) and x[2] == y[2]
                                    for x, y in zip(a, b))


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _ledger_path(run_dir: Path) -> Path:
    return run_dir if run_dir.is_file() else run_dir / "ledger.jsonl"


def _blank_lines(path: Path) -> list[int]:
    return [i for i, line in enumerate(path.read_text().splitlines(), 1) if not line.strip()]


# -- the audit -----------------------------------------------------------------------------------

def _effective_lines(records: list[dict]) -> list[tuple[int, dict]]:
    """(line number, record) pairs, without the lines a server restart superseded.

    A ``resume`` line at seq s with ``checkpoint_lines`` c marks lines c..s-1 as belonging to a
    round that was interrupted and is run again; the clients' later lines carry their full
    accountant history, so what those lines spent is still accounted.
    """
    superseded: set[int] = set()
    for rec in records:
        if rec.get("kind") == "resume" and isinstance(rec.get("checkpoint_lines"), int):
            superseded.update(range(rec["checkpoint_lines"], int(rec.get("seq", 0))))
    return [(n, rec) for n, rec in enumerate(records, 1) if n - 1 not in superseded]


def verify_run(run_dir, epsilon_budget: float | None = None, delta: float | None = None,
               rel_tol: float = 0.05, keys_dir=None) -> VerifyResult:
    """Audit ``run_dir/ledger.jsonl`` (``run_dir`` may also be the ledger file itself); with
    ``keys_dir`` (holding the key holders' ``secret.ctx``), check the clients' attestations too."""
    run = Path(run_dir)
    path = _ledger_path(run)
    res = VerifyResult(ok=False)
    problems, notes = res.problems, res.notes

    # server.json: the config the server ran with (optional).
    server: dict = {}
    server_json = (run if run.is_dir() else run.parent) / "server.json"
    if server_json.is_file():
        try:
            server = dict(json.loads(server_json.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            problems.append(f"{server_json}: unreadable ({exc})")
    config = server.get("config") if isinstance(server.get("config"), dict) else {}

    # 1. the chain
    try:
        records = read_ledger(path)
    except LedgerError as exc:
        problems.append(str(exc))
        return res
    res.lines = len(records)
    blanks = _blank_lines(path)
    if blanks:
        problems.append(f"{path}: blank line(s) {blanks}; line numbers below count non-blank lines")
    problems.extend(check_chain(records))
    if not records:
        problems.append(f"{path}: the ledger is empty")

    # δ the claims were made at: the ledger's (train lines carry it), else server.json's.
    ledger_deltas = {float(r["delta"]) for r in records if _num(r.get("delta")) is not None}
    if len(ledger_deltas) > 1:
        problems.append(f"ledger lines carry different δ values: {sorted(ledger_deltas)}")
    claim_delta = (min(ledger_deltas) if ledger_deltas else _num(config.get("delta")))
    if claim_delta is not None and _num(config.get("delta")) is not None and ledger_deltas \
            and not any(_close(d, float(config["delta"])) for d in ledger_deltas):
        problems.append(f"server.json δ={config['delta']} differs from the ledger's δ={sorted(ledger_deltas)}")
    res.delta = float(delta) if delta is not None else claim_delta
    if claim_delta is None:
        claim_delta = res.delta      # the claims name no δ: take the caller's
    if epsilon_budget is None and _num(config.get("epsilon")) is not None:
        epsilon_budget = float(config["epsilon"])
    res.epsilon_budget = epsilon_budget

    # 2. per-client claims
    clients: dict[str, list[tuple[int, dict]]] = {}
    unreported: dict[str, list[int]] = {}   # train requests that may have spent ε off the record
    effective = _effective_lines(records)
    for n, rec in effective:
        if rec.get("kind") in ("stats", "train"):
            who = str(rec.get("country") or f"node-{rec.get('node_id')}")
            if "history" in rec:
                clients.setdefault(who, []).append((n, rec))
            elif rec.get("kind") == "train" and (rec.get("status") == "missing"
                                                 or str(rec.get("reason", "")).startswith("client error")):
                unreported.setdefault(who, []).append(n)

    dp_run = any(rec.get("history") for lines in clients.values() for _, rec in lines)
    if str(config.get("privacy", "")) in ("dp", "dp+he") and not dp_run:
        problems.append("server.json says DP is on but no ledger line carries a client's accountant history")
    if dp_run and res.delta is None:
        problems.append("no δ in the ledger lines, server.json or arguments: cannot recompute ε")
    if dp_run and epsilon_budget is None:
        notes.append("no ε budget given and none in server.json: budget not checked")
    if not dp_run:
        notes.append("no client reported an accountant history: this run has no DP guarantee to re-account")
        clients = {}

    for who, lines in sorted(clients.items()):
        prev_hist: list | None = None
        prev_eps: float | None = None
        prev_line = 0
        final = None  # (line no, record, parsed history)
        for n, rec in lines:
            where = f"line {n} ({who}, {rec.get('kind')} round {rec.get('round')})"
            hist = _parse_history(rec["history"], where, problems)
            if hist is None:
                continue
            claimed = _num(rec.get("epsilon"))
            if hist and claimed is None:
                problems.append(f"{where}: history of {len(hist)} mechanism(s) but no numeric ε claimed")
            total = sum(st for *_, st in hist)
            if rec.get("kind") == "train" and all(k in rec for k in ("noise_multiplier", "sample_rate", "steps")) \
                    and rec.get("status") != "refused":
                mech = (_num(rec["noise_multiplier"]), _num(rec["sample_rate"]), rec["steps"])
                if not hist or not (mech[0] is not None and mech[1] is not None and _close(hist[-1][0], mech[0])
                                    and _close(hist[-1][1], mech[1]) and hist[-1][2] == mech[2]):
                    problems.append(f"{where}: reports mechanism (σ={rec['noise_multiplier']}, q={rec['sample_rate']}, "
                                    f"steps={rec['steps']}) but its history ends with "
                                    f"{list(hist[-1]) if hist else 'nothing'}")
            if "total_steps" in rec and rec["total_steps"] != total:
                problems.append(f"{where}: total_steps={rec['total_steps']} but its history sums to {total} steps")
            if rec.get("kind") == "stats" and hist and not (hist[-1][1] == 1.0 and hist[-1][2] == 1):
                problems.append(f"{where}: a statistics release is one unsubsampled step, history ends with {list(hist[-1])}")
            if prev_hist is not None:
                prev_total = sum(st for *_, st in prev_hist)
                trained = rec.get("steps") if rec.get("kind") == "train" and rec.get("status") != "refused" else None
                if total < prev_total:
                    problems.append(f"{where}: total steps fell from {prev_total} (line {prev_line}) to {total}")
                elif isinstance(trained, int) and total < prev_total + trained:
                    problems.append(f"{where}: reports {trained} steps trained but its history grew by only "
                                    f"{total - prev_total} steps since line {prev_line}")
                elif not _is_prefix(prev_hist, hist):
                    problems.append(f"{where}: history does not extend the history at line {prev_line}; "
                                    "an accountant only ever appends mechanisms")
            if claimed is not None and prev_eps is not None and claimed < prev_eps - MONOTONE_SLACK:
                problems.append(f"{where}: claimed ε fell from {prev_eps:.6g} (line {prev_line}) to {claimed:.6g}")
            prev_hist, prev_line = hist, n
            if claimed is not None:
                prev_eps = claimed
            final = (n, rec, hist)
        if final is None:
            continue
        n, rec, hist = final
        claimed = _num(rec.get("epsilon"))
        entry = {"line": n, "kind": rec.get("kind"), "round": rec.get("round"), "status": rec.get("status"),
                 "claimed": claimed, "recomputed": None, "history": [list(h) for h in hist],
                 "total_steps": sum(st for *_, st in hist)}
        if hist and res.delta is not None:
            entry["recomputed"] = pld_epsilon(hist, res.delta)
            at_claim = entry["recomputed"]
            if claim_delta is not None and not _close(claim_delta, res.delta):
                at_claim = pld_epsilon(hist, claim_delta)
                entry["recomputed_at_ledger_delta"] = at_claim
            gap = abs(claimed - at_claim) / max(at_claim, 1e-12) if claimed is not None else 0.0
            if gap > rel_tol:
                problems.append(f"line {n} ({who}): claimed ε={claimed:.6g} but {ACCOUNTANT_NAME} recomputes "
                                f"ε={at_claim:.6g} from its history at δ={claim_delta:g} "
                                f"(relative difference {gap:.1%} > {rel_tol:.1%})")
        elif not hist:
            entry["recomputed"] = 0.0
        res.per_client[who] = entry

    if dp_run:
        for who, ns in sorted(unreported.items()):
            notes.append(f"{who}: train request(s) at line(s) {ns} ended in a client error or no reply, so the "
                         "ledger has no accountant history for them; if the client ran DP-SGD before failing, "
                         "ε it spent may be missing from the ledger (and, after a client error, from its own "
                         "accountant)")

    # 3. the budget
    if epsilon_budget is not None:
        for who, e in sorted(res.per_client.items()):
            rec_eps, cl = e["recomputed"], e["claimed"]
            if rec_eps is not None and rec_eps > epsilon_budget:
                problems.append(f"{who}: recomputed ε={rec_eps:.6g} (claimed ε={cl if cl is None else format(cl, '.6g')}) "
                                f"exceeds the budget ε={epsilon_budget:g} at δ={res.delta:g} (line {e['line']})")
            elif cl is not None and cl > epsilon_budget:
                problems.append(f"{who}: claimed ε={cl:.6g} (recomputed ε={rec_eps if rec_eps is None else format(rec_eps, '.6g')}) "
                                f"exceeds the budget ε={epsilon_budget:g} (line {e['line']})")

    claimed_all = [e["claimed"] for e in res.per_client.values() if e["claimed"] is not None]
    recomputed_all = [e["recomputed"] for e in res.per_client.values() if e["recomputed"] is not None]
    res.epsilon_max_claimed = max(claimed_all) if claimed_all else None
    res.epsilon_max_recomputed = max(recomputed_all) if recomputed_all else None

    # 4. round summaries against the lines of their round
    train_by_round: dict = {}
    for _, rec in effective:
        if rec.get("kind") == "train":
            train_by_round.setdefault(rec.get("round"), []).append(rec)
    for n, rec in effective:
        if rec.get("kind") != "round":
            continue
        rnd = rec.get("round")
        train = train_by_round.get(rnd, [])
        acc = sum(1 for r in train if r.get("status") == "accepted")
        if "accepted" in rec and rec["accepted"] != acc:
            problems.append(f"line {n} (round {rnd} summary): accepted={rec['accepted']} but {acc} train lines "
                            "of that round are accepted")
        if "rejected" in rec and rec["rejected"] != len(train) - acc:
            problems.append(f"line {n} (round {rnd} summary): rejected={rec['rejected']} but {len(train) - acc} "
                            "train lines of that round are not accepted")
        eps = [_num(r.get("epsilon")) for r in train if _num(r.get("epsilon")) is not None]
        if "epsilon_max" in rec:
            want = max(eps) if eps else None
            got = _num(rec["epsilon_max"])
            if (want is None) != (got is None) or (want is not None and not _close(want, got)):
                problems.append(f"line {n} (round {rnd} summary): epsilon_max={rec['epsilon_max']} but the "
                                f"largest ε on that round's train lines is {want}")

    _check_attestations(records, config, keys_dir, res)

    # A hash chain cannot show that its tail was cut off; server.json's round count can.
    completed = server.get("rounds_completed")
    if isinstance(completed, int) and not isinstance(completed, bool):
        have = {r.get("round") for r in records if r.get("kind") == "round"}
        lost = [k for k in range(1, completed + 1) if k not in have]
        if lost:
            problems.append(f"server.json says {completed} round(s) completed but the ledger has no summary line for "
                            f"round(s) {lost}: lines are missing from the end of the ledger")

    res.ok = not problems
    return res


def _check_attestations(records: list[dict], config: dict, keys_dir, res: VerifyResult) -> None:
    """5. Every line that carries client facts carries the client's attestation of it
    (:mod:`carbonfed.privacy.attest`), checked with the key holders' secret context in ``keys_dir``."""
    from carbonfed.privacy.attest import FIELD, LEDGER_FACTS, attestation_key, check_line
    from carbonfed.privacy.he import SECRET_CONTEXT_FILE

    facts = [(n, rec) for n, rec in enumerate(records, 1)
             if rec.get("kind") in ("stats", "train") and any(k in rec for k in LEDGER_FACTS)]
    signed = sum(1 for _, rec in facts if FIELD in rec)
    he_run = str(config.get("privacy", "")) in ("he", "dp+he")
    if keys_dir is None:
        if signed:
            res.notes.append(f"{signed} client attestation(s) not checked: give the key holders' secret "
                             "context (--keys DIR) to check that the server wrote what the clients sent")
        return
    if config and not he_run:
        res.notes.append("a run without HE: its clients hold no key and attest nothing")
        return
    path = Path(keys_dir) / SECRET_CONTEXT_FILE
    if not path.is_file():
        res.problems.append(f"attestations: no secret context at {path}")
        return
    if not config:
        res.problems.append("attestations: server.json holds no run config, and attestations cover its digest")
        return
    from carbonfed.federation.config import RunConfig

    try:
        digest = RunConfig.from_flower(config).digest()
    except ValueError as exc:
        res.problems.append(f"attestations: server.json's config is not a valid run config: {exc}")
        return
    if facts and not signed:
        res.problems.append(f"attestations: none of the {len(facts)} ledger lines of client facts carries a client "
                            "attestation, in a run with HE: a ledger written before carbonfed recorded them, or "
                            "one stripped of them; its client facts rest on the hash chain alone")
        return
    key = attestation_key(path)
    bad = 0
    for n, rec in facts:
        why = check_line(key, rec, digest)
        if why:
            bad += 1
            res.problems.append(f"line {n} ({rec.get('country')}, {rec.get('kind')} round {rec.get('round')}): {why}")
    res.attestations_checked = len(facts) - bad


# -- command line --------------------------------------------------------------------------------

def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def summary_text(res: VerifyResult, run_dir) -> str:
    out = [f"ledger: {_ledger_path(Path(run_dir))} ({res.lines} lines)",
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
    if res.attestations_checked is not None:
        out.append(f"client attestations: {res.attestations_checked} line(s) match what the clients sent")
    out += [f"note: {n}" for n in res.notes]
    if res.ok and res.per_client:
        out.append("OK: chain intact, every claim re-accounted"
                   + (", every client within budget" if res.epsilon_budget is not None else "")
                   + (", every client fact attested" if res.attestations_checked is not None else ""))
    elif res.ok:
        out.append("OK: chain intact (no DP claims to re-account)")
    else:
        out.append(f"FAILED: {len(res.problems)} problem(s)")
        out += [f"  - {p}" for p in res.problems]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="carbonfed verify",
                                 description="Check a run's ledger chain and re-account every client's ε "
                                             "with an independent accountant (dp_accounting PLD).")
    ap.add_argument("run_dir", metavar="DIR", help="run directory holding ledger.jsonl (and server.json)")
    ap.add_argument("--epsilon", type=float, default=None, help="ε budget (default: server.json config)")
    ap.add_argument("--delta", type=float, default=None, help="δ (default: the ledger's / server.json's)")
    ap.add_argument("--rel-tol", type=float, default=0.05, help="allowed relative gap claimed vs recomputed ε")
    ap.add_argument("--keys", default=None, metavar="DIR",
                    help="folder with the key holders' secret.ctx: also check the clients' attestations")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    res = verify_run(args.run_dir, epsilon_budget=args.epsilon, delta=args.delta, rel_tol=args.rel_tol,
                     keys_dir=args.keys)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        print(summary_text(res, args.run_dir))
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())

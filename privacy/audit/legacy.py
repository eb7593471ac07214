"""Unsigned ledgers (no ``charter.json``: written before clients signed their facts).

TRANSITIONAL: kept so that runs of the current federation code still audit; to be removed when
the clients sign their statements (issue 18, phase 2), after which a run without a charter is
a failure, not a weaker pass.

Everything in an unsigned ledger may have been written by the server: the checks here show
internal consistency only (the chain, re-accounting of each client's histories, round summaries,
``server.json``'s round count) and, with the key holders' secret context, the clients' HMAC
attestations (:mod:`carbonfed.privacy.attest`). As before, a ``resume`` line marks the lines of
an interrupted round as superseded: in an unsigned ledger that is the server's word, and the
verdict says that the ledger is unsigned.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from carbonfed.privacy.attest import FIELD, LEDGER_FACTS, attestation_key, check_line
from carbonfed.privacy.audit.histories import Claim, account_client, budget_problems, close, num
from carbonfed.privacy.audit.server_lines import summary_problems
from carbonfed.privacy.he import SECRET_CONTEXT_FILE

UNSIGNED_NOTE = ("UNSIGNED ledger (no charter.json): its client facts are not signed by the clients, so every line "
                 "could have been written by the server; the checks show internal consistency only")
# Run-config keys RunConfig.digest() leaves out; the attestations cover the digest of the rest.
_DIGEST_SKIPS = ("data-dir", "keys-dir", "out-dir", "min-nodes")


def config_digest(config: dict) -> str:
    """The run-config digest the attestations cover, from ``server.json``'s full config (as
    ``carbonfed.federation.config.RunConfig.digest`` computes it from the same settings)."""
    d = {k.replace("-", "_"): v for k, v in config.items() if k not in _DIGEST_SKIPS}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def effective_lines(records: list[dict]) -> list[tuple[int, dict]]:
    """(line number, record) pairs, without the lines a ``resume`` line marks as superseded."""
    superseded: set[int] = set()
    for rec in records:
        if rec.get("kind") == "resume" and isinstance(rec.get("checkpoint_lines"), int):
            superseded.update(range(rec["checkpoint_lines"], int(rec.get("seq", 0))))
    return [(n, rec) for n, rec in enumerate(records, 1) if n - 1 not in superseded]


def _claims(effective: list[tuple[int, dict]]) -> tuple[dict[str, list[Claim]], dict[str, list[int]]]:
    clients: dict[str, list[Claim]] = {}
    unreported: dict[str, list[int]] = {}
    for n, rec in effective:
        if rec.get("kind") not in ("stats", "train"):
            continue
        who = str(rec.get("country") or f"node-{rec.get('node_id')}")
        if "history" in rec:
            clients.setdefault(who, []).append(Claim(f"line {n} ({who}, {rec.get('kind')} round {rec.get('round')})",
                                                     n, rec["kind"], rec.get("round"), rec.get("status") == "refused", rec))
        elif rec.get("kind") == "train" and (rec.get("status") == "missing"
                                             or str(rec.get("reason", "")).startswith("client error")):
            unreported.setdefault(who, []).append(n)
    return clients, unreported


def _summaries(records: list[dict], effective: list[tuple[int, dict]], server: dict, problems: list[str]) -> None:
    train: dict = {}
    for _, rec in effective:
        if rec.get("kind") == "train":
            train.setdefault(rec.get("round"), []).append(rec)
    for n, rec in effective:
        if rec.get("kind") == "round":
            lines = train.get(rec.get("round"), [])
            eps = [e for r in lines if (e := num(r.get("epsilon"))) is not None]
            problems.extend(summary_problems(n, rec, lines, eps, "on that round's train lines"))
    completed = server.get("rounds_completed")
    if isinstance(completed, int) and not isinstance(completed, bool):
        have = {r.get("round") for r in records if r.get("kind") == "round"}
        lost = [k for k in range(1, completed + 1) if k not in have]
        if lost:
            problems.append(f"server.json says {completed} round(s) completed but the ledger has no summary line for "
                            f"round(s) {lost}: lines are missing from the end of the ledger")


def _attestations(records: list[dict], config: dict, keys_dir, res) -> None:
    """The clients' HMAC attestations, checked with the secret context in ``keys_dir``."""
    facts = [(n, rec) for n, rec in enumerate(records, 1)
             if rec.get("kind") in ("stats", "train") and any(k in rec for k in LEDGER_FACTS)]
    signed = sum(1 for _, rec in facts if FIELD in rec)
    if keys_dir is None:
        if signed:
            res.notes.append(f"{signed} client attestation(s) not checked: give the key holders' secret "
                             "context (--keys DIR) to check that the server wrote what the clients sent")
        return
    if config and str(config.get("privacy", "")) not in ("he", "dp+he"):
        res.notes.append("a run without HE: its clients hold no key and attest nothing")
        return
    path = Path(keys_dir) / SECRET_CONTEXT_FILE
    if not path.is_file() or not config:
        res.problems.append(f"attestations: no secret context at {path}" if not path.is_file() else
                            "attestations: server.json holds no run config, and attestations cover its digest")
        return
    if facts and not signed:
        res.problems.append(f"attestations: none of the {len(facts)} ledger lines of client facts carries a client "
                            "attestation, in a run with HE: a ledger written before carbonfed recorded them, or "
                            "one stripped of them; its client facts rest on the hash chain alone")
        return
    key, digest, bad = attestation_key(path), config_digest(config), 0
    for n, rec in facts:
        why = check_line(key, rec, digest)
        if why:
            bad += 1
            res.problems.append(f"line {n} ({rec.get('country')}, {rec.get('kind')} round {rec.get('round')}): {why}")
    res.attestations_checked = len(facts) - bad


def _deltas(records: list[dict], config: dict, delta: float | None, res) -> float | None:
    """δ the claims were made at (the lines', else server.json's); sets ``res.delta``, the δ to
    recompute at (the caller's ``delta`` if given)."""
    ledger_deltas = {float(r["delta"]) for r in records if num(r.get("delta")) is not None}
    if len(ledger_deltas) > 1:
        res.problems.append(f"ledger lines carry different δ values: {sorted(ledger_deltas)}")
    cfg_delta = num(config.get("delta"))
    claim_delta = min(ledger_deltas) if ledger_deltas else cfg_delta
    if cfg_delta is not None and ledger_deltas and not any(close(d, cfg_delta) for d in ledger_deltas):
        res.problems.append(f"server.json δ={config['delta']} differs from the ledger's δ={sorted(ledger_deltas)}")
    res.delta = float(delta) if delta is not None else claim_delta
    return claim_delta if claim_delta is not None else res.delta


def audit_unsigned(records: list[dict], server: dict, res, epsilon_budget: float | None, delta: float | None,
                   rel_tol: float, keys_dir) -> None:
    """The consistency audit of an unsigned ledger, into ``res`` (a VerifyResult)."""
    config = server.get("config") if isinstance(server.get("config"), dict) else {}
    res.notes.insert(0, UNSIGNED_NOTE)
    claim_delta = _deltas(records, config, delta, res)
    if epsilon_budget is None and num(config.get("epsilon")) is not None:
        epsilon_budget = float(config["epsilon"])
    res.epsilon_budget = epsilon_budget
    effective = effective_lines(records)
    clients, unreported = _claims(effective)
    dp_run = any(c.facts.get("history") for cs in clients.values() for c in cs)
    if str(config.get("privacy", "")) in ("dp", "dp+he") and not dp_run:
        res.problems.append("server.json says DP is on but no ledger line carries a client's accountant history")
    if dp_run and res.delta is None:
        res.problems.append("no δ in the ledger lines, server.json or arguments: cannot recompute ε")
    if dp_run and epsilon_budget is None:
        res.notes.append("no ε budget given and none in server.json: budget not checked")
    if not dp_run:
        res.notes.append("no client reported an accountant history: this run has no DP guarantee to re-account")
        clients = {}
    for who, claims in sorted(clients.items()):
        entry = account_client(who, claims, res.delta, claim_delta, rel_tol, res.problems)
        if entry is not None:
            res.per_client[who] = entry
    for who, ns in sorted(unreported.items()) if dp_run else ():
        res.notes.append(f"{who}: train request(s) at line(s) {ns} ended in a client error or no reply, so the "
                         "ledger has no accountant history for them; if the client ran DP-SGD before failing, ε it "
                         "spent may be missing from the ledger (and, after a client error, from its own accountant)")
    if epsilon_budget is not None:
        res.problems.extend(budget_problems(res.per_client, epsilon_budget, res.delta, "server.json or --epsilon"))
    _summaries(records, effective, server, res.problems)
    _attestations(records, config, keys_dir, res)
    res.not_checked.append("who wrote the client facts: the ledger is unsigned (no charter.json)")

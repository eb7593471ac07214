"""The clients' signed histories in a ledger, checked against the charter with public keys only.

Guarantees (each failure is a problem naming the line, or the client)
--------------------------------------------------------------------
* **Signatures.** Every statement is signed by the client it names, under a key the charter
  lists, for this charter (:func:`carbonfed.privacy.statements.statement_problem`).
* **Lines agree with statements.** The server's line (kind, round, stage, country, status and
  any fact it repeats at the top level) says what the statement it carries says: a statement
  moved to another client, round or kind, or a fact edited beside it, is named.
* **Nothing accepted is unsigned.** A contribution the server accepted (``stats``, ``train``,
  ``evaluate`` line with status ``accepted``) carries its client's statement.
* **Each client's chain is whole.** Its statements are numbered 0, 1, 2, ... and each names the
  hash of the one before: a deleted statement (a gap), a reordered one, a fork (two statements
  with one number) and a statement replayed after later ones are named. The same statement
  twice in a row (a reply the client replayed to a restarted server) counts once.
* **Each history reaches its end.** A chain can only be cut at its end without a gap, so every
  client of the charter must end with its ``close`` statement or a statement of the charter's
  last round; otherwise its later statements may have been cut (a truncated last round, a
  dropped client) and it is named. A ``close`` is final: a statement after it is named (else a
  server could ask for an early close, go on, and cut what followed).
* **The plan.** Roles (train clients release statistics and train, test clients evaluate), δ,
  the DP-SGD sample rate and steps per round, the statistics stages and rounds are the
  charter's; an aggregate a client accepted summed at least ``min-train-clients`` contributions.

What the server wrote on its own authority (``resume`` lines, round summaries, missing and
rejected lines) is never used to drop or excuse a statement: the accounting
(:mod:`carbonfed.privacy.audit.histories`) reads each client's own chain only.
"""

from __future__ import annotations

from carbonfed.privacy.audit.histories import Claim, close, num
from carbonfed.privacy.charter import Charter
from carbonfed.privacy.statements import FACT_KEYS, FIELD, GENESIS, checked_statement, statement_hash

Chain = list[tuple[int, dict]]      # a client's distinct statements, in seq order: (first line, statement)
Hashes = dict[int, str]             # line -> the statement_hash of the valid statement it carries
ROLE_KINDS = {"train": ("stats", "train", "close"), "test": ("evaluate", "close")}
_LINE_STATUS = {"ok": ("accepted", "rejected"), "refused": ("refused",), "error": ("rejected",)}
# Facts only a client states; a line's own ``reason`` and ``delta`` are the server's.
_CLIENT_ONLY = tuple(k for k in FACT_KEYS if k not in ("reason", "delta"))


def _label(who, kind, rnd, stage=None) -> str:
    return f"{who}, {kind}{f' stage {stage}' if stage and stage != 1 else ''} round {rnd}"


def _line_problems(n: int, rec: dict, st: dict) -> list[str]:
    """Where the server's line disagrees with the signed statement it carries."""
    stage = int(rec.get("stage", 1)) if rec.get("kind") == "stats" else None
    out = []
    if (rec.get("kind"), rec.get("round"), rec.get("country"), stage) != (st["kind"], st["round"], st["client"], st["stage"]):
        out.append(f"line {n}: the line records ({_label(rec.get('country'), rec.get('kind'), rec.get('round'), stage)}) "
                   f"but carries the signed statement ({_label(st['client'], st['kind'], st['round'], st['stage'])}): "
                   "a statement moved to another line, client or round, or replayed")
    if rec.get("status") not in _LINE_STATUS[st["status"]] and st["kind"] != "close":
        out.append(f"line {n}: status {rec.get('status')!r} but {st['client']} signed status {st['status']!r}")
    for k in _CLIENT_ONLY:
        if k in rec and rec[k] != st["facts"].get(k):
            out.append(f"line {n}: {k}={rec[k]!r} in the line but {st['client']} signed {st['facts'].get(k)!r}")
    return out


def read_statements(records: list[dict], charter: Charter, problems: list[str], counted: list[int],
                    hashes: Hashes | None = None) -> dict[str, Chain]:
    """Every valid statement, per client in ledger order; ``counted`` gets the number checked and
    ``hashes`` (given: pass it to :func:`check_chain`) each one's hash."""
    per: dict[str, Chain] = {}
    hashes = {} if hashes is None else hashes
    for n, rec in enumerate(records, 1):
        st = rec.get(FIELD)
        if st is None:
            if rec.get("kind") in ("stats", "train", "evaluate") and rec.get("status") == "accepted":
                problems.append(f"line {n} ({_label(rec.get('country'), rec.get('kind'), rec.get('round'))}): the "
                                "server accepted this reply but the line carries no signed statement: stripped, or "
                                "written by the server itself")
            continue
        why, hashes[n] = checked_statement(st, charter.keys, charter.sha256)
        if why:
            problems.append(f"line {n} ({rec.get('country')}, {rec.get('kind')} round {rec.get('round')}): {why}")
            continue
        problems.extend(_line_problems(n, rec, st))
        per.setdefault(st["client"], []).append((n, st))
        counted[0] += 1
    return per


def _order(who: str, items: Chain, problems: list[str], notes: list[str], hashes: Hashes) -> Chain:
    """The distinct statements of ``who`` (first occurrences), naming replays, forks and reordering."""
    first: dict[str, tuple[int, dict]] = {}
    latest = None                        # (seq, line) of the highest statement so far
    for n, st in items:
        h = hashes[n]
        if h in first:
            m = first[h][0]
            if st["seq"] < latest[0]:
                problems.append(f"line {n}: repeats {who}'s statement {st['seq']} of round {st['round']} (line {m}) "
                                f"after its statement {latest[0]} (line {latest[1]}): a line replayed from an earlier round")
            else:
                notes.append(f"line {n} repeats {who}'s statement of line {m} (a reply replayed to a restarted "
                             "server): counted once")
            continue
        if latest is not None and st["seq"] <= latest[0]:
            twin = next((m for m, other in first.values() if other["seq"] == st["seq"]), None)
            problems.append(f"line {n}: {who} signed two different statements numbered {st['seq']} (lines {twin} and "
                            f"{n}): its chain forks" if twin is not None else
                            f"line {n}: {who}'s statement {st['seq']} comes after its statement {latest[0]} "
                            f"(line {latest[1]}): lines reordered")
        first[h] = (n, st)
        if latest is None or st["seq"] > latest[0]:
            latest = (st["seq"], n)
    return sorted(first.values(), key=lambda x: (x[1]["seq"], x[0]))


def check_chain(who: str, items: Chain, problems: list[str], notes: list[str], hashes: Hashes | None = None) -> Chain:
    """``who``'s statements in seq order, with every gap, broken link or reordering named
    (``hashes``: from :func:`read_statements`, else computed here)."""
    hashes = {n: statement_hash(st) for n, st in items} if hashes is None else hashes
    chain = _order(who, items, problems, notes, hashes)
    prev = None
    for n, st in chain:
        want = 0 if prev is None else prev[1]["seq"] + 1
        if st["seq"] > want:
            problems.append(f"{who}: its statement(s) {want}..{st['seq'] - 1} are missing from the ledger (before line "
                            f"{n}): lines deleted")
        elif st["seq"] == want and st["prev"] != (GENESIS if prev is None else hashes[prev[0]]):
            problems.append(f"line {n}: {who}'s statement {st['seq']} does not name its statement {want - 1}"
                            + (f" (line {prev[0]})" if prev else "") + " as its predecessor")
        if prev is not None and st["round"] < prev[1]["round"]:
            problems.append(f"line {n}: {who}'s statement {st['seq']} is of round {st['round']}, after its statement "
                            f"of round {prev[1]['round']} (line {prev[0]})")
        if prev is not None and prev[1]["kind"] == "close":
            problems.append(f"line {n}: {who} signed statement {st['seq']} after its closing statement (line "
                            f"{prev[0]}), which is final: a client that closed refuses every later request")
        prev = (n, st)
    return chain


def check_complete(charter: Charter, chains: dict[str, Chain], records: list[dict], problems: list[str]) -> None:
    """Every client of the charter ends its chain with ``close`` or a statement of the last round."""
    for who, role in sorted(charter.roles.items()):
        chain = chains.get(who, [])
        after = chain[-1][0] if chain else 0
        later = [f"line {n} {r.get('status')} in round {r.get('round')}" for n, r in enumerate(records, 1)
                 if n > after and r.get("country") == who and r.get("status") in ("missing", "rejected", "refused")]
        said = f" (the server's later lines for it: {', '.join(later[:3])})" if later else ""
        if not chain:
            problems.append(f"{who}: a {role} client of the charter, but the ledger holds no statement it signed: its "
                            f"lines were removed, or it never answered{said}")
            continue
        n, st = chain[-1]
        if st["kind"] != "close" and st["round"] < charter.rounds:
            problems.append(f"{who}: its signed history ends with its statement {st['seq']} ({st['kind']} round "
                            f"{st['round']}, line {n}), but the charter plans {charter.rounds} round(s) and it signed no "
                            f"closing statement: its later statements may have been cut from the ledger{said}")


def _inputs_problems(where: str, st: dict, minimum: int) -> list[str]:
    inp = st["inputs"]
    if st["status"] != "ok" or not inp:
        return []
    terms = [("model", inp["model_terms"])] * (inp["model"] is not None) + [("statistics", t) for _, t in inp["stats"]]
    return [f"{where}: accepted a {what} aggregate of {t} contribution(s), below the charter's "
            f"min-train-clients={minimum}" for what, t in terms if t < minimum]


def check_plan(charter: Charter, chains: dict[str, Chain], problems: list[str]) -> None:
    """Roles, rounds, stages, δ, the DP-SGD plan and min-train-clients, as the charter fixes them."""
    # ddp+he: one clipped gradient sum per round, rows Poisson-sampled at ddp-sample-rate
    q_plan, steps_plan = ((charter.config.get("ddp-sample-rate"), 1) if charter.config["privacy"] == "ddp+he"
                          else charter.plan)
    for who, chain in sorted(chains.items()):
        role = charter.roles[who]
        for n, st in chain:
            where, f = f"line {n} ({_label(who, st['kind'], st['round'], st['stage'])})", st["facts"]
            if st["kind"] not in ROLE_KINDS[role]:
                problems.append(f"{where}: a {role} client of the charter signed a {st['kind']} statement")
            if st["round"] > charter.rounds or (st["stage"] or 0) > charter.stats_stages:
                problems.append(f"{where}: beyond the charter's {charter.rounds} rounds / {charter.stats_stages} "
                                "statistics stage(s)")
            problems.extend(_inputs_problems(where, st, charter.min_train_clients))
            if charter.dp and "delta" in f and not (num(f["delta"]) is not None and close(f["delta"], charter.delta)):
                problems.append(f"{where}: claims ε at δ={f['delta']!r}, the charter's δ is {charter.delta:g}")
            q = num(f.get("sample_rate"))
            if charter.dp and st["kind"] == "train" and st["status"] == "ok" and \
                    (q is None or not close(q, q_plan) or f.get("steps") != steps_plan):
                problems.append(f"{where}: trained with sample rate {f.get('sample_rate')} and {f.get('steps')} steps; "
                                f"the charter plans q={q_plan:g} and {steps_plan} steps per round")


def claims_of(who: str, chain: Chain) -> list[Claim]:
    """The statements of ``who`` that carry an accountant history, as claims to account."""
    return [Claim(where=f"line {n} ({_label(who, st['kind'], st['round'], st['stage'])})", line=n, kind=st["kind"],
                  round=st["round"], refused=st["status"] == "refused", facts=st["facts"])
            for n, st in chain if "history" in st["facts"]]

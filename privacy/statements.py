"""A client's signed statements: its privacy facts, chained so that its own history cannot be cut.

Every reply in which a client reports facts (a statistics release, a training round, a refusal,
an error after a charge, an evaluation, its closing statement) carries a *statement* signed with
the client's own key (:mod:`carbonfed.privacy.signing`), which the server copies verbatim into
its ledger line under :data:`FIELD`::

    {"type": "carbonfed.statement.v1", "charter": <charter SHA-256>, "client": <name>,
     "seq": n, "prev": <hash of the client's statement n-1, or 64 zeros>,
     "kind": stats | train | evaluate | close, "round": r, "stage": 1..3 (stats) | null,
     "status": ok | refused | error, "facts": {...}, "inputs": {...} | null,
     "output": <SHA-256 of the ciphertext it uploads> | null, "sig": <Ed25519, hex>}

Guarantees
----------
* ``facts`` holds only :data:`FACT_KEYS` (the mechanism history, cumulative ε before and after,
  δ, σ, q, steps, total steps, clipped parameters, and a refusal's or error's reason):
  :func:`sign_facts` refuses anything else, so a statement cannot smuggle a server field.
* The signature covers everything but ``sig``: the charter (so the run), the client, its own
  sequence number and the hash of its previous statement, the kind, round and stage. With the
  client's public key, a verifier (:func:`statement_problem`) detects an edited fact, a
  statement moved to another client, round, kind or run, and, along a client's chain, one
  deleted (a gap in ``seq``), reordered or replayed. Only the *end* of a chain can be cut
  without a trace in the chain itself: a verifier needs an independent end, the charter's
  planned rounds or the client's ``close`` statement (:mod:`carbonfed.privacy.audit.signed`).
* ``inputs`` (:func:`received`) holds the SHA-256 of every aggregate the client received and the
  number of contributions it was told each sums: it binds the stored aggregate files to what
  the clients used (:mod:`carbonfed.privacy.binding`) and shows that each client enforced the
  charter's ``min-train-clients``.
* A ``close`` statement (the client's final accountant history, signed when the server ends the
  run) is final: a client that signed it refuses every later request, so a chain that ends with
  it is the client's whole history.
* A client keeps ``chain_after(statement)`` (``{"seq", "head"}``) in its persistent state and
  signs its next statement with it; a reply replayed from the client's cache carries the same
  statement, which a verifier recognises as one (the same hash), not as a second charge.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from carbonfed.privacy.signing import canonical, digest, sign, signature_valid_over

STATEMENT_TYPE = "carbonfed.statement.v1"
FIELD = "signed"             # the ledger-line key (and reply-metadata key) of a statement
GENESIS = "0" * 64
KINDS = ("stats", "train", "evaluate", "close")
STATUSES = ("ok", "refused", "error")
FACT_KEYS = ("epsilon", "epsilon_before", "delta", "noise_multiplier", "sample_rate", "steps", "total_steps",
             "history", "clipped_params", "reason")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def line_history(line: Mapping) -> list | None:
    """The accountant history a ledger line's statement signs (the line does not repeat it; a line
    written before carbonfed stopped repeating it carries it at the top level too)."""
    st = line.get(FIELD)
    facts = st.get("facts") if isinstance(st, Mapping) else None
    hist = facts.get("history") if isinstance(facts, Mapping) else None
    return hist if hist is not None else line.get("history")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


def _is_hex(v) -> bool:
    return isinstance(v, str) and bool(_HEX64.match(v))


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def received(model: bytes | None, model_terms: int | None, stats: Sequence[tuple[bytes, int]] = ()) -> dict:
    """The ``inputs`` of a statement: SHA-256 of the global model (None before round 1) and of each
    statistics aggregate received, each with the number of contributions the server said it sums."""
    return {"model": sha256_hex(model) if model is not None else None,
            "model_terms": int(model_terms) if model is not None else None,
            "stats": [[sha256_hex(data), int(terms)] for data, terms in stats]}


def _inputs_problem(inputs) -> str | None:
    if inputs is None:
        return None
    if not isinstance(inputs, dict) or set(inputs) != {"model", "model_terms", "stats"}:
        return "inputs must hold exactly model, model_terms and stats"
    if (inputs["model"] is None) != (inputs["model_terms"] is None) or \
            not (inputs["model"] is None or (_is_hex(inputs["model"]) and _is_count(inputs["model_terms"]))):
        return "inputs.model must be a SHA-256 with its model_terms, or both null"
    stats = inputs["stats"]
    if not isinstance(stats, list) or not all(isinstance(s, list) and len(s) == 2 and _is_hex(s[0])
                                              and _is_count(s[1]) for s in stats):
        return "inputs.stats must be a list of [SHA-256, terms]"
    return None


def _shape_problem(st: dict) -> str | None:
    """What is malformed in statement ``st`` (signature aside), or None."""
    want = {"type", "charter", "client", "seq", "prev", "kind", "round", "stage", "status", "facts", "inputs",
            "output", "sig"}
    if not isinstance(st, dict) or set(st) != want:
        return f"a statement holds exactly the fields {sorted(want)}"
    if st["type"] != STATEMENT_TYPE or not _is_hex(st["charter"]) or not isinstance(st["client"], str):
        return "not a statement of this format (type, charter or client)"
    if not (_is_count(st["seq"]) and _is_hex(st["prev"]) and _is_count(st["round"])):
        return "seq, prev or round malformed"
    if st["kind"] not in KINDS or st["status"] not in STATUSES:
        return f"kind {st['kind']!r} or status {st['status']!r} unknown"
    if (st["kind"] == "stats") != (st["stage"] in (1, 2, 3)) or (st["kind"] != "stats" and st["stage"] is not None):
        return "a stats statement names its stage 1..3, no other kind has one"
    if not isinstance(st["facts"], dict) or set(st["facts"]) - set(FACT_KEYS):
        return f"facts may hold only {FACT_KEYS}"
    if not (st["output"] is None or _is_hex(st["output"])):
        return "output must be a SHA-256 or null"
    return _inputs_problem(st["inputs"])


def unsigned(statement: Mapping) -> dict:
    return {k: v for k, v in statement.items() if k != "sig"}


def statement_hash(statement: Mapping) -> str:
    """SHA-256 of the statement without its signature: what the client's next statement names."""
    return digest(unsigned(statement))


def sign_facts(key: Ed25519PrivateKey, chain: Mapping | None, *, charter: str, client: str, kind: str, rnd: int,
               facts: Mapping, status: str = "ok", stage: int | None = None, inputs: dict | None = None,
               output: bytes | None = None) -> dict:
    """The signed statement of ``facts`` that follows ``chain`` (``{"seq", "head"}`` from
    :func:`chain_after`; None: the client's first). ``output``: the bytes the client uploads."""
    chain = chain or {"seq": 0, "head": GENESIS}
    if chain.get("closed"):
        raise ValueError(f"{client} signed its closing statement: it signs nothing after it")
    st = {"type": STATEMENT_TYPE, "charter": charter, "client": client, "seq": int(chain["seq"]),
          "prev": chain["head"], "kind": kind, "round": int(rnd), "stage": stage, "status": status,
          "facts": {k: (list(map(list, v)) if k == "history" else v) for k, v in facts.items()},
          "inputs": inputs, "output": sha256_hex(output) if output is not None else None, "sig": ""}
    problem = _shape_problem(st)
    if problem:
        raise ValueError(f"cannot sign this statement: {problem}")
    st["sig"] = sign(key, unsigned(st))
    return st


def chain_after(statement: Mapping) -> dict:
    """The chain state a client keeps after signing ``statement`` (``closed`` after a ``close``:
    :func:`sign_facts` then refuses)."""
    return {"seq": statement["seq"] + 1, "head": statement_hash(statement), "closed": statement["kind"] == "close"}


def statement_problem(statement, keys: Mapping[str, str], charter_sha256: str) -> str | None:
    """Why ``statement`` does not count as its client's, under a charter with public ``keys``
    and SHA-256 ``charter_sha256``; None if it does (chain position aside)."""
    return checked_statement(statement, keys, charter_sha256)[0]


def checked_statement(statement, keys: Mapping[str, str], charter_sha256: str) -> tuple[str | None, str | None]:
    """(:func:`statement_problem`, :func:`statement_hash` or None if it has a problem): one canonical
    encoding serves the signature and the hash (a run's ledger holds 10^4 statements)."""
    problem = _shape_problem(statement)
    if problem:
        return f"malformed signed statement: {problem}", None
    if statement["charter"] != charter_sha256:
        return f"signed for another charter ({statement['charter'][:12]}…): a statement of another run", None
    if statement["client"] not in keys:
        return f"signed in the name of {statement['client']!r}, who is not in the charter", None
    try:
        data = canonical(unsigned(statement))
    except (ValueError, TypeError):
        data = b""
    if not data or not signature_valid_over(keys[statement["client"]], data, statement["sig"]):
        return (f"its signature is not {statement['client']}'s (content edited after signing, or signed with "
                "another key)"), None
    return None, sha256_hex(data)


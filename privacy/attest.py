"""Client attestations of ledger facts: the server writes the ledger, the clients vouch for their lines.

SUPERSEDED by the clients' Ed25519 statements (:mod:`carbonfed.privacy.statements`, checked with
public keys only); kept until the federation signs them (issue 18, phase 2), for the ledgers it
writes meanwhile, whose audit (:mod:`carbonfed.privacy.audit.legacy`) still checks these HMACs.

The ledger is written by the server from the facts each client reports (ε, σ, q, steps, the
accountant history). Its hash chain shows edits made *after* a line was written, but not a
ledger that its writer composed from scratch. An attestation closes that gap for the clients'
facts: each client sends, with its facts, an HMAC that the server cannot compute.

Guarantees
----------
* The key is SHA-256 of a fixed domain string and the bytes of the key holders' secret-context
  file (:func:`attestation_key`). Every client and whoever decrypts the report hold that file; the
  server holds the public context only, so it can neither compute nor check an attestation.
* An attestation is HMAC-SHA256 over the canonical JSON of what the ledger line must then say
  (:func:`attested_fields`): the client's country, the line's kind (``stats`` or ``train``), the
  statistics stage, the round, the run config's digest and the facts restricted to
  :data:`LEDGER_FACTS`. A server that changes, drops or adds a fact, moves a line to another
  client, round or stage, or copies it from a run with another config, breaks it
  (:func:`check_line` says which).
* Limits: all clients share one key (see ``threat_model.md``), so a client can attest facts in
  another client's name, and a key holder colluding with the server can forge any line. A server
  that drops whole lines is not caught here (``carbonfed.privacy.audit.verify`` checks round summaries and that
  histories only grow). Runs without HE have no key and no attestations.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

DOMAIN = b"carbonfed ledger attestation v1\0"
FIELD = "attestation"   # the ledger (and reply metadata) key of an attestation
# The privacy facts a client reports and the server copies into its ledger line, nothing else.
LEDGER_FACTS = ("epsilon", "epsilon_before", "noise_multiplier", "sample_rate", "steps", "total_steps",
                "history", "clipped_params")


def attestation_key(secret_context: str | os.PathLike | bytes) -> bytes:
    """The HMAC key of a secret-context file (its path or its bytes)."""
    data = secret_context if isinstance(secret_context, bytes) else Path(secret_context).read_bytes()
    return hashlib.sha256(DOMAIN + data).digest()


def reported_facts(facts: dict) -> dict:
    """``facts`` restricted to :data:`LEDGER_FACTS`: what the server may copy into the ledger."""
    return {k: facts[k] for k in LEDGER_FACTS if k in facts}


def attested_fields(country: str, kind: str, stage: int | None, rnd: int, digest: str, facts: dict) -> bytes:
    """The canonical bytes an attestation covers (``stage``: 1, 2 or 3 for ``stats``, None for ``train``)."""
    body = {"country": country, "kind": kind, "stage": stage, "round": int(rnd), "config": digest,
            "facts": reported_facts(facts)}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def attest(key: bytes, country: str, kind: str, stage: int | None, rnd: int, digest: str, facts: dict) -> str:
    """The client's attestation (hex) of the ledger line its reply should become."""
    return hmac.new(key, attested_fields(country, kind, stage, rnd, digest, facts), hashlib.sha256).hexdigest()


def line_stage(line: dict) -> int | None:
    """The statistics stage a ledger line records (stage-1 lines carry no ``stage``), None for train."""
    return int(line.get("stage", 1)) if line.get("kind") == "stats" else None


def check_line(key: bytes, line: dict, digest: str) -> str | None:
    """None if ``line``'s attestation matches its country, kind, stage, round and facts under
    ``key`` and the config ``digest``; otherwise why not."""
    given = line.get(FIELD)
    if not isinstance(given, str):
        return "carries client facts but no client attestation"
    want = attest(key, str(line.get("country")), str(line.get("kind")), line_stage(line),
                  int(line.get("round", -1)), digest, line)
    if not hmac.compare_digest(given, want):
        return ("its client attestation does not match (the facts, country, kind, stage or round differ from "
                "what the client sent, or another key or run config)")
    return None

"""The clients' signed statements as the server receives them: checked, then copied verbatim.

The server holds no client key and signs nothing: a ledger line's authority is the statement its
client signed (:mod:`carbonfed.privacy.statements`), which the server puts, unchanged, under the
line's ``signed`` key. It also copies the statement's facts beside it at the top level, for
people reading the ledger; verifiers read the statement (:mod:`carbonfed.privacy.audit.signed`
names any copy that disagrees).

Guarantees
----------
* :func:`screen` says why a reply's statement must not be recorded for a line (or must not be
  added to an aggregate): none or a malformed one, a signature that is not the client's under
  the run's charter, or a statement of another client, kind, round, statistics stage or status
  than the line records. A server without a charter (a run of no charter) checks nothing.
* :func:`line_fields` copies nothing but the statement and its facts (never the client's
  ``reason`` or ``delta``, which are the server's own fields of a line).
"""

from __future__ import annotations

import json

from carbonfed.privacy.charter import Charter
from carbonfed.privacy.statements import FACT_KEYS, FIELD, statement_problem

# The statement status a line of each status may carry.
_STATUS_OF_LINE = {"accepted": ("ok",), "refused": ("refused",), "rejected": ("ok", "error")}
_COPIED = tuple(k for k in FACT_KEYS if k not in ("reason", "delta", "history"))   # the history: signed only


def reply_statement(meta: dict) -> dict | None:
    """The statement a reply carries (metadata ``signed``, JSON), or None."""
    try:
        st = json.loads(meta.get(FIELD, "null"))
    except (TypeError, ValueError):
        return None
    return st if isinstance(st, dict) else None


def screen(charter: Charter | None, meta: dict, line: dict, line_status: str) -> str | None:
    """Why ``meta``'s statement may not stand in ``line`` (kind, round, stage, country) of status
    ``line_status``; None if it may."""
    if charter is None:
        return None
    st = reply_statement(meta)
    if st is None:
        return "the reply carries no signed statement"
    why = statement_problem(st, charter.keys, charter.sha256)
    if why:
        return why
    stage = int(line.get("stage", 1)) if line.get("kind") == "stats" else None
    want = (line.get("country"), line.get("kind"), line.get("round"), stage)
    got = (st["client"], st["kind"], st["round"], st["stage"])
    if got != want:
        return f"the statement is {got} (client, kind, round, stage), the request {want}"
    if st["kind"] != "close" and st["status"] not in _STATUS_OF_LINE.get(line_status, ()):
        return f"the statement's status is {st['status']!r}, the reply's {line_status!r}"
    return None


def line_fields(meta: dict) -> dict:
    """The statement (under ``signed``) and a readable copy of its facts, for a ledger line."""
    st = reply_statement(meta)
    if st is None:
        return {}
    return {FIELD: st, **{k: v for k, v in st["facts"].items() if k in _COPIED}}

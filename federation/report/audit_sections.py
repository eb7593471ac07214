"""The audit's verdict as the run's documents show it: the banner of report.html, the lists of
what was and was not checked, and the machine-readable claims block of both documents.

Guarantees
----------
* :func:`banner_html` says in its first words whether the audit passed, failed, or found an
  UNSIGNED run, and lists what the verdict rests on and what it could not check (for example
  that the charter's keys are the clients' own, without ``--trusted-keys``), from the
  :class:`carbonfed.privacy.audit.verify.VerifyResult` of the run; every text is escaped.
* :func:`document_claims` is what the documents claim about the run's privacy, in the keys
  ``carbonfed verify`` checks them by (:data:`carbonfed.privacy.audit.claims.KEYS`): the signed
  charter's mode, rounds, budget and δ, and each client's ε as its own last signed statement
  states it; :func:`claims_comment` carries them in one comment of the document.
"""

from __future__ import annotations

import html
from pathlib import Path

from carbonfed.federation.report.signed_record import load_run_charter, signed_epsilons
from carbonfed.privacy.audit.claims import claims_block


def document_claims(run: str | Path, ledger: list[dict]) -> dict | None:
    """The claims of the run's documents (None: the run has no valid charter, so none to state)."""
    try:
        charter = load_run_charter(run)
    except ValueError:
        return None
    eps = signed_epsilons(ledger, charter) if charter.dp else None
    return {"privacy_mode": charter.privacy, "rounds": charter.rounds,
            "epsilon_budget": charter.epsilon if charter.dp else None, "delta": charter.delta if charter.dp else None,
            "epsilon_max": max(eps.values()) if eps else None, "epsilon_per_client": eps}


def claims_comment(claims: dict | None) -> str:
    """The claims block of a document ("" without claims)."""
    return claims_block(claims) if claims else ""


def _items(title: str, items: list[str]) -> str:
    if not items:
        return ""
    return f"<p>{html.escape(title)}</p><ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"


def banner_html(v: dict) -> str:
    """The ``#verify-status`` banner of report.html."""
    checked = _items("Checked, with no key:", v.get("checked", []))
    unchecked = _items("Not checked:", v.get("not_checked", []))
    if v.get("ok"):
        head = ("Audit passed: every client fact signed by its client and chained, each client's history whole"
                + (", every ε re-accounted with dp-accounting PLD, every client within the signed budget"
                   if v.get("per_client") else "")
                + ("; the charter is anchored to the clients' published keys" if v.get("anchored") else
                   "; the charter is not anchored (see below)") + ".")
        return f'<div class="banner ok" id="verify-status"><strong>{html.escape(head)}</strong>{checked}{unchecked}</div>'
    problems = v.get("problems", [])
    label = "Audit FAILED (UNSIGNED run)" if not v.get("signed") else "Audit FAILED"
    probs = "".join(f"<li>{html.escape(p)}</li>" for p in problems) or "<li>(no detail)</li>"
    return (f'<div class="banner" id="verify-status"><strong>{label}</strong> ({len(problems)} problem(s)); the '
            f"figures below are the run's claims, not verified:<ul>{probs}</ul>{checked}{unchecked}</div>")

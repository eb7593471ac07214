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
* :func:`empirical_record` is the verdict of the run's last ``carbonfed audit-attack``
  (``DIR/audit.json``): "consistent", "claim refuted" or "no claim", the claimed ε, the empirical
  lower bound with its δ and confidence, and a fault drill named as such;
  :func:`empirical_html` and :func:`empirical_markdown` state exactly that (escaped in HTML).
"""

from __future__ import annotations

import html
import json
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


# -- the empirical audit's verdict (carbonfed audit-attack, DIR/audit.json) -------------------------
EMPIRICAL_FILE = "audit.json"
VERDICTS = ("consistent", "claim refuted", "no claim")


def empirical_record(run: str | Path) -> dict | None:
    """The verdict of the run's last ``carbonfed audit-attack`` (``DIR/audit.json``) for report.json's
    ``audit.empirical``: claimed ε, lower bound, confidence, δ, the line it rests on and its guesses
    (None: never audited, or an audit.json of the older format without a verdict)."""
    path = Path(run) / EMPIRICAL_FILE
    if not path.is_file():
        return None
    a = json.loads(path.read_text())
    if a.get("verdict") not in VERDICTS:
        return None
    lines = {name: a.get(name) for name in ("whitebox", "blackbox")}
    return {"verdict": a["verdict"], "refuted_by": a.get("refuted_by"), "claimed_epsilon": a.get("claim_tested"),
            "epsilon_lower_bound": a["epsilon_lower_bound"], "confidence": a["confidence"], "delta": a["delta"],
            "line": a.get("headline"), "m": a.get("m"), "guesses": a.get("guesses"), "correct": a.get("correct"),
            "bounds": {name: (r or {}).get("epsilon_lower_bound") for name, r in lines.items()},
            "fault_drill": (lines["whitebox"] or {}).get("fault_drill"), "method": a.get("method")}


def _bound_text(rec: dict) -> str:
    claim = "no DP claim" if rec["claimed_epsilon"] is None else f"claimed ε = {rec['claimed_epsilon']:.4f}"
    drill = f" (FAULT DRILL: {rec['fault_drill']})" if rec.get("fault_drill") else ""
    lines = ", ".join(f"{name} {b:.4f}" for name, b in rec["bounds"].items() if b is not None)
    return (f"Empirical privacy audit: {rec['verdict'].upper()}. {claim}; empirical lower bound ε ≥ "
            f"{rec['epsilon_lower_bound']:.4f} at δ = {rec['delta']:g} with {rec['confidence']:.0%} confidence "
            f"({rec['line']} line, {rec['correct']}/{rec['guesses']} guesses right of m = {rec['m']} canaries; "
            f"bounds per line: {lines}){drill}.")


def empirical_html(rec: dict | None) -> str:
    """The ``#empirical-audit`` block of report.html ("" when the run was never audited)."""
    if not rec:
        return ""
    cls = "banner" if rec["verdict"] == "claim refuted" else "banner ok"
    note = ("A lower bound far below the claim is expected: it is what this attack could prove, not a "
            "sign that the claim is tight.")
    return (f'<div class="{cls}" id="empirical-audit"><strong>{html.escape(_bound_text(rec))}</strong>'
            f"<p>{html.escape(note)}</p></div>")


def empirical_markdown(rec: dict | None) -> list[str]:
    """The privacy statement's lines on the empirical audit ([] when the run was never audited)."""
    return [_bound_text(rec), f"Method: {rec['method']}."] if rec else []

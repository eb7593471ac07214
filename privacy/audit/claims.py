"""What a run's documents state about its privacy, checked against what the audit proved.

``report.json`` (its ``privacy_mode``, ``rounds`` and ``privacy`` section) is read directly.
``report.html`` and ``privacy_statement.md`` are for people; each carries its claims once more
in one machine-readable comment, written with :func:`claims_block` and read with
:func:`read_claims_block`.

Guarantees
----------
* Each value a document states (:data:`KEYS`: privacy mode, planned rounds, ε budget, δ, ε_max,
  ε per client) must equal what the audit established from the signed record (numbers to a
  relative 1e-9); otherwise a problem names the file and the key (``report.json``'s edited
  ``epsilon_max`` is caught).
* In a signed run a report.html or privacy_statement.md without a claims block is a problem:
  it states privacy figures that nobody could check. An absent document is only noted.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

CLAIMS_MARK = "carbonfed-claims"
KEYS = ("privacy_mode", "rounds", "epsilon_budget", "delta", "epsilon_max", "epsilon_per_client")
DOCUMENTS = ("report.html", "privacy_statement.md")
_BLOCK = re.compile(r"<!--\s*" + CLAIMS_MARK + r"\s+(\{.*?\})\s*-->", re.S)


def claims_block(claims: dict) -> str:
    """One HTML/Markdown comment carrying ``claims`` (keys of :data:`KEYS`) as JSON."""
    body = json.dumps({k: claims[k] for k in KEYS if k in claims}, sort_keys=True, allow_nan=False)
    return f"<!-- {CLAIMS_MARK} {html.escape(body, quote=False).replace('--', '-&#45;')} -->"


def read_claims_block(text: str) -> dict | None:
    """The claims of the document ``text``; None if it carries no (or a malformed) block."""
    m = _BLOCK.search(text)
    if not m:
        return None
    try:
        out = json.loads(html.unescape(m.group(1)))
    except json.JSONDecodeError:
        return None
    return out if isinstance(out, dict) else None


def _same(a, b) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def compare(where: str, stated: dict, proven: dict) -> list[str]:
    """A problem for each key ``stated`` that differs from ``proven``."""
    out = []
    for k in KEYS:
        if k not in stated or k not in proven or _same(stated[k], proven[k]):
            continue
        if k == "epsilon_per_client" and isinstance(stated[k], dict) and isinstance(proven[k], dict):
            bad = sorted(c for c in set(stated[k]) | set(proven[k]) if not _same(stated[k].get(c), proven[k].get(c)))
            out.append(f"{where}: states ε per client that the signed record does not prove, for "
                       + ", ".join(f"{c} ({stated[k].get(c)!r}, proven {proven[k].get(c)!r})" for c in bad[:4])
                       + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""))
        else:
            out.append(f"{where}: states {k}={stated[k]!r}, but the signed record proves {k}={proven[k]!r}")
    return out


def report_json_claims(doc: dict) -> dict:
    """The claims ``report.json`` makes, under :data:`KEYS`."""
    out = {k: doc[k] for k in ("privacy_mode", "rounds") if k in doc}
    priv = doc.get("privacy")
    if isinstance(priv, dict):
        out.update({"epsilon_budget": priv.get("epsilon_target"), "delta": priv.get("delta"),
                    "epsilon_max": priv.get("epsilon_max"), "epsilon_per_client": priv.get("epsilon_per_client")})
    elif "privacy" in doc:
        out.update(epsilon_max=None)
    return out


def check_documents(run_dir: Path, proven: dict, strict: bool, problems: list[str], notes: list[str]) -> list[str]:
    """Check report.json, report.html and privacy_statement.md in ``run_dir``; returns the names
    of the documents checked. ``strict``: a document for people without a claims block is a problem."""
    checked = []
    path = run_dir / "report.json"
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            problems.append(f"report.json: unreadable ({exc})")
        else:
            problems.extend(compare("report.json", report_json_claims(doc) if isinstance(doc, dict) else {}, proven))
            checked.append("report.json")
    for name in DOCUMENTS:
        p = run_dir / name
        if not p.is_file():
            continue
        stated = read_claims_block(p.read_text(errors="replace"))
        if stated is None:
            (problems if strict else notes).append(
                f"{name}: carries no {CLAIMS_MARK} block, so its privacy figures were not checked")
            continue
        problems.extend(compare(name, stated, proven))
        checked.append(name)
    return checked

"""One client's accountant histories, checked line by line and re-accounted independently.

A client's facts (in a signed run, its own signed statements; in an unsigned ledger, the lines
the server wrote in its name) are a sequence of :class:`Claim` s, each carrying the client's
full accountant ``history`` of ``(noise_multiplier, sample_rate, steps)`` mechanisms and its
claimed ε.

Guarantees (:func:`account_client`)
-----------------------------------
* Every history parses as valid mechanisms (σ > 0, 0 < q <= 1, integer steps >= 1).
* Along the client's claims the history only grows (each extends the one before it), so total
  steps never fall; a training claim grew it by at least the steps it reports, and its last
  mechanism is the ``(noise_multiplier, sample_rate, steps)`` it reports; ``total_steps`` is the
  sum of the history's steps; a statistics release ends with one unsubsampled step.
* The claimed ε never falls by more than :data:`MONOTONE_SLACK` (the PRV error bound).
* The last history is re-accounted with the PLD accountant (:mod:`carbonfed.privacy.audit.pld`);
  a claimed ε more than ``rel_tol`` (relative) away from it is a problem naming the line.
* :func:`budget_problems`: a client whose recomputed or claimed ε exceeds a budget is named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from carbonfed.privacy.audit.pld import ACCOUNTANT_NAME, pld_epsilon

# Opacus's PRV estimate may be off by up to its eps_error (0.01) in either direction of the true
# ε, so a client's claimed ε may dip by that much between two histories that barely differ.
MONOTONE_SLACK = 0.01
# Floats in the ledger are JSON round-trips of Python floats: compare mechanisms exactly up to
# this relative slack only.
FLOAT_SLACK = 1e-12


def close(a: float, b: float) -> bool:
    return abs(a - b) <= FLOAT_SLACK * max(1.0, abs(a), abs(b))


def num(v) -> float | None:
    """``v`` as a float if it is a finite JSON number, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


@dataclass(frozen=True)
class Claim:
    """One of a client's fact records: where it is, what it is, and its facts."""

    where: str          # e.g. "line 12 (Atlantis, train round 2)"
    line: int
    kind: str           # stats, train, evaluate, close
    round: int | None
    refused: bool       # a refusal: no mechanism ran
    facts: dict

    @property
    def trained(self) -> int | None:
        """The steps a training claim says it ran (None: not a training claim)."""
        st = self.facts.get("steps")
        ok = self.kind == "train" and not self.refused and isinstance(st, int) and not isinstance(st, bool)
        return st if ok else None


def parse_history(raw, where: str, problems: list[str]) -> list[tuple[float, float, int]] | None:
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


def is_prefix(a: list, b: list) -> bool:
    return len(a) <= len(b) and all(close(x[0], y[0]) and close(x[1], y[1]) and x[2] == y[2] for x, y in zip(a, b))


def _own_problems(c: Claim, hist: list) -> list[str]:
    """What is inconsistent within one claim."""
    out, f, total = [], c.facts, sum(st for *_, st in hist)
    if c.trained is not None and all(k in f for k in ("noise_multiplier", "sample_rate")):
        sig, q = num(f["noise_multiplier"]), num(f["sample_rate"])
        if not hist or sig is None or q is None or not (close(hist[-1][0], sig) and close(hist[-1][1], q)
                                                        and hist[-1][2] == c.trained):
            out.append(f"{c.where}: reports mechanism (σ={f['noise_multiplier']}, q={f['sample_rate']}, "
                       f"steps={f['steps']}) but its history ends with {list(hist[-1]) if hist else 'nothing'}")
    if "total_steps" in f and f["total_steps"] != total:
        out.append(f"{c.where}: total_steps={f['total_steps']} but its history sums to {total} steps")
    if c.kind == "stats" and hist and not (hist[-1][1] == 1.0 and hist[-1][2] == 1):
        out.append(f"{c.where}: a statistics release is one unsubsampled step, history ends with {list(hist[-1])}")
    if hist and num(f.get("epsilon")) is None:
        out.append(f"{c.where}: history of {len(hist)} mechanism(s) but no numeric ε claimed")
    return out


def _growth_problems(c: Claim, hist: list, prev_line: int, prev_hist: list) -> list[str]:
    """What is inconsistent between a claim and the client's claim before it."""
    total, prev_total = sum(st for *_, st in hist), sum(st for *_, st in prev_hist)
    if total < prev_total:
        return [f"{c.where}: total steps fell from {prev_total} (line {prev_line}) to {total}"]
    if c.trained is not None and total < prev_total + c.trained:
        return [f"{c.where}: reports {c.trained} steps trained but its history grew by only "
                f"{total - prev_total} steps since line {prev_line}"]
    if not is_prefix(prev_hist, hist):
        return [f"{c.where}: history does not extend the history at line {prev_line}; "
                "an accountant only ever appends mechanisms"]
    return []


def _walk(claims: list[Claim], problems: list[str]) -> tuple[Claim, list] | None:
    """Check every claim against itself and the one before; the last valid (claim, history)."""
    final, prev, prev_eps = None, None, None
    for c in claims:
        hist = parse_history(c.facts.get("history"), c.where, problems)
        if hist is None:
            continue
        problems.extend(_own_problems(c, hist))
        if prev is not None:
            problems.extend(_growth_problems(c, hist, *prev))
        claimed = num(c.facts.get("epsilon"))
        if claimed is not None and prev_eps is not None and claimed < prev_eps[1] - MONOTONE_SLACK:
            problems.append(f"{c.where}: claimed ε fell from {prev_eps[1]:.6g} (line {prev_eps[0]}) to {claimed:.6g}")
        prev = (c.line, hist)
        prev_eps = (c.line, claimed) if claimed is not None else prev_eps
        final = (c, hist)
    return final


def account_client(who: str, claims: list[Claim], delta: float | None, claim_delta: float | None,
                   rel_tol: float, problems: list[str]) -> dict | None:
    """Check ``who``'s claims (in order) and re-account its last history at ``delta``; the
    claimed ε is compared with the recomputation at ``claim_delta`` (the δ it was claimed at).
    Returns the client's summary, or None if none of its claims carries a valid history."""
    final = _walk(claims, problems)
    if final is None:
        return None
    c, hist = final
    claimed = num(c.facts.get("epsilon"))
    entry = {"line": c.line, "kind": c.kind, "round": c.round, "status": "refused" if c.refused else "ok",
             "claimed": claimed, "recomputed": None, "history": [list(h) for h in hist],
             "total_steps": sum(st for *_, st in hist)}
    if not hist:
        entry["recomputed"] = 0.0
    elif delta is not None:
        entry["recomputed"] = at_claim = pld_epsilon(hist, delta)
        if claim_delta is not None and not close(claim_delta, delta):
            entry["recomputed_at_ledger_delta"] = at_claim = pld_epsilon(hist, claim_delta)
        gap = abs(claimed - at_claim) / max(at_claim, 1e-12) if claimed is not None else 0.0
        if gap > rel_tol:
            problems.append(f"line {c.line} ({who}): claimed ε={claimed:.6g} but {ACCOUNTANT_NAME} recomputes "
                            f"ε={at_claim:.6g} from its history at δ={claim_delta or delta:g} "
                            f"(relative difference {gap:.1%} > {rel_tol:.1%})")
    return entry


def budget_problems(per_client: dict[str, dict], budget: float, delta: float | None, whose: str) -> list[str]:
    """Every client over ``budget`` (``whose``: where the budget comes from, e.g. "signed charter")."""
    out = []
    for who, e in sorted(per_client.items()):
        rec, cl = e["recomputed"], e["claimed"]
        fmt = lambda x: "-" if x is None else format(x, ".6g")  # noqa: E731
        if rec is not None and rec > budget:
            out.append(f"{who}: recomputed ε={fmt(rec)} (claimed ε={fmt(cl)}) exceeds the budget ε={budget:g} "
                       f"({whose}) at δ={delta:g} (line {e['line']})")
        elif cl is not None and cl > budget:
            out.append(f"{who}: claimed ε={fmt(cl)} (recomputed ε={fmt(rec)}) exceeds the budget ε={budget:g} "
                       f"({whose}) (line {e['line']})")
    return out

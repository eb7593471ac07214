"""``carbonfed verify`` of a ``ddp+he`` run: every ε recomputed with
:mod:`carbonfed.privacy.audit.ddp_epsilon` (no code shared with the accountant that calibrated).

Guarantees (each failure is a problem naming the client, line or round)
-----------------------------------------------------------------------
* **Per client.** Each client's signed history (a list of Skellam mechanisms ``[variance, l2,
  l1, sample_rate, steps]``) only grows along its statements (entries appended, or the last
  entry's ``steps`` raised: the accountant counts a repeated mechanism there); its last one is
  re-accounted and the claimed ε must lie within ``rel_tol`` of it, and within the budget.
* **Per round, from signatures.** A round's contributors are the distinct clients of the accepted
  ``train`` lines of that round whose statement verified, never the server's summary: a round
  line stating more contributors than that (a raised count, which would understate ε) is named,
  as is a released round below the floor (``min-noise-clients``, default ⌈0.8 · training clients⌉,
  and ``min-train-clients``).
* **Central ε.** The prior releases (a training client's history up to its last statistics
  statement) and every released round at the noise it carried, each share's variance (the
  signed training mechanism's variance over n_min) times its signed contributors, composed and
  converted at δ: the guarantee against anyone who sees only aggregates; it must be within budget.
"""

from __future__ import annotations

import math

from carbonfed.privacy.audit.ddp_epsilon import recompute_epsilon
from carbonfed.privacy.charter import Charter

KEYS = ("variance", "l2", "l1", "sample_rate", "steps")
MIN_NOISE_FRACTION = 0.8      # the default floor, as the run config states it


def noise_floor(charter: Charter) -> int:
    """The contributors each share was calibrated for, as the charter fixes them."""
    n_train = sum(1 for r in charter.roles.values() if r == "train")
    return int(charter.config.get("min-noise-clients", 0)) or max(1, math.ceil(MIN_NOISE_FRACTION * n_train - 1e-9))


def _history(raw, where: str, problems: list[str]) -> list[dict] | None:
    ok = isinstance(raw, list) and all(isinstance(m, list) and len(m) == len(KEYS) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in m) for m in raw)
    raw = [dict(zip(KEYS, m)) for m in raw] if ok else raw
    if not ok or any(not (m["variance"] > 0 and m["l2"] > 0 and m["l1"] > 0 and 0 < m["sample_rate"] <= 1
                          and m["steps"] >= 1) for m in raw):
        problems.append(f"{where}: history is not a list of valid Skellam mechanisms {KEYS}")
        return None
    return [{k: m[k] for k in KEYS} for m in raw]


def extends(hist: list[dict], prev: list[dict]) -> bool:
    """``hist`` is ``prev`` with releases added: appended, or (the same mechanism as ``prev``'s last
    entry) counted in that entry's ``steps``, never fewer."""
    if not prev:
        return True
    if len(hist) < len(prev) or hist[:len(prev) - 1] != prev[:-1]:
        return False
    a, b = hist[len(prev) - 1], prev[-1]
    return a == b or (all(a[k] == b[k] for k in KEYS if k != "steps") and a["steps"] > b["steps"])


def account_clients(chains: dict, delta: float, rel_tol: float, problems: list[str]) -> tuple[dict, dict]:
    """(per-client summaries, each client's prior: its history at its last statistics statement)."""
    per, priors = {}, {}
    for who, chain in sorted(chains.items()):
        prev, last = [], None
        for n, st in chain:
            f = st["facts"]
            if "history" not in f:
                continue
            where = f"line {n} ({who}, {st['kind']} round {st['round']})"
            hist = _history(f["history"], where, problems)
            if hist is None:
                continue
            if not extends(hist, prev):
                problems.append(f"{where}: history does not extend the one before; an accountant only adds")
            if st["kind"] == "stats":
                priors[who] = hist
            prev, last = hist, (n, st, hist)
        if last is None:
            continue
        n, st, hist = last
        claimed = st["facts"].get("epsilon")
        again = recompute_epsilon(hist, delta)
        per[who] = {"line": n, "kind": st["kind"], "round": st["round"], "claimed": claimed, "recomputed": again,
                    "total_steps": sum(m["steps"] for m in hist)}
        if isinstance(claimed, (int, float)) and abs(claimed - again) > rel_tol * max(again, 1e-12):
            problems.append(f"line {n} ({who}): claimed ε={claimed:.6g} but ddp_epsilon recomputes {again:.6g} "
                            f"(more than {rel_tol:.1%} apart)")
    return per, priors


def signed_contributors(records: list[dict], valid_lines: set[int]) -> dict[int, int]:
    """Per round, the distinct clients with an accepted ``train`` line whose statement verified (a
    client asked again for a round after a server restart is still one contributor to it)."""
    out: dict[int, set] = {}
    for n, rec in enumerate(records, 1):
        if rec.get("kind") == "train" and rec.get("status") == "accepted" and n in valid_lines:
            out.setdefault(rec["round"], set()).add(rec["signed"]["client"])
    return {r: len(clients) for r, clients in out.items()}


def _train_mechanism(chains: dict) -> dict | None:
    """The training mechanism (at the floor) the clients signed: the last entry of a training history."""
    for chain in chains.values():
        for _, st in reversed(chain):
            hist = _history(st["facts"].get("history"), "", [])
            if st["kind"] == "train" and st["status"] == "ok" and hist:
                return hist[-1]
    return None


def central_epsilon(charter: Charter, records: list[dict], chains: dict, priors: dict, valid_lines: set[int],
                    delta: float, problems: list[str]) -> dict:
    """The central ε from the signed contributors of every round (module docstring)."""
    n_min = noise_floor(charter)
    floor = max(n_min, charter.min_train_clients)
    signed = signed_contributors(records, valid_lines)
    mech = _train_mechanism(chains)
    rounds = []
    for n, rec in enumerate(records, 1):
        d = rec.get("ddp") if rec.get("kind") == "round" else None
        if not isinstance(d, dict):
            continue
        r, m = rec.get("round"), signed.get(rec.get("round"), 0)
        if d.get("contributors") != m:
            problems.append(f"line {n} (round {r}): states {d.get('contributors')} contributors but {m} accepted "
                            "train statement(s) of that round are signed" + (" — a raised count understates ε"
                                                                              if (d.get("contributors") or 0) > m else ""))
        if d.get("released") and m < floor:
            problems.append(f"line {n} (round {r}): released with {m} signed contributors, below the floor {floor}")
        if m >= floor:
            rounds.append(m)
    prior = max(priors.values(), key=lambda h: sum(m["steps"] for m in h)) if priors else []
    history = list(prior)
    if mech is not None:
        share = float(mech["variance"]) / n_min
        history += [{**mech, "variance": share * m, "steps": 1} for m in rounds]
    eps = recompute_epsilon(history, delta) if history else 0.0
    return {"epsilon": eps, "released_rounds": len(rounds), "min_noise_clients": n_min,
            "contributors": {str(k): v for k, v in sorted(signed.items())}}

"""What the server wrote on its own authority, checked against what the clients signed.

The server's round summaries, ``resume`` lines and ``server.json`` describe a run; they never
remove or excuse a client's statement (the accounting reads the clients' chains only). Here they
are checked for saying something the signed record contradicts.

Guarantees (each failure a problem naming the line or file)
----------------------------------------------------------
* A round summary's ``accepted`` / ``rejected`` counts match that round's train lines (those
  written since the server's last restart, which is what a summary counts), and its
  ``epsilon_max`` is the largest ε the clients *signed* for that round; one summary per round,
  for every round in which clients signed training statements, and none for a round in which
  no client signed anything.
* ``server.json``'s config agrees with the signed charter on every key the charter fixes (a
  flipped ``privacy`` is named, and changes no check); its ``rounds_completed`` is the last round
  the clients signed; its HE key fingerprint is the charter's.
* ``resume`` lines are noted as descriptions, not used.
"""

from __future__ import annotations

from carbonfed.privacy.audit.histories import close, num
from carbonfed.privacy.charter import Charter
from carbonfed.privacy.statements import FIELD


def _signed_eps(rec: dict, valid: set[int], n: int) -> float | None:
    st = rec.get(FIELD)
    return num(st["facts"].get("epsilon")) if n in valid and isinstance(st, dict) else None


def summary_problems(n: int, rec: dict, train: list[dict], eps: list[float],
                     source: str = "the clients signed") -> list[str]:
    """Where round summary ``rec`` (line ``n``) misdescribes its round's ``train`` lines, whose
    largest ε (as ``source`` states it) is max(``eps``)."""
    rnd, out = rec.get("round"), []
    acc = sum(1 for r in train if r.get("status") == "accepted")
    if "accepted" in rec and rec["accepted"] != acc:
        out.append(f"line {n} (round {rnd} summary): accepted={rec['accepted']} but {acc} train lines of that round "
                   "are accepted")
    if "rejected" in rec and rec["rejected"] != len(train) - acc:
        out.append(f"line {n} (round {rnd} summary): rejected={rec['rejected']} but {len(train) - acc} train lines "
                   "of that round are not accepted")
    if "epsilon_max" in rec:
        want, got = (max(eps) if eps else None), num(rec["epsilon_max"])
        if (want is None) != (got is None) or (want is not None and not close(want, got)):
            out.append(f"line {n} (round {rnd} summary): epsilon_max={rec['epsilon_max']} but the largest ε "
                       f"{source} for that round is {want}")
    return out


def check_summaries(records: list[dict], valid: set[int], problems: list[str], notes: list[str]) -> None:
    """Round summaries and resume lines; ``valid``: the lines whose statement verified."""
    signed_rounds: dict[int, set[str]] = {}
    for n in sorted(valid):
        signed_rounds.setdefault(records[n - 1][FIELD]["round"], set()).add(records[n - 1][FIELD]["kind"])
    train: dict = {}        # round -> its train lines since the last restart (what its summary counts)
    seen: dict = {}
    for n, rec in enumerate(records, 1):
        if rec.get("kind") == "train":
            train.setdefault(rec.get("round"), []).append((n, rec))
        if rec.get("kind") == "resume":
            notes.append(f"line {n}: the server says it restarted (resume); a description only: the accounting "
                         "uses the clients' signed statements, which no server line can remove")
            for rnd in [r for r in train if isinstance(r, int) and r > rec.get("round", 0)]:
                del train[rnd]
        if rec.get("kind") != "round":
            continue
        rnd = rec.get("round")
        if rnd in seen:
            problems.append(f"line {n}: a second summary of round {rnd} (the first at line {seen[rnd]})")
        seen[rnd] = n
        if rnd not in signed_rounds:
            problems.append(f"line {n}: a summary of round {rnd}, in which no client signed anything")
        lines = train.get(rnd, [])
        eps = [e for m, r in lines if (e := _signed_eps(r, valid, m)) is not None]
        problems.extend(summary_problems(n, rec, [r for _, r in lines], eps))
    for rnd in sorted(r for r, kinds in signed_rounds.items() if "train" in kinds and r not in seen):
        problems.append(f"round {rnd}: clients signed training statements but the ledger has no summary line for it")


def check_server_json(server: dict, charter: Charter, last_round: int, problems: list[str]) -> None:
    """``server.json`` against the charter and the signed rounds; it decides nothing."""
    cfg = server.get("config") if isinstance(server.get("config"), dict) else {}
    for k, v in sorted(charter.config.items()):
        if k in cfg and (cfg[k] != v or isinstance(cfg[k], bool) != isinstance(v, bool)):
            problems.append(f"server.json: config {k}={cfg[k]!r} but the signed charter says {k}={v!r}: server.json "
                            "misdescribes the run (verify checks against the charter)")
    done = server.get("rounds_completed")
    if "rounds_completed" in server and done != last_round:
        problems.append(f"server.json: rounds_completed={done!r} but the clients' signed statements reach round "
                        f"{last_round}")
    he = server.get("he") if isinstance(server.get("he"), dict) else {}
    fp = he.get("key_fingerprint")
    if charter.he and fp is not None and fp != charter.body.get("he_fingerprint"):
        problems.append(f"server.json: HE key fingerprint {str(fp)[:12]}… is not the charter's "
                        f"{str(charter.body.get('he_fingerprint'))[:12]}…: the server ran under another key")

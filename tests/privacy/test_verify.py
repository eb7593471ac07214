"""carbonfed.privacy.audit.verify: chain checks and independent (dp_accounting PLD) re-accounting of a ledger.

Every ledger here is written with :class:`carbonfed.privacy.ledger.Ledger` and carries real numbers from
the project's own accountant (Opacus PRV via :mod:`carbonfed.privacy.accountant`), so the tests exercise
the very disagreement budget the verifier allows; nothing is mocked.
"""

from __future__ import annotations

import json
import shutil

import pytest

from carbonfed.privacy.accountant import calibrate_noise, epsilon_of
from carbonfed.privacy.ledger import Ledger, read_ledger
from carbonfed.privacy.audit.verify import main, pld_epsilon, verify_run

EPS, DELTA, ROUNDS = 3.0, 1e-5, 2
STATS = (4.0, 1.0, 1)
# (country, sample rate, steps per round): two client sizes, so two distinct histories.
CLIENTS = [("Atlantis", 0.2, 5), ("Borduria", 0.2, 5), ("Carpania", 0.25, 4)]


def _server_json(run, rounds_completed=ROUNDS, epsilon=EPS):
    (run / "server.json").write_text(json.dumps({
        "config": {"privacy": "dp+he", "epsilon": epsilon, "delta": DELTA, "rounds": ROUNDS},
        "rounds_completed": rounds_completed}))


def _write_run(run, clients, sigmas, claim=None, mutate=None):
    """A run as the strategy writes it: stats lines, then per round train, evaluate and round lines.

    ``claim(country, history)`` gives the ε a client reports (default: its PRV ε);
    ``mutate(country, round, facts)`` may alter a client's reported facts before they are written.
    """
    run.mkdir(parents=True, exist_ok=True)
    _server_json(run)
    led = Ledger(run / "ledger.jsonl")
    claim = claim or (lambda c, h: epsilon_of(h, DELTA))
    hist = {c: [STATS] for c, *_ in clients}
    for node, (c, q, st) in enumerate(clients, 1):
        led.append({"kind": "stats", "round": 0, "node_id": node, "country": c, "status": "accepted",
                    "reason": "", "bytes": 100, "noise_multiplier": sigmas[c],
                    "history": [list(h) for h in hist[c]], "epsilon": claim(c, hist[c])})
    for rnd in range(1, ROUNDS + 1):
        eps_round, statuses = [], []
        for node, (c, q, st) in enumerate(clients, 1):
            before = claim(c, hist[c])
            hist[c] = hist[c] + [(sigmas[c], q, st)]
            facts = {"kind": "train", "round": rnd, "node_id": node, "country": c, "sample_rate": q,
                     "steps": st, "noise_multiplier": sigmas[c], "epsilon_before": before,
                     "epsilon": claim(c, hist[c]), "total_steps": sum(s for *_, s in hist[c]),
                     "history": [list(h) for h in hist[c]], "delta": DELTA, "status": "accepted",
                     "reason": "", "bytes": 100}
            if mutate:
                mutate(c, rnd, facts)
            led.append(facts)
            statuses.append(facts["status"])
            if "epsilon" in facts:
                eps_round.append(facts["epsilon"])
        led.append({"kind": "evaluate", "round": rnd, "node_id": 99, "country": "Syldavia", "n": 40,
                    "delta": DELTA, "status": "accepted", "reason": "", "bytes": 50})
        led.append({"kind": "round", "round": rnd, "seconds": 1.0, "accepted": statuses.count("accepted"),
                    "rejected": len(statuses) - statuses.count("accepted"),
                    "evaluated": 1, "epsilon_max": max(eps_round), "upload_bytes_per_client": 100.0,
                    "model_terms": len(clients)})
    return run


@pytest.fixture(scope="module")
def sigmas():
    """Each client's noise multiplier, calibrated as a participant does for the whole run."""
    return {c: calibrate_noise(EPS, DELTA, q, st * ROUNDS, prior=[STATS]) for c, q, st in CLIENTS}


@pytest.fixture(scope="module")
def template(tmp_path_factory, sigmas):
    return _write_run(tmp_path_factory.mktemp("template") / "run", CLIENTS, sigmas)


@pytest.fixture
def run(template, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(template, dst)
    return dst


def _lines(run):
    return (run / "ledger.jsonl").read_text().splitlines()


def _rewrite(run, lines):
    (run / "ledger.jsonl").write_text("".join(line + "\n" for line in lines))


def _line_no(run, pred):
    """1-based number of the first ledger line matching ``pred``."""
    return next(i for i, rec in enumerate(read_ledger(run / "ledger.jsonl"), 1) if pred(rec))


# -- a valid run ---------------------------------------------------------------------------------

def test_valid_run_verifies_and_pld_agrees_with_claims(run):
    res = verify_run(run)
    assert res.ok, res.problems
    assert res.problems == []
    assert set(res.per_client) == {c for c, *_ in CLIENTS}
    assert res.epsilon_budget == EPS and res.delta == DELTA
    assert res.accountant == "dp_accounting.pld" and res.accountant_version
    for c, e in res.per_client.items():
        assert e["kind"] == "train" and e["round"] == ROUNDS
        assert e["history"][0] == list(STATS) and len(e["history"]) == 1 + ROUNDS
        assert abs(e["claimed"] - e["recomputed"]) <= 0.05 * e["recomputed"], (c, e)
        assert e["recomputed"] <= EPS
    assert res.epsilon_max_recomputed <= res.epsilon_max_claimed * 1.05
    # the ledger file itself is accepted as the argument too
    assert verify_run(run / "ledger.jsonl").ok


def test_main_exit_codes_and_json(run, capsys):
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "dp_accounting.pld" in out
    assert main([str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and set(data["per_client"]) == {c for c, *_ in CLIENTS}
    # a budget below what the clients spent: non-zero exit, problems printed
    assert main([str(run), "--epsilon", "1.0"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "exceeds the budget" in out


# -- tampering -----------------------------------------------------------------------------------

@pytest.mark.parametrize("field,new", [("epsilon", 0.5), ("steps", 1)])
def test_edited_value_fails_naming_the_line(run, field, new):
    n = _line_no(run, lambda r: r["kind"] == "train" and r["country"] == "Borduria" and r["round"] == 2)
    lines = _lines(run)
    rec = json.loads(lines[n - 1])
    assert rec[field] != new
    rec[field] = new                                  # keep the old hash: a silent edit
    lines[n - 1] = json.dumps(rec, sort_keys=True)
    _rewrite(run, lines)
    res = verify_run(run)
    assert not res.ok
    assert any(p.startswith(f"line {n}:") and "edited" in p for p in res.problems), res.problems
    assert main([str(run)]) == 1


def test_deleted_line_fails(run):
    n = _line_no(run, lambda r: r["kind"] == "train" and r["country"] == "Atlantis" and r["round"] == 1)
    lines = _lines(run)
    del lines[n - 1]
    _rewrite(run, lines)
    res = verify_run(run)
    assert not res.ok
    assert any(p.startswith(f"line {n}:") and "deleted" in p for p in res.problems), res.problems


def test_truncated_tail_fails(run):
    """A hash chain cannot see a cut-off tail; server.json's round count does."""
    _rewrite(run, _lines(run)[:-1])                   # drop the last round summary
    res = verify_run(run)
    assert not res.ok
    assert any("round(s) [2]" in p and "missing from the end" in p for p in res.problems), res.problems


def test_unparsable_line_fails(run):
    lines = _lines(run)
    lines[3] = lines[3][:-5]
    _rewrite(run, lines)
    res = verify_run(run)
    assert not res.ok and any(":4:" in p and "not a JSON line" in p for p in res.problems), res.problems


# -- dishonest or inconsistent claims (chain intact: the server wrote what it was told) -----------

def test_client_over_budget_fails_naming_client(tmp_path, sigmas):
    """Carpania trains with a quarter of its calibrated noise; its claims are honest PRV numbers."""
    sig = dict(sigmas, Carpania=sigmas["Carpania"] / 4)
    run = _write_run(tmp_path / "run", CLIENTS, sig)
    res = verify_run(run)
    assert not res.ok
    over = [p for p in res.problems if "exceeds the budget" in p]
    assert len(over) == 1 and over[0].startswith("Carpania:"), res.problems
    e = res.per_client["Carpania"]
    assert e["recomputed"] > EPS
    assert f"{e['recomputed']:.6g}" in over[0] and f"{e['claimed']:.6g}" in over[0]
    assert res.epsilon_max_recomputed == e["recomputed"]
    assert main([str(run)]) == 1


def test_understated_epsilon_fails(tmp_path, sigmas):
    """A client that reports half its ε is caught by re-accounting, although the chain is intact."""
    liar = lambda c, h: epsilon_of(h, DELTA) * (0.5 if c == "Atlantis" else 1.0)
    run = _write_run(tmp_path / "run", CLIENTS, sigmas, claim=liar)
    res = verify_run(run)
    assert not res.ok
    n = _line_no(run, lambda r: r["kind"] == "train" and r["country"] == "Atlantis" and r["round"] == ROUNDS)
    assert any(p.startswith(f"line {n} (Atlantis)") and "claimed ε" in p for p in res.problems), res.problems
    assert not any("edited" in p for p in res.problems)


@pytest.mark.parametrize("change,expect", [
    ({"steps": 3}, "reports mechanism"),                       # history says 5 steps this round
    ({"total_steps": 99}, "total_steps=99 but its history sums to 11"),
    ({"history": "drop round 1", "total_steps": 6}, "grew by only 0 steps"),
    ({"history": "stats only", "total_steps": 1}, "total steps fell from 6"),
    ({"history": "other sigma"}, "does not extend the history"),
])
def test_history_inconsistent_with_reported_steps_fails(tmp_path, sigmas, change, expect):
    def mutate(c, rnd, facts):
        if c == "Borduria" and rnd == 2:
            h = facts["history"]
            edits = {"drop round 1": h[:1] + h[2:], "stats only": h[:1],
                     "other sigma": [h[0], [h[1][0] * 2, h[1][1], h[1][2]], h[2]]}
            facts.update({k: edits[v] if k == "history" else v for k, v in change.items()})
    run = _write_run(tmp_path / "run", CLIENTS, sigmas, mutate=mutate)
    res = verify_run(run)
    assert not res.ok
    n = _line_no(run, lambda r: r["kind"] == "train" and r["country"] == "Borduria" and r["round"] == 2)
    assert any(p.startswith(f"line {n} (Borduria") and expect in p for p in res.problems), res.problems
    assert not any("edited" in p or "deleted" in p for p in res.problems)


def test_client_error_is_noted_not_failed(tmp_path, sigmas):
    """A train request that ended in a client error carries no history: verified, with a note."""
    def mutate(c, rnd, facts):
        if c == "Borduria" and rnd == 1:
            for k in ("history", "epsilon", "epsilon_before", "total_steps", "noise_multiplier"):
                facts.pop(k)
            facts.update(status="rejected", reason="client error: ValueError: NaN parameters")
    run = _write_run(tmp_path / "run", CLIENTS, sigmas, mutate=mutate)
    res = verify_run(run)
    assert res.ok, res.problems
    n = _line_no(run, lambda r: r["kind"] == "train" and r["country"] == "Borduria" and r["round"] == 1)
    assert any(note.startswith("Borduria:") and f"[{n}]" in note for note in res.notes), res.notes


# -- the accountants agree -----------------------------------------------------------------------

@pytest.mark.parametrize("history", [
    [STATS],
    [STATS, (1.4, 0.2, 150)],
    [STATS] + [(1.4, 0.2, 5)] * 30,       # the same run as 30 rounds: grouped before accounting
])
def test_pld_agrees_with_opacus_prv(history):
    pld, prv = pld_epsilon(history, DELTA), epsilon_of(history, DELTA)
    # PRV returns an upper bound padded by its eps_error=0.01: PLD sits just below it.
    assert pld <= prv * 1.001
    assert abs(pld - prv) <= 0.02 * prv, (pld, prv)


def test_calibrate_noise_cross_checked_by_pld():
    """The σ the clients calibrate with PRV keeps PLD's ε at or below the target (within 5%)."""
    q, steps = 0.2, 150
    sigma = calibrate_noise(EPS, DELTA, q, steps, prior=[STATS])
    eps = pld_epsilon([STATS, (sigma, q, steps)], DELTA)
    assert eps <= EPS * 1.05
    assert eps >= EPS * 0.9          # and it is not wastefully loose


def test_resumed_run_with_superseded_lines_verifies(tmp_path, sigmas):
    """A server crash in round 2 after one reply was ledgered, then a resume: the interrupted
    round's line is superseded (the client replays the same upload, no second charge)."""
    run = tmp_path / "run"
    run.mkdir()
    _server_json(run)
    led = Ledger(run / "ledger.jsonl")
    hist = {c: [STATS] for c, *_ in CLIENTS}

    def train_line(node, c, q, st, rnd):
        return {"kind": "train", "round": rnd, "node_id": node, "country": c, "sample_rate": q, "steps": st,
                "noise_multiplier": sigmas[c], "epsilon": epsilon_of(hist[c], DELTA),
                "total_steps": sum(s for *_, s in hist[c]), "history": [list(h) for h in hist[c]],
                "delta": DELTA, "status": "accepted", "reason": "", "bytes": 100}

    def round_line(rnd, lines):
        return {"kind": "round", "round": rnd, "seconds": 1.0, "accepted": len(lines), "rejected": 0,
                "evaluated": 0, "epsilon_max": max(l["epsilon"] for l in lines), "model_terms": len(lines)}

    for node, (c, *_) in enumerate(CLIENTS, 1):
        led.append({"kind": "stats", "round": 0, "node_id": node, "country": c, "status": "accepted", "reason": "",
                    "noise_multiplier": sigmas[c], "history": [list(STATS)], "epsilon": epsilon_of([STATS], DELTA)})
    lines = []
    for node, (c, q, st) in enumerate(CLIENTS, 1):
        hist[c] = hist[c] + [(sigmas[c], q, st)]
        lines.append(led.append(train_line(node, c, q, st, 1)))
    led.append(round_line(1, lines))
    checkpoint_lines = len(read_ledger(run / "ledger.jsonl"))
    c, q, st = CLIENTS[0]
    hist[c] = hist[c] + [(sigmas[c], q, st)]
    led.append(train_line(1, c, q, st, 2))                       # then the server dies
    seq = len(read_ledger(run / "ledger.jsonl"))
    led.append({"kind": "resume", "round": 1, "checkpoint_lines": checkpoint_lines,
                "interrupted_lines": seq - checkpoint_lines, "reason": "server restarted"})
    lines = [led.append(train_line(1, c, q, st, 2))]              # replayed: same history, no new charge
    for node, (c, q, st) in list(enumerate(CLIENTS, 1))[1:]:
        hist[c] = hist[c] + [(sigmas[c], q, st)]
        lines.append(led.append(train_line(node, c, q, st, 2)))
    led.append(round_line(2, lines))
    res = verify_run(run)
    assert res.ok, res.problems


# -- what the server copies from a client's reply ------------------------------------------------

def test_server_copies_only_whitelisted_facts_and_the_attestation():
    """A client's reply cannot set the server's own ledger fields (kind, round, status, country)
    nor add unknown ones; its attestation travels beside the facts."""
    from carbonfed.federation.server.strategy import _facts

    meta = {"facts": json.dumps({"kind": "stats", "round": 9, "status": "accepted", "country": "X", "extra": 1,
                                 "epsilon": 0.7, "history": [[4.0, 1.0, 1]]}),
            "attestation": "ab" * 32}
    base = {"kind": "train", "round": 3, "country": "Atlantis"}
    assert _facts(meta, base) == {"epsilon": 0.7, "history": [[4.0, 1.0, 1]], "attestation": "ab" * 32}
    assert _facts({"facts": "not json"}, base) == {} and _facts({"facts": "[1, 2]"}, base) == {}

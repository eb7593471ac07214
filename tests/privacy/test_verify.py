"""carbonfed.privacy.audit.verify on signed runs: chain, signatures and independent (dp_accounting PLD)
re-accounting of each client's own signed history.

Every run here is made by :mod:`signed_run_kit`: real Ed25519 keys, real statements, and each ε
the real PRV ε of the history the client signs (nothing mocked), so the tests exercise the very
disagreement budget the verifier allows. The attacks of issue 18 are in ``test_verify_attacks.py``.
"""

from __future__ import annotations

import json
import shutil

import pytest
from signed_run_kit import (DELTA, EPS, ROUNDS, STATS, TRAIN, RunSpec, is_line, line_no, make_keys, records,
                            write_chain, write_run)

from carbonfed.privacy.accountant import calibrate_noise, epsilon_of
from carbonfed.privacy.audit.claims import claims_block, read_claims_block
from carbonfed.privacy.audit.verify import main, pld_epsilon, verify_run
from carbonfed.privacy.signing import write_public_keys, public_hex
from carbonfed.privacy.statements import FIELD, chain_after, sign_facts, statement_hash


@pytest.fixture(scope="module")
def keys():
    return make_keys()


@pytest.fixture(scope="module")
def template(tmp_path_factory, keys):
    return write_run(tmp_path_factory.mktemp("template") / "run", keys)


@pytest.fixture
def run(template, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(template, dst)
    return dst


def _lines(run):
    return (run / "ledger.jsonl").read_text().splitlines()


def _rewrite(run, lines):
    (run / "ledger.jsonl").write_text("".join(line + "\n" for line in lines))


# -- a valid run ---------------------------------------------------------------------------------

def test_valid_run_verifies_and_pld_agrees_with_claims(run, keys, tmp_path):
    res = verify_run(run)
    assert res.ok, res.problems
    assert res.signed and res.statements_checked == 11 and res.files_matched == 3
    assert set(res.per_client) == set(TRAIN)
    assert res.epsilon_budget == EPS and res.delta == DELTA
    assert res.accountant == "dp_accounting.pld" and res.accountant_version
    for c, e in res.per_client.items():
        assert e["kind"] == "train" and e["round"] == ROUNDS
        assert e["history"][0] == list(STATS) and len(e["history"]) == 1 + ROUNDS
        assert abs(e["claimed"] - e["recomputed"]) <= 0.05 * e["recomputed"], (c, e)
        assert e["recomputed"] <= EPS
    assert res.epsilon_max_recomputed <= res.epsilon_max_claimed * 1.05
    assert res.documents_checked == ["report.json"]
    # without an anchor, the verdict says what it could not check; with one, it is anchored
    assert not res.anchored and any("public keys are the clients' own" in c for c in res.not_checked)
    pub = write_public_keys(tmp_path / "clients.pub.json", {c: public_hex(k) for c, k in keys.items()})
    anchored = verify_run(run, trusted_keys=pub)
    assert anchored.ok and anchored.anchored and not any("public keys" in c for c in anchored.not_checked)
    assert verify_run(run, charter_sha256=res.charter_sha256).anchored
    # the ledger file itself is accepted as the argument too
    assert verify_run(run / "ledger.jsonl").ok


def test_main_exit_codes_and_json(run, capsys):
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "OK (signed)" in out and "dp_accounting.pld" in out and "NOT checked" in out
    assert main([str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and set(data["per_client"]) == set(TRAIN) and data["signed"] is True
    # a budget of one's own below what the clients spent: non-zero exit, problems printed
    assert main([str(run), "--epsilon", "1.0"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "exceeds the budget ε=1 (--epsilon)" in out


# -- tampering -----------------------------------------------------------------------------------

@pytest.mark.parametrize("field,new", [("epsilon", 0.5), ("steps", 1)])
def test_edited_value_fails_naming_the_line(run, field, new):
    """An edited signed fact breaks the line's hash and its client's signature, both named."""
    n = line_no(run, is_line("train", "Borduria", 2))
    lines = _lines(run)
    rec = json.loads(lines[n - 1])
    assert rec[FIELD]["facts"][field] != new
    rec[FIELD]["facts"][field] = new                  # keep the old hash: a silent edit
    lines[n - 1] = json.dumps(rec, sort_keys=True)
    _rewrite(run, lines)
    res = verify_run(run)
    assert not res.ok
    assert any(p.startswith(f"line {n}:") and "edited" in p for p in res.problems), res.problems
    assert any(p.startswith(f"line {n} ") and "signature is not Borduria's" in p for p in res.problems), res.problems
    assert main([str(run)]) == 1


def test_deleted_line_fails(run):
    n = line_no(run, is_line("train", "Atlantis", 1))
    lines = _lines(run)
    del lines[n - 1]
    _rewrite(run, lines)
    res = verify_run(run)
    assert not res.ok
    assert any(p.startswith(f"line {n}:") and "deleted" in p for p in res.problems), res.problems
    assert any(p.startswith("Atlantis: its statement(s) 1..1 are missing") for p in res.problems), res.problems


def test_truncated_tail_fails(run):
    """The last round summary cut off: the signed round 2 has no summary, server.json disagrees."""
    _rewrite(run, _lines(run)[:-1])
    res = verify_run(run)
    assert not res.ok
    assert any(p.startswith("round 2:") and "no summary line" in p for p in res.problems), res.problems


def test_unparsable_line_fails(run):
    lines = _lines(run)
    lines[3] = lines[3][:-5]
    _rewrite(run, lines)
    res = verify_run(run)
    assert not res.ok and any(":4:" in p and "not a JSON line" in p for p in res.problems), res.problems


# -- dishonest or inconsistent claims (signed by the client itself) -------------------------------

def test_client_over_budget_fails_naming_client(tmp_path, keys):
    """Carpania trains with a quarter of its calibrated noise; its signed claims are honest PRV numbers."""
    sigma = calibrate_noise(EPS, DELTA, 0.2, 10, prior=[STATS])
    run = write_run(tmp_path / "run", keys, RunSpec(sigma={"Carpania": sigma / 4}))
    res = verify_run(run)
    assert not res.ok
    over = [p for p in res.problems if "exceeds the budget" in p]
    assert len(over) == 1 and over[0].startswith("Carpania:") and "signed charter" in over[0], res.problems
    e = res.per_client["Carpania"]
    assert e["recomputed"] > EPS
    assert f"{e['recomputed']:.6g}" in over[0] and f"{e['claimed']:.6g}" in over[0]
    assert res.epsilon_max_recomputed == e["recomputed"]
    assert main([str(run)]) == 1


def test_understated_epsilon_fails(tmp_path, keys):
    """A client that signs half its ε is caught by re-accounting, although its signatures verify."""
    liar = lambda c, h: epsilon_of(h, DELTA) * (0.5 if c == "Atlantis" else 1.0)  # noqa: E731
    run = write_run(tmp_path / "run", keys, RunSpec(claim=liar))
    res = verify_run(run)
    assert not res.ok
    n = line_no(run, is_line("train", "Atlantis", ROUNDS))
    assert any(p.startswith(f"line {n} (Atlantis)") and "claimed ε" in p for p in res.problems), res.problems
    assert not any("edited" in p or "signature" in p for p in res.problems)


@pytest.mark.parametrize("change,expect", [
    ({"steps": 3}, "reports mechanism"),                       # history says 5 steps this round
    ({"total_steps": 99}, "total_steps=99 but its history sums to 11"),
    ({"history": "drop round 1", "total_steps": 6}, "grew by only 0 steps"),
    ({"history": "stats only", "total_steps": 1}, "total steps fell from 6"),
    ({"history": "other sigma"}, "does not extend the history"),
])
def test_history_inconsistent_with_reported_steps_fails(tmp_path, keys, change, expect):
    def mutate(c, rnd, facts):
        if c == "Borduria" and rnd == 2:
            h = facts["history"]
            edits = {"drop round 1": h[:1] + h[2:], "stats only": h[:1],
                     "other sigma": [h[0], [h[1][0] * 2, h[1][1], h[1][2]], h[2]]}
            facts.update({k: edits[v] if k == "history" else v for k, v in change.items()})
    run = write_run(tmp_path / "run", keys, RunSpec(mutate=mutate))
    res = verify_run(run)
    assert not res.ok
    n = line_no(run, is_line("train", "Borduria", 2))
    assert any(p.startswith(f"line {n} (Borduria") and expect in p for p in res.problems), res.problems
    assert not any("edited" in p or "deleted" in p or "signature" in p for p in res.problems)


def test_client_error_then_signed_history_verifies(tmp_path, keys):
    """A train request that ended in a client error (no statement) is the server's line only; the
    client's next signed history carries the charge, so nothing is lost from the accounting."""
    run = write_run(tmp_path / "run", keys, RunSpec(error_in=(("Borduria", 1),)))
    res = verify_run(run)
    assert res.ok, res.problems
    assert res.per_client["Borduria"]["total_steps"] == 1 + 5 * ROUNDS


def test_resumed_run_with_a_replayed_reply_verifies(run):
    """A server crash in round 2 after one reply was ledgered, then a resume: the client replays the
    same signed reply (same statement, no second charge), which counts once; the resume line is
    described, not used."""
    recs = records(run)
    n = line_no(run, is_line("train", "Atlantis", 2))
    replay = dict(recs[n - 1])
    recs.insert(n, {"kind": "resume", "round": 1, "checkpoint_lines": n - 1, "interrupted_lines": 1,
                    "reason": "server restarted"})
    recs.insert(n + 1, replay)
    write_chain(run, recs)
    res = verify_run(run)
    assert res.ok, res.problems
    assert any(f"line {n + 2} repeats Atlantis's statement of line {n}" in note for note in res.notes), res.notes
    assert any("resume" in note and "description only" in note for note in res.notes)


def test_closing_statements_end_histories_and_are_final(tmp_path, keys):
    """A test client that missed the last round but signed its closing statement: its history is
    whole. A statement signed after a close (a client that did not stop) is named."""
    run = write_run(tmp_path / "run", keys, RunSpec(missing=(("Syldavia", ROUNDS),)))
    res = verify_run(run)
    assert not res.ok and any(p.startswith("Syldavia: its signed history ends") for p in res.problems)
    closed = write_run(tmp_path / "closed", keys, RunSpec(missing=(("Syldavia", ROUNDS),), close=True))
    res = verify_run(closed)
    assert res.ok, res.problems
    recs = records(closed)
    last = recs[-1][FIELD]
    with pytest.raises(ValueError, match="closing statement"):
        sign_facts(keys[last["client"]], chain_after(last), charter=last["charter"], client=last["client"],
                   kind="evaluate", rnd=ROUNDS, facts={})
    after = sign_facts(keys[last["client"]], {"seq": last["seq"] + 1, "head": statement_hash(last)},
                       charter=last["charter"], client=last["client"], kind="evaluate", rnd=ROUNDS, facts={})
    write_chain(closed, recs + [{"kind": "evaluate", "round": ROUNDS, "country": last["client"], "status": "rejected",
                                 FIELD: after}])
    assert any(f"line {len(recs) + 1}: {last['client']} signed statement {after['seq']} after its closing statement"
               in p for p in verify_run(closed).problems)


def test_documents_state_what_the_signed_record_proves(run):
    """report.html and privacy_statement.md carry their claims in one comment; a figure that the
    signed record does not prove, or a document with no claims to check, is named."""
    proven = verify_run(run)
    claims = {"privacy_mode": "dp+he", "rounds": ROUNDS, "epsilon_budget": EPS, "delta": DELTA,
              "epsilon_max": proven.epsilon_max_claimed,
              "epsilon_per_client": {c: e["claimed"] for c, e in proven.per_client.items()}}
    (run / "report.html").write_text(f"<html><body>{claims_block(claims)}<p>ε ≤ 3</p></body></html>")
    (run / "privacy_statement.md").write_text(f"# Privacy\n\n{claims_block(claims)}\n")
    assert read_claims_block((run / "report.html").read_text()) == claims
    res = verify_run(run)
    assert res.ok and res.documents_checked == ["report.json", "report.html", "privacy_statement.md"], res.problems
    edited = dict(claims, epsilon_per_client={**claims["epsilon_per_client"], "Borduria": 0.4}, delta=1e-3)
    (run / "privacy_statement.md").write_text(claims_block(edited))
    (run / "report.html").write_text("<html>ε_max = 0.4</html>")
    problems = verify_run(run).problems
    assert "privacy_statement.md: states delta=0.001, but the signed record proves delta=1e-05" in problems
    assert any(p.startswith("privacy_statement.md: states ε per client") and "Borduria (0.4" in p for p in problems)
    assert "report.html: carries no carbonfed-claims block, so its privacy figures were not checked" in problems


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

"""Issue 18's attacks on a run folder, each made as an attacker without the clients' keys would make it
(edit, then re-chain the ledger, which needs no key), and each rejected by ``verify`` with no keys,
with a message that names the line or file.

The runs are :mod:`signed_run_kit`'s: real Ed25519 signatures, real PRV claims, real PLD re-accounting.
"""

from __future__ import annotations

import json
import shutil

import pytest
from signed_run_kit import (DELTA, EPS, ROUNDS, STATS, TEST, TRAIN, RunSpec, is_line, line_no, make_keys, records,
                            write_chain, write_json, write_report, write_run)

from carbonfed.privacy.accountant import calibrate_noise, epsilon_of
from carbonfed.privacy.audit.verify import main, verify_run
from carbonfed.privacy.signing import public_hex, write_public_keys
from carbonfed.privacy.statements import FIELD, sign_facts


@pytest.fixture(scope="module")
def keys():
    return make_keys()


@pytest.fixture(scope="module")
def honest(tmp_path_factory, keys):
    return write_run(tmp_path_factory.mktemp("honest") / "run", keys)


@pytest.fixture(scope="module")
def overspent(tmp_path_factory, keys):
    """Carpania trained with a quarter of its noise: ε above the budget, honestly signed."""
    sigma = calibrate_noise(EPS, DELTA, 0.2, 10, prior=[STATS])
    return write_run(tmp_path_factory.mktemp("over") / "run", keys, RunSpec(sigma={"Carpania": sigma / 4}))


def _copy(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def _fails(run, *needles, **kw):
    """Verify ``run``: it fails, and each needle is in some problem; returns the problems."""
    res = verify_run(run, **kw)
    assert not res.ok
    for needle in needles:
        assert any(needle in p for p in res.problems), (needle, res.problems)
    return res.problems


def _over_budget(problems) -> bool:
    return any(p.startswith("Carpania:") and "exceeds the budget" in p for p in problems)


def test_appended_resume_line_excuses_nothing(overspent, tmp_path):
    """A `resume` line claiming every line before it was superseded: the over-budget client stays."""
    run = _copy(overspent, tmp_path)
    recs = records(run)
    write_chain(run, recs + [{"kind": "resume", "round": 0, "checkpoint_lines": 0, "interrupted_lines": len(recs)}])
    res = verify_run(run)
    assert not res.ok and _over_budget(res.problems), res.problems
    assert any(n.startswith(f"line {len(recs) + 1}:") and "description only" in n for n in res.notes)


def test_privacy_flipped_in_server_json_switches_nothing_off(overspent, tmp_path):
    run = _copy(overspent, tmp_path)
    server = json.loads((run / "server.json").read_text())
    server["config"]["privacy"] = "dp"
    write_json(run / "server.json", server)
    problems = _fails(run, "server.json: config privacy='dp' but the signed charter says privacy='dp+he'")
    assert _over_budget(problems)


def test_chain_rewritten_with_four_times_the_noise_fails_on_every_signature(overspent, tmp_path):
    """The issue's σ × 4 rewrite (claimed ε_max 0.57 instead of 3.0), with server.json flipped to dp."""
    run = _copy(overspent, tmp_path)
    recs = records(run)
    for rec in recs:
        st = rec.get(FIELD)
        if st and st["facts"].get("history"):
            st["facts"]["history"] = [[s * 4 if q < 1 else s, q, n] for s, q, n in st["facts"]["history"]]
            st["facts"]["epsilon"] = epsilon_of(st["facts"]["history"], DELTA)
            if "noise_multiplier" in st["facts"] and st["kind"] == "train":
                st["facts"]["noise_multiplier"] = st["facts"]["history"][-1][0]
    write_chain(run, recs)
    write_report(run)
    server = json.loads((run / "server.json").read_text())
    write_json(run / "server.json", {**server, "config": {**server["config"], "privacy": "dp"}})
    rewritten = [n for n, r in enumerate(recs, 1) if r.get("kind") == "train"]
    problems = _fails(run)
    assert len(rewritten) == len(TRAIN) * ROUNDS
    for n in rewritten:
        assert any(p.startswith(f"line {n} ") and "signature is not" in p for p in problems), (n, problems)


def test_stripped_statements_rechained_fail(honest, tmp_path):
    """Training lines stripped of their signed facts and re-chained."""
    run = _copy(honest, tmp_path)
    recs = records(run)
    for rec in recs:
        if rec.get("kind") == "train":
            rec.pop(FIELD)
    write_chain(run, recs)
    problems = _fails(run, "carries no signed statement")
    for c in TRAIN:
        n = line_no(run, is_line("train", c, 1))
        assert any(p.startswith(f"line {n} ({c}, train round 1)") for p in problems), problems
        assert any(p.startswith(f"{c}: its signed history ends") for p in problems), problems


def _drop_round(recs, rnd, keep=lambda r: False):
    return [r for r in recs if r.get("round") != rnd or r.get("kind") == "stats" or keep(r)]


def test_dropped_last_round_with_rounds_completed_edited_fails(overspent, tmp_path):
    run = _copy(overspent, tmp_path)
    write_chain(run, _drop_round(records(run), ROUNDS))
    server = json.loads((run / "server.json").read_text())
    server["rounds_completed"] = ROUNDS - 1
    write_json(run / "server.json", server)
    write_report(run)
    problems = _fails(run)
    for c in (*TRAIN, *TEST):
        assert any(p.startswith(f"{c}: its signed history ends") and f"charter plans {ROUNDS} round(s)" in p
                   for p in problems), (c, problems)


def test_truncated_last_round_with_its_summary_edited_fails(honest, tmp_path):
    """The last round's training lines cut, its summary edited to match (nothing accepted)."""
    run = _copy(honest, tmp_path)
    recs = _drop_round(records(run), ROUNDS, keep=lambda r: r.get("kind") in ("round", "evaluate"))
    for r in recs:
        if r.get("kind") == "round" and r["round"] == ROUNDS:
            r.update(accepted=0, rejected=0, epsilon_max=None)
    write_chain(run, recs)
    problems = _fails(run)
    assert all(any(p.startswith(f"{c}: its signed history ends") for p in problems) for c in TRAIN), problems


def test_consistent_rewrite_without_keys_fails_naming_the_line(honest, tmp_path):
    """One ε rewritten inside its statement, the summary and report.json to match, the chain re-made."""
    run = _copy(honest, tmp_path)
    recs = records(run)
    n = line_no(run, is_line("train", "Atlantis", ROUNDS))
    recs[n - 1][FIELD]["facts"]["epsilon"] = 0.5
    write_chain(run, recs)
    write_report(run)
    problems = _fails(run, "signature is not Atlantis's")
    assert any(p.startswith(f"line {n} (Atlantis, train round {ROUNDS})") for p in problems), problems


def test_report_json_epsilon_edited_fails(honest, tmp_path):
    run = _copy(honest, tmp_path)
    report = json.loads((run / "report.json").read_text())
    report["privacy"]["epsilon_max"] = 0.5
    write_json(run / "report.json", report)
    _fails(run, "report.json: states epsilon_max=0.5, but the signed record proves")


@pytest.mark.parametrize("args", [["--epsilon", "nan"], ["--epsilon", "inf"], ["--epsilon", "-1"], ["--epsilon", "0"],
                                  ["--delta", "0"], ["--delta", "1.5"], ["--delta", "nan"], ["--rel-tol", "-0.1"]])
def test_bad_arguments_are_errors(honest, args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(honest), *args])
    assert exc.value.code == 2 and "must" in capsys.readouterr().err
    keyword = {"--epsilon": "epsilon_budget", "--delta": "delta", "--rel-tol": "rel_tol"}[args[0]]
    with pytest.raises(ValueError):
        verify_run(honest, **{keyword: float(args[1])})


def test_deleted_or_swapped_aggregate_files_are_named(honest, tmp_path):
    run = _copy(honest, tmp_path)
    (run / "aggregates" / "metrics_round_002.bin").unlink()
    _fails(run, "aggregates/metrics_round_002.bin is missing: the ledger accepted the metrics of round 2")
    run = _copy(honest, tmp_path / "swap")
    a, b = run / "aggregates" / "metrics_round_001.bin", run / "aggregates" / "metrics_round_002.bin"
    data = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data)
    _fails(run, "aggregates/metrics_round_001.bin: SHA-256", "aggregates/metrics_round_002.bin: SHA-256")


def test_swapped_model_with_the_manifest_rewritten_fails_on_what_clients_signed(honest, tmp_path):
    """The server swaps a global model and rewrites its own manifest: the clients signed what they received."""
    run = _copy(honest, tmp_path)
    (run / "aggregates" / "model_round_001.bin").write_bytes(b"another model")
    recs = records(run)
    for r in recs:
        r.pop("aggregates", None)
    write_chain(run, recs)
    _fails(run, "aggregates/model_round_001.bin: its SHA-256", "the clients of round 2 signed they trained on")


def test_min_train_clients_lowered_by_the_operator_is_named(honest, tmp_path, keys):
    run = _copy(honest, tmp_path)
    server = json.loads((run / "server.json").read_text())
    server["config"]["min-train-clients"] = 0
    write_json(run / "server.json", server)
    _fails(run, "server.json: config min-train-clients=0 but the signed charter says min-train-clients=2")
    # a client that accepted an aggregate of one contribution did not enforce the charter: named
    lone = write_run(tmp_path / "lone", keys, RunSpec(terms={2: 1}))
    n = line_no(lone, is_line("train", "Atlantis", 2))
    _fails(lone, f"line {n} (Atlantis, train round 2): accepted a model aggregate of 1 contribution(s), below the "
                 "charter's min-train-clients=2")


def test_deleted_client_line_rechained_fails(honest, tmp_path):
    run = _copy(honest, tmp_path)
    n = line_no(run, is_line("train", "Borduria", 1))
    write_chain(run, [r for i, r in enumerate(records(run), 1) if i != n])
    _fails(run, "Borduria: its statement(s) 1..1 are missing from the ledger")


def test_line_replayed_from_an_earlier_round_fails(honest, tmp_path):
    run = _copy(honest, tmp_path)
    recs = records(run)
    n1, n2 = line_no(run, is_line("train", "Atlantis", 1)), line_no(run, is_line("train", "Atlantis", 2))
    recs[n2 - 1] = {**recs[n1 - 1], "round": 2}                # round 2's line replaced by round 1's
    write_chain(run, recs)
    _fails(run, f"line {n2}: the line records (Atlantis, train round 2) but carries the signed statement "
                "(Atlantis, train round 1)")
    recs = records(honest)
    write_chain(run, recs[:n2] + [dict(recs[n1 - 1])] + recs[n2:])   # round 1's line again, after round 2's
    _fails(run, f"line {n2 + 1}: repeats Atlantis's statement 1 of round 1 (line {n1}) after its statement 2",
           "a line replayed from an earlier round")


def test_signature_from_another_client_fails(honest, tmp_path, keys):
    run = _copy(honest, tmp_path)
    recs = records(run)
    na, nb = line_no(run, is_line("train", "Atlantis", 2)), line_no(run, is_line("train", "Borduria", 2))
    recs[nb - 1][FIELD] = recs[na - 1][FIELD]                   # Atlantis's statement on Borduria's line
    write_chain(run, recs)
    _fails(run, f"line {nb}: the line records (Borduria, train round 2) but carries the signed statement "
                "(Atlantis, train round 2)")
    st = recs[na - 1][FIELD]                                    # Borduria's name, Atlantis's key
    recs[nb - 1][FIELD] = sign_facts(keys["Atlantis"], {"seq": 2, "head": records(honest)[nb - 1][FIELD]["prev"]},
                                     charter=st["charter"], client="Borduria", kind="train", rnd=2, facts=st["facts"],
                                     inputs=st["inputs"])
    write_chain(run, recs)
    _fails(run, f"line {nb} (Borduria, train round 2): its signature is not Borduria's")


def test_forged_charter_fails(honest, tmp_path, keys):
    run = _copy(honest, tmp_path)
    doc = json.loads((run / "charter.json").read_text())
    doc["charter"]["config"]["epsilon"] = 10.0                 # a larger budget, after the fact
    write_json(run / "charter.json", doc)
    _fails(run, "charter.json: its sha256 field", "charter.json: Atlantis's endorsement is invalid",
           "signed for another charter")
    # a whole folder made again with keys of the attacker's own: consistent, so only an anchor tells
    fake = write_run(tmp_path / "fake", make_keys())
    res = verify_run(fake)
    assert res.ok and not res.anchored and any("public keys are the clients' own" in c for c in res.not_checked)
    pub = write_public_keys(tmp_path / "clients.pub.json", {c: public_hex(k) for c, k in keys.items()})
    _fails(fake, "charter.json: Atlantis's public key differs from the trusted key list", trusted_keys=pub)
    real = json.loads((honest / "charter.json").read_text())["sha256"]
    _fails(fake, f"is not the published {real}", charter_sha256=real)


@pytest.mark.parametrize("garbage", [
    lambda recs: recs[0].update(signed="a string"),
    lambda recs: recs[0].update(signed={**recs[0]["signed"], "seq": "one"}),
    lambda recs: recs[3]["signed"]["facts"].update(sample_rate="fast", history=[["x", 1, 1]]),
    lambda recs: recs[3]["signed"].update(inputs={"model": 1, "model_terms": None, "stats": "all"}),
    lambda recs: recs[7].update(kind=None, round="late", country=["x"]),
    lambda recs: recs.append({"kind": "round", "round": None, "aggregates": {"../../etc/passwd": 5}}),
])
def test_malformed_folders_fail_without_crashing(honest, tmp_path, garbage):
    run = _copy(honest, tmp_path)
    recs = records(run)
    garbage(recs)
    write_chain(run, recs)
    assert not verify_run(run).ok
    for name, content in (("charter.json", "[1, 2]"), ("report.json", '{"privacy": 5, "rounds": "x"}'),
                          ("server.json", '{"config": [], "he": 3}')):
        (run / name).write_text(content)
        assert not verify_run(run).ok

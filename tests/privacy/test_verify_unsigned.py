"""carbonfed.privacy.audit.legacy: ledgers without a charter (what the federation writes until its clients
sign, issue 18 phase 2) are still audited for consistency, and the verdict says they are unsigned.

The ledgers are written with :class:`carbonfed.privacy.ledger.Ledger` as the server writes them, with
real PRV claims and, for the attestation test, real HMACs under a real secret context.
"""

from __future__ import annotations

import json

import pytest

from carbonfed.privacy.accountant import calibrate_noise, epsilon_of
from carbonfed.privacy.attest import FIELD as ATTESTATION
from carbonfed.privacy.attest import attest, attestation_key
from carbonfed.privacy.audit.legacy import config_digest
from carbonfed.privacy.audit.verify import verify_run
from carbonfed.privacy.he import SECRET_CONTEXT_FILE
from carbonfed.privacy.ledger import Ledger, read_ledger

EPS, DELTA, ROUNDS = 3.0, 1e-5, 2
STATS = (4.0, 1.0, 1)
CLIENTS = ("Atlantis", "Borduria", "Carpania")
CONFIG = {"privacy": "dp+he", "epsilon": EPS, "delta": DELTA, "rounds": ROUNDS}


def _write_run(run, sigma, claim=None, key=None, resume_after_one=False):
    """Stats lines, then per round train and round lines, as the unsigned server writes them; with
    ``key``, each line of facts carries its client's HMAC attestation."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "server.json").write_text(json.dumps({"config": CONFIG, "rounds_completed": ROUNDS}))
    led, hist = Ledger(run / "ledger.jsonl"), {c: [STATS] for c in CLIENTS}
    claim = claim or (lambda c, h: epsilon_of(h, DELTA))

    def facts_line(kind, rnd, node, c, **extra):
        rec = {"kind": kind, "round": rnd, "node_id": node, "country": c, "status": "accepted", "reason": "",
               "history": [list(h) for h in hist[c]], "epsilon": claim(c, hist[c]), "delta": DELTA, **extra}
        if key:
            rec[ATTESTATION] = attest(key, c, kind, 1 if kind == "stats" else None, rnd, config_digest(CONFIG), rec)
        return led.append(rec)

    for node, c in enumerate(CLIENTS, 1):
        facts_line("stats", 0, node, c, noise_multiplier=STATS[0])
    for rnd in range(1, ROUNDS + 1):
        lines = []
        for node, c in enumerate(CLIENTS, 1):
            hist[c] = hist[c] + [(sigma[c], 0.2, 5)]
            lines.append(facts_line("train", rnd, node, c, sample_rate=0.2, steps=5, noise_multiplier=sigma[c],
                                    total_steps=sum(s for *_, s in hist[c])))
            if resume_after_one and rnd == ROUNDS and node == 1:      # the server dies, restarts, replays
                checkpoint = len(read_ledger(run / "ledger.jsonl")) - 1
                led.append({"kind": "resume", "round": rnd - 1, "checkpoint_lines": checkpoint, "interrupted_lines": 1})
                lines = [led.append({k: v for k, v in lines[0].items() if k not in ("seq", "prev_hash", "hash")})]
        led.append({"kind": "round", "round": rnd, "seconds": 1.0, "accepted": len(lines), "rejected": 0,
                    "evaluated": 0, "epsilon_max": max(r["epsilon"] for r in lines), "model_terms": len(lines)})
    return run


@pytest.fixture(scope="module")
def sigma():
    s = calibrate_noise(EPS, DELTA, 0.2, 5 * ROUNDS, prior=[STATS])
    return {c: s for c in CLIENTS}


def test_unsigned_ledger_is_audited_and_said_to_be_unsigned(tmp_path, sigma):
    run = _write_run(tmp_path / "run", sigma)
    res = verify_run(run)
    assert res.ok, res.problems
    assert not res.signed and res.notes[0].startswith("UNSIGNED ledger")
    assert any("unsigned" in c for c in res.not_checked) and set(res.per_client) == set(CLIENTS)
    strict = verify_run(run, allow_unsigned=False)
    assert not strict.ok and any("no charter.json" in p for p in strict.problems)


def test_unsigned_claims_are_still_re_accounted(tmp_path, sigma):
    liar = lambda c, h: epsilon_of(h, DELTA) * (0.5 if c == "Atlantis" else 1.0)  # noqa: E731
    res = verify_run(_write_run(tmp_path / "liar", sigma, claim=liar))
    assert not res.ok and any("(Atlantis): claimed ε" in p for p in res.problems), res.problems
    over = verify_run(_write_run(tmp_path / "over", {**sigma, "Carpania": sigma["Carpania"] / 4}))
    assert not over.ok and any(p.startswith("Carpania:") and "exceeds the budget" in p for p in over.problems)


def test_unsigned_resumed_run_with_superseded_lines_verifies(tmp_path, sigma):
    res = verify_run(_write_run(tmp_path / "run", sigma, resume_after_one=True))
    assert res.ok, res.problems


def test_unsigned_report_json_is_checked_too(tmp_path, sigma):
    run = _write_run(tmp_path / "run", sigma)
    eps = {c: e["claimed"] for c, e in verify_run(run).per_client.items()}
    (run / "report.json").write_text(json.dumps({"privacy": {"epsilon_max": 0.5, "epsilon_per_client": eps}}))
    res = verify_run(run)
    assert not res.ok and any(p.startswith("report.json: states epsilon_max=0.5") for p in res.problems)


def test_unsigned_hmac_attestations_with_the_keys(tmp_path, sigma, keys):
    """The transitional HMAC check: it needs the secret context, which is why signatures replace it."""
    run = _write_run(tmp_path / "run", sigma, key=attestation_key(keys["dir"] / SECRET_CONTEXT_FILE))
    res = verify_run(run, keys_dir=keys["dir"])
    assert res.ok and res.attestations_checked == len(CLIENTS) * (1 + ROUNDS), res.problems
    assert res.notes and any("attestation(s) not checked" in n for n in verify_run(run).notes)


def test_config_digest_is_the_run_configs():
    """The unsigned audit recomputes RunConfig.digest() without importing federation."""
    from carbonfed.federation.config import RunConfig

    for cfg in (RunConfig(), RunConfig(privacy="dp", epsilon=8.0, rounds=3, hidden="linear")):
        assert config_digest(json.loads(json.dumps(cfg.to_flower()))) == cfg.digest()

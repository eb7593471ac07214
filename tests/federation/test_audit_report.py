"""The audit's verdict (federation/experiments/audit_attack.py) and how the run's documents state it
(federation/report/audit_sections.py): "claim refuted" exactly when a line's bound exceeds the
smallest claim, the headline is the white-box line when it ran, a fault drill is named as such."""

import json
import time

from carbonfed.federation.config import RunConfig
from carbonfed.federation.experiments import audit_attack as audit
from carbonfed.federation.report.audit_sections import empirical_html, empirical_markdown, empirical_record

LINE = {"epsilon_lower_bound_pure": 0.0, "m": 1000, "guesses": 200, "correct": 150, "score": "regression",
        "k_per_side": 100, "tests": 10, "method": "white-box <one-run>", "confidence": 0.95, "delta": 1e-5}


def _line(bound, claimed=3.0, **extra):
    return {**LINE, "epsilon_lower_bound": bound, "claimed_epsilon_canary_run": claimed, **extra}


def test_verdict():
    assert audit.verdict(None, {"blackbox": _line(9.0)}) == ("no claim", None)
    assert audit.verdict(3.0, {"whitebox": _line(1.2), "blackbox": _line(0.0)}) == ("consistent", None)
    assert audit.verdict(3.0, {"whitebox": _line(3.0), "blackbox": None}) == ("consistent", None)
    assert audit.verdict(3.0, {"whitebox": _line(0.4), "blackbox": _line(3.2)}) == ("claim refuted", "blackbox")


def test_the_documents_state_the_verdict(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert empirical_record(run) is None and empirical_html(None) == "" and empirical_markdown(None) == []
    (run / "report.json").write_text(json.dumps({"privacy": {"epsilon_max": 2.999}}))
    cfg = RunConfig(privacy="dp+he")
    drill = _line(5.4, 2.998, fault_drill="noise multiplier secretly x0.1; the ledger claims the full sigma")
    res = audit._result(run, cfg, 0.95, {"whitebox": drill, "blackbox": _line(0.1)}, None, time.time())
    assert res["verdict"] == "claim refuted" and res["refuted_by"] == "whitebox" and res["claim_tested"] == 2.998
    assert res["headline"] == "whitebox" and res["epsilon_lower_bound"] == 5.4 and res["mia"] is None
    (run / "audit.json").write_text(json.dumps(res))
    rec = empirical_record(run)
    assert rec["verdict"] == "claim refuted" and rec["bounds"] == {"whitebox": 5.4, "blackbox": 0.1}
    page = empirical_html(rec)
    assert 'id="empirical-audit"' in page and "CLAIM REFUTED" in page and "FAULT DRILL" in page
    assert "ε ≥ 5.4000" in page and "95% confidence" in page and "&lt;one-run&gt;" not in page
    assert "claimed ε = 2.9980" in empirical_markdown(rec)[0] and "<one-run>" in empirical_markdown(rec)[1]
    ok = audit._result(run, cfg, 0.95, {"whitebox": _line(1.1), "blackbox": None}, None, time.time())
    (run / "audit.json").write_text(json.dumps(ok))
    page = empirical_html(empirical_record(run))
    assert "CONSISTENT" in page and "banner ok" in page
    (run / "audit.json").write_text(json.dumps({"epsilon_lower_bound": 0.0}))       # an audit of the older format
    assert empirical_record(run) is None

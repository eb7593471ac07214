"""An audit can be repeated and leaves the audited folder as it found it (issue 23): three
`carbonfed audit-attack` runs in a row on one `dp+he` run folder (a 2-round run of the 15-party
example CSV: the audits re-run its federation four times) all complete, each white-box audit stays below the claim, and every file of the folder but
the audit's own `audit.json` is byte-identical before and after. The replay cache of a client's
state folder is keyed by the key it was made under."""

import hashlib
import json

import pytest
from flwr.app import Context, RecordDict

from carbonfed.federation.client.state import PersistentState, load_state, recall, remember
from carbonfed.data.example import write_example_csv
from carbonfed.federation.config import RunConfig
from carbonfed.federation.experiments import audit_attack as audit
from carbonfed.federation.run_data import with_data_schema
from carbonfed.federation.simulation import run_simulation
from carbonfed.federation.report_command import main as report_main

OWN_OUTPUTS = {"audit.json"}


def _hashes(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in OWN_OUTPUTS}


def test_a_reply_is_replayed_only_under_the_key_it_was_made_under(tmp_path):
    path = tmp_path / "Albania-0123.json"
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    first = load_state(ctx, path, "a" * 64)
    remember(first, "setup", "k1", {"fingerprint": "a" * 64}, b"ciphertext under key a")
    assert recall(load_state(ctx, path, "a" * 64), "setup", "k1") == ({"fingerprint": "a" * 64},
                                                                      b"ciphertext under key a")
    assert recall(load_state(ctx, path, "b" * 64), "setup", "k1") is None       # another key: never replayed
    assert recall(load_state(ctx, path, ""), "setup", "k1") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Albania-0123.aaaaaaaaaaaaaaaa.setup.bin",
                                                          "Albania-0123.json"]
    plain = PersistentState({}, tmp_path / "Algeria-0123.json")                 # no key (plaintext runs)
    remember(plain, "close", "k2", {}, b"")
    assert recall(plain, "close", "k2") == ({}, b"") and (tmp_path / "Algeria-0123.close.bin").is_file()


@pytest.mark.slow
def test_three_audits_in_a_row_leave_the_folder_byte_identical(keys_dir, tmp_path, capfd):
    table = write_example_csv(tmp_path / "example.csv", parties=15)
    run = tmp_path / "run"
    cfg = with_data_schema(RunConfig(dataset="csv", data=str(table), client_col="site", label_col="level",
                                     privacy="dp+he", rounds=2, keys_dir=str(keys_dir), out_dir=str(run)))
    run_simulation(cfg)
    assert report_main([str(run), "--keys", str(keys_dir)]) == 0
    before = _hashes(run)
    claim = json.loads((run / "report.json").read_text())["privacy"]["epsilon_max"]
    for i in range(3):
        capfd.readouterr()
        # the first audit runs both lines (and membership inference: the run has model.pt), the others white-box only
        argv = [str(run), "--canaries", "100", "--wb-canaries", "600", "--json"] + (["--no-blackbox"] if i else [])
        assert audit.main(argv) == 0, i
        res = json.loads(capfd.readouterr().out)             # exactly one JSON object on stdout
        wb, bb = res["whitebox"], res["blackbox"]
        assert res["verdict"] == "consistent" and res["headline"] == "whitebox" and (bb is None) == (i > 0)
        assert res["claimed_epsilon"] == pytest.approx(claim) and 0 <= res["epsilon_lower_bound"] <= claim
        assert res["epsilon_lower_bound"] == wb["epsilon_lower_bound"] and res["confidence"] == 0.95
        assert wb["uploads_read"] == wb["clients"] * cfg.rounds and wb["m"] == 600
        assert wb["masks_off"] == getattr(cfg, "masked", False)      # the per-client release the ledger accounts
        assert wb["claimed_epsilon_canary_run"] == pytest.approx(claim, rel=1e-6)
        assert 0 <= wb["correct"] <= wb["guesses"] <= 600
        if bb is not None:
            assert bb["m"] == 100 and sum(bb["inclusion"]) == bb["included"] and 0 <= bb["epsilon_lower_bound"] <= claim
            assert bb["claimed_epsilon_canary_run"] == pytest.approx(claim, rel=1e-6)
            assert 0 <= res["mia_auc"] <= 1 and 0 <= res["tpr_at_0_1pct_fpr"] <= res["tpr_at_1pct_fpr"] <= 1
        assert _hashes(run) == before, f"audit {i + 1} changed the audited folder"
        assert json.loads((run / "audit.json").read_text())["epsilon_lower_bound"] == res["epsilon_lower_bound"]
    # `carbonfed report` then states the last audit's verdict in report.json, report.html and the statement
    assert report_main([str(run), "--keys", str(keys_dir)]) == 0
    rec = json.loads((run / "report.json").read_text())["audit"]["empirical"]
    assert rec["verdict"] == "consistent" and rec["epsilon_lower_bound"] == res["epsilon_lower_bound"]
    assert 'id="empirical-audit"' in (run / "report.html").read_text()
    assert "Empirical privacy audit: CONSISTENT" in (run / "privacy_statement.md").read_text()

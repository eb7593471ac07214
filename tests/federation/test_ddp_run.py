"""A real ``ddp+he`` simulation (Flower, BFV, signed statements) on the seed data, three rounds:
it completes within ε, ``verify`` passes with the independent ddp accountant, the server's
ciphertext sums decrypt to the sum of the clients' integer uploads, and a ledger whose
contributor count was raised (re-chained, as a server could) is caught."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from carbonfed.data import load_dataset, split_countries
from carbonfed.federation.client.participant import Layouts, make_cipher
from carbonfed.federation.config import RunConfig
from carbonfed.federation.report.build import build_report
from carbonfed.federation.report.statement import write_privacy_statement
from carbonfed.federation.simulation import run_simulation
from carbonfed.privacy.audit.ddp_epsilon import recompute_epsilon
from carbonfed.privacy.audit.verify import verify_run
from carbonfed.privacy.distributed_dp import HISTORY_KEYS
from carbonfed.privacy.he import SECRET_CONTEXT_FILE, load_secret_context
from carbonfed.privacy.ledger import line_hash, read_ledger

pytestmark = pytest.mark.slow

ROUNDS = 3


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, keys_dir):
    tmp = tmp_path_factory.mktemp("ddp")
    # unmasked, so that each upload decrypts to the client's own shares (the masked path: test_mask_*)
    cfg = RunConfig(privacy="ddp+he", masks=False, rounds=ROUNDS, average_last=2, keys_dir=str(keys_dir),
                    out_dir=str(tmp / "run"), state_dir=str(tmp / "state"))
    return cfg, run_simulation(cfg)


def test_the_run_completes_within_epsilon_and_verify_recomputes_it(ddp_run):
    cfg, out = ddp_run
    ledger = read_ledger(out / "ledger.jsonl")
    rounds = [r for r in ledger if r.get("kind") == "round"]
    n_train = len(split_countries(load_dataset("seed").countries(), 0).train)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["ddp"]["contributors"] == n_train and r["ddp"]["released"] for r in rounds)
    assert all(r["ddp"]["min_noise_clients"] == cfg.noise_floor(n_train) for r in rounds)
    res = verify_run(out)
    assert res.ok, res.problems
    assert res.epsilon_max_claimed <= cfg.epsilon and res.ddp["epsilon"] <= cfg.epsilon
    for e in res.per_client.values():
        assert abs(e["claimed"] - e["recomputed"]) <= 0.01 * e["recomputed"]
    train = [r for r in ledger if r.get("kind") == "train" and r["status"] == "accepted"]
    hist = [dict(zip(HISTORY_KEYS, m)) for m in train[-1]["signed"]["facts"]["history"]]
    # the line does not repeat the signed history, which holds a repeated release once, its steps counted
    assert all("history" not in r for r in ledger) and hist[-1]["steps"] == ROUNDS
    assert sum(m["steps"] for m in hist) == train[-1]["total_steps"] and len(hist) < train[-1]["total_steps"]
    assert abs(recompute_epsilon(hist, cfg.delta) - res.epsilon_max_claimed) <= 0.01 * res.epsilon_max_claimed
    assert res.ddp["epsilon"] <= res.epsilon_max_claimed + 1e-9      # all contributed: more noise than the floor


def test_the_servers_sum_is_the_sum_of_the_clients_uploads(ddp_run):
    """Each client's last upload is in its replay cache (state-dir): decrypted one by one (only a
    key holder can), they add up modulo t to the decrypted round-3 aggregate."""
    cfg, out = ddp_run
    ctx = load_secret_context(cfg.keys_dir + "/" + SECRET_CONTEXT_FILE)
    ds = load_dataset("seed")
    lay = Layouts.for_run(cfg, len(ds.features), len(ds.classes)).update
    cipher = make_cipher(cfg, ctx, lay.length)
    uploads = sorted((out.parent / "state").glob("*.train.bin"))
    total = sum(cipher.decrypt(p.read_bytes()).astype(np.int64) for p in uploads)
    agg = cipher.decrypt((out / "aggregates" / f"model_round_{ROUNDS:03d}.bin").read_bytes())
    t = cipher.plain_modulus
    assert len(uploads) == len(split_countries(ds.countries(), 0).train)
    assert np.array_equal(np.mod(total, t), np.mod(agg, t))


def test_the_report_and_statement_state_the_central_and_per_upload_guarantees(ddp_run):
    """report.json's privacy.ddp is the ledger's central ε, the one verify recomputes on its own; a
    decrypted single upload has only its share of the noise, so its ε is far larger; the statement
    says both; the preprocessing text names the run's log range."""
    cfg, out = ddp_run
    rep = build_report(out, cfg.keys_dir)
    ddp = rep["privacy"]["ddp"]
    res = verify_run(out)
    assert abs(ddp["epsilon_central"] - res.ddp["epsilon"]) <= 0.01 * res.ddp["epsilon"]
    assert ddp["rounds_released"] == ROUNDS and ddp["epsilon_central"] <= cfg.epsilon < ddp["epsilon_per_upload"]
    pre = json.dumps(rep["preprocessing"], ensure_ascii=False)
    assert f"expm1({cfg.log_bound:g}·" in pre or f"±{cfg.log_bound:g}" in pre
    text = write_privacy_statement(out, rep, res).read_text(encoding="utf-8")
    assert f"ε = {ddp['epsilon_central']:.4f}" in text and f"ε = {ddp['epsilon_per_upload']:.4f}" in text


def _rechain(records: list[dict]) -> list[dict]:
    prev = "0" * 64
    for rec in records:
        rec["prev_hash"] = prev
        rec["hash"] = prev = line_hash(rec)
    return records


def test_verify_catches_a_raised_contributor_count(ddp_run, tmp_path):
    _, out = ddp_run
    forged = tmp_path / "forged"
    shutil.copytree(out, forged)
    records = read_ledger(forged / "ledger.jsonl")
    line = next(r for r in records if r.get("kind") == "round" and r["round"] == 2)
    line["ddp"]["contributors"] += 20
    (forged / "ledger.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in _rechain(records)))
    res = verify_run(forged)
    assert not res.ok
    assert any("round 2" in p and "raised count" in p for p in res.problems), res.problems


def test_a_client_asked_again_for_a_round_counts_once(ddp_run, tmp_path):
    """After a server restart the clients of the interrupted round sign that round again: the
    round's contributors are distinct signed clients, so a repeated statement raises no count."""
    _, out = ddp_run
    forged = tmp_path / "again"
    shutil.copytree(out, forged)
    records = read_ledger(forged / "ledger.jsonl")
    at = next(i for i, r in enumerate(records) if r.get("kind") == "train" and r["round"] == 2)
    records.insert(at, json.loads(json.dumps(records[at])))        # the same client's statement, twice
    (forged / "ledger.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in _rechain(records)))
    res = verify_run(forged)
    assert not any("contributors but" in p for p in res.problems), res.problems
    assert res.ddp["contributors"]["2"] == verify_run(out).ddp["contributors"]["2"]

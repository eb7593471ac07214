"""End to end through Flower's simulation engine (Ray), on the real seed data, real TenSEAL/Opacus."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant

from carbonfed.federation.config import RunConfig
from carbonfed.federation.report.build import build_report
from carbonfed.federation.simulation import run_simulation
from carbonfed.privacy.binding import BindingError
from carbonfed.privacy.ledger import Ledger, check_chain, read_ledger
from carbonfed.privacy.statements import line_history

pytestmark = pytest.mark.slow   # builds whole federations

BIN = Path(sys.executable).parent / "carbonfed"


def _run(tmp_path, keys_dir, privacy, rounds=2, **kw):
    cfg = RunConfig(privacy=privacy, rounds=rounds, keys_dir=str(keys_dir) if "he" in privacy else "",
                    out_dir=str(tmp_path / privacy.replace("+", "")), **kw)
    run_simulation(cfg)
    return cfg, build_report(cfg.out_dir, keys_dir)


@pytest.fixture(scope="module")
def dphe(dphe_run, keys_dir):
    """The session's faulty dp+he run (tests/federation/conftest.py) and its report."""
    cfg, out, _ = dphe_run
    return cfg, json.loads((out / "report.json").read_text())


def pld_epsilon(history, delta):
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, steps in history:
        event = dpa.GaussianDpEvent(sigma) if q == 1.0 else dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma))
        acc.compose(event, int(steps))
    return acc.get_epsilon(delta)


def test_report_shape_and_privacy(dphe):
    cfg, rep = dphe
    assert rep["dataset"] == "seed" and rep["privacy_mode"] == "dp+he" and rep["rounds"] == 2
    # the foreign-key client was refused at setup, so 130 of the partition's 131 trained
    assert rep["clients"] == {"train": 130, "test": 33, "partition": {"train": 131, "test": 33}}
    assert 0 <= rep["metrics"]["accuracy"] <= 1 and 0 <= rep["metrics"]["macro_f1"] <= 1
    assert [h["round"] for h in rep["history"]] == [1, 2]
    assert [h["model_rounds"] for h in rep["history"]] == [[1], [1, 2]] and rep["model"]["averaged_rounds"] == [1, 2]
    p = rep["privacy"]
    assert p["epsilon_max"] <= cfg.epsilon and p["delta"] == cfg.delta and p["accountant"] == "opacus.prv"
    # the foreign-key client got no role, but it released (and signed) its statistics before the server
    # rejected them: its ε counts
    assert len(p["epsilon_per_client"]) == 131 and "Argentina" in p["epsilon_per_client"]
    he = rep["he"]
    assert he["server_has_secret_key"] is False and he["security_bits"] >= 128
    assert he["upload_bytes_per_client_round"] < 1.41e6 / 20
    for k in ("total_s", "per_round_s"):
        assert rep["timing"][k] > 0
    # the default model is the seed preset's (the main job's) linear model; model.pt holds exactly the parameters stated
    assert rep["model"]["architecture"] == "linear 21→5 (multinomial logistic regression)"
    state = torch.load(rep["model"]["path"], weights_only=False)["state_dict"]
    assert rep["model"]["parameters"] == sum(v.numel() for v in state.values()) == 21 * 5 + 5


def test_reported_metrics_are_the_final_models_on_the_held_out_rows(dphe):
    """The confusion matrix the held-out clients summed under encryption equals scikit-learn's on
    the predictions of model.pt (with its saved scaler) for every held-out row; accuracy, macro-F1
    and the per-class figures follow from it as scikit-learn computes them."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    from carbonfed.data import load_dataset, split_countries
    from carbonfed.data.features import Standardizer
    from carbonfed.models.mlp import build_model

    cfg, rep = dphe
    saved = torch.load(rep["model"]["path"], weights_only=False)
    model = build_model(21, 5, tuple(saved["hidden"]))
    model.load_state_dict(saved["state_dict"])
    scaler = Standardizer.from_dict(saved["scaler"])
    ds = load_dataset("seed")
    x, y = ds.all_arrays(split_countries(ds.countries()).test)
    with torch.no_grad():
        pred = model(torch.from_numpy(scaler.apply(x))).argmax(1).numpy()
    m = rep["metrics"]
    assert m["classes"] == list(ds.classes)
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=range(5)).tolist()
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=range(5), zero_division=np.nan)
    for k, pc in enumerate(m["per_class"]):
        assert pc["support"] == support[k]
        for ours, theirs in ((pc["precision"], prec[k]), (pc["recall"], rec[k])):
            assert (ours is None and np.isnan(theirs)) or ours == pytest.approx(theirs)
        present = pc["support"] + pc["predicted"] > 0
        assert (pc["f1"] is None) == (not present) and (not present or pc["f1"] == pytest.approx(f1[k]))


def test_epsilon_recomputed_by_independent_accountant(dphe):
    cfg, rep = dphe
    ledger = read_ledger(f"{cfg.out_dir}/ledger.jsonl")
    assert check_chain(ledger) == []
    last = {}
    for line in ledger:
        if line["kind"] in ("stats", "train") and line_history(line):
            last[line["country"]] = line
    histories = {json.dumps(line_history(l)) for l in last.values()}
    for h in histories:                                   # every client of the seed set has 73 rows
        hist = json.loads(h)
        claimed = {l["epsilon"] for l in last.values() if json.dumps(line_history(l)) == h}
        independent = pld_epsilon(hist, cfg.delta)
        for c in claimed:
            assert c == pytest.approx(independent, rel=0.05)
        assert independent <= cfg.epsilon * 1.05


def test_three_statistics_stages_each_charged_once(dphe):
    """Every training client released stages 1, 2 and 3 once each, all charged as [σ_s, 1, 1]
    before its first round; the report says so, and model.pt's scaler reads asinh features."""
    cfg, rep = dphe
    ledger = read_ledger(f"{cfg.out_dir}/ledger.jsonl")
    stats = [l for l in ledger if l["kind"] == "stats" and l["status"] == "accepted"]
    stage1, stage2, stage3 = (sorted(l["country"] for l in stats if l.get("stage", 1) == k) for k in (1, 2, 3))
    assert stage1 == stage2 == stage3 and len(stage3) == 130 == len(set(stage3))
    s = cfg.stats_sigma
    for line in stats:
        want = [[s, 1.0, 1]] * line.get("stage", 1)
        assert line_history(line) == want
    first_train = {}
    for line in ledger:
        if line["kind"] == "train" and line_history(line) and line["country"] not in first_train:
            first_train[line["country"]] = line
    assert all(line_history(l)[:3] == [[s, 1.0, 1]] * 3 for l in first_train.values())
    pre = rep["preprocessing"]
    assert pre["stages"] == 3 and pre["covered_by_epsilon"] and "3 Gaussian release(s)" in pre["statement"]
    assert pre["transform"].startswith("asinh(x / c)") and pre["third_stage"]
    scaler = torch.load(rep["model"]["path"], weights_only=False)["scaler"]
    assert scaler["scale"] is not None and len(scaler["scale"]) == 21


def test_bad_clients_rejected_without_failing_the_round(dphe):
    cfg, rep = dphe
    ledger = read_ledger(f"{cfg.out_dir}/ledger.jsonl")
    by = {(l["country"], l["kind"], l.get("round")): l for l in ledger if "country" in l}
    assert by[("Argentina", "stats", 0)]["status"] == "rejected"
    assert "fingerprint" in by[("Argentina", "stats", 0)]["reason"]
    for rnd in (1, 2):
        assert by[("Albania", "train", rnd)]["status"] == "rejected"
        assert "malformed update" in by[("Albania", "train", rnd)]["reason"]
        assert by[("Algeria", "train", rnd)]["status"] == "rejected"
        assert "expected" in by[("Algeria", "train", rnd)]["reason"]
        assert by[("Angola", "train", rnd)]["status"] == "rejected"
        assert "NaN" in by[("Angola", "train", rnd)]["reason"]
    for h in rep["history"]:
        assert h["accepted"] == 131 - 4 and h["accuracy"] is not None   # the round went on with the rest


def _copy_without_keys(src, dst):
    """The run folder as a reviewer receives it: every file but key material (there is none in it)."""
    shutil.copytree(src, dst)
    assert not [f for f in dst.rglob("*") if f.suffix in (".key", ".ctx") or f.name == "signing"]
    return dst


def test_run_folder_verifies_without_any_key(dphe, keys_dir, tmp_path):
    """A real dp+he run folder (with its fault drills), copied elsewhere without any key, passes
    `carbonfed verify` (exit 0): every client fact is a statement its client signed, every ε
    re-accounted from the signed histories, report.json's claims checked; anchored with the
    clients' published keys. One client's ε rewritten (its statement and the readable copy) and
    the chain made afresh, as the server could, fails (exit 1) naming that line."""
    cfg, _ = dphe
    copy = _copy_without_keys(Path(cfg.out_dir), tmp_path / "copy")
    res = subprocess.run([str(BIN), "verify", str(copy), "--trusted-keys", str(copy / "clients.pub.json")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "OK (signed)" in res.stdout and "the charter is anchored" in res.stdout
    assert "stated figures of report.json" in res.stdout
    ledger = read_ledger(copy / "ledger.jsonl")
    signed = [l for l in ledger if l["kind"] in ("stats", "train", "evaluate", "close") and "signed" in l]
    # every accepted contribution and every close carries its client's statement, Argentina's
    # rejected (foreign-key) release too; Angola's NaN rounds are signed errors with its history
    assert all("signed" in l for l in ledger if l.get("status") == "accepted")
    assert {l["country"] for l in ledger if l["kind"] == "close"} == {l["country"] for l in signed}
    angola = [l for l in ledger if l.get("country") == "Angola" and l["kind"] == "train"]
    assert [l["signed"]["status"] for l in angola] == ["error", "error"] and all("NaN" in l["reason"] for l in angola)

    lines = [{k: v for k, v in l.items() if k not in ("seq", "prev_hash", "hash")} for l in ledger]
    edited = next(n for n, l in enumerate(lines, 1) if (l.get("country"), l["kind"], l["round"]) == ("Bahrain", "train", 2))
    lines[edited - 1]["signed"]["facts"]["epsilon"] *= 0.99      # understated, within re-accounting's tolerance
    lines[edited - 1]["epsilon"] = lines[edited - 1]["signed"]["facts"]["epsilon"]
    (copy / "ledger.jsonl").unlink()
    rewritten = Ledger(copy / "ledger.jsonl")
    for line in lines:
        rewritten.append(line)
    assert check_chain(read_ledger(copy / "ledger.jsonl")) == []    # the chain alone cannot tell
    res = subprocess.run([str(BIN), "verify", str(copy)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 1
    assert f"line {edited} (Bahrain, train round 2): its signature is not Bahrain's" in res.stdout


def test_report_refuses_a_swapped_metrics_file(dphe, keys_dir, tmp_path):
    """The key holders' report reads each aggregate only if its check slots carry the tags of
    what the ledger accepted for it: the metrics of rounds 1 and 2 swapped, `carbonfed report`
    fails naming the file and what it holds; a deleted one is named too."""
    cfg, _ = dphe
    copy = _copy_without_keys(Path(cfg.out_dir), tmp_path / "swapped")
    one, two = copy / "aggregates" / "metrics_round_001.bin", copy / "aggregates" / "metrics_round_002.bin"
    a, b = one.read_bytes(), two.read_bytes()
    one.write_bytes(b)
    two.write_bytes(a)
    with pytest.raises(BindingError, match=r"aggregates/metrics_round_001.bin: .* holds the metrics of round 2"):
        build_report(copy, keys_dir)
    res = subprocess.run([str(BIN), "report", str(copy), "--keys", str(keys_dir)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 2 and "aggregates/metrics_round_001.bin" in res.stderr, res.stderr[-2000:]
    two.unlink()
    one.write_bytes(a)
    with pytest.raises(BindingError, match="aggregates/metrics_round_002.bin is missing"):
        build_report(copy, keys_dir)


def test_he_equals_plaintext(tmp_path, keys_dir):
    """The encrypted sum equals the plaintext one, so `he` and `none` train the same model; both
    on the main job's asinh features, from three exact statistics releases. The run's model
    (``average_last=2``) is the sample-weighted mean of the last two rounds' global models, which
    the server summed as ciphertexts: it equals that mean computed in the clear from each
    round's decrypted aggregate."""
    small = dict(rounds=2, stats_stages=3, average_last=2, local_epochs=1, batches_per_epoch=2)
    _, plain = _run(tmp_path, keys_dir, "none", **small)
    cfg, enc = _run(tmp_path, keys_dir, "he", **small)
    a, b = torch.load(plain["model"]["path"]), torch.load(enc["model"]["path"])
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    from carbonfed.federation.client.participant import Layouts, make_cipher
    from carbonfed.models.mlp import build_model
    from carbonfed.models.params import flatten_params
    from carbonfed.privacy.he import load_secret_context
    from carbonfed.federation.report.signed_record import BoundAggregates, load_run_charter
    from carbonfed.privacy.binding import secret_key_bytes, tag_key
    from carbonfed.privacy.he import HEParams
    lay = Layouts.for_run(cfg, 21, 5).update
    ctx, charter = load_secret_context(keys_dir / "secret.ctx"), load_run_charter(cfg.out_dir)
    bound = BoundAggregates.of(Path(cfg.out_dir), read_ledger(f"{cfg.out_dir}/ledger.jsonl"), charter,
                               tag_key(charter.sha256, secret_key_bytes(ctx)), HEParams().plain_modulus)
    cipher = make_cipher(cfg, ctx, lay.length)
    per_round = [lay.unpack_sum(*bound.open(f"model_round_{r:03d}.bin", cipher.decrypt)) for r in (1, 2)]
    assert not np.allclose(per_round[0][0], per_round[1][0])       # two different models
    mean = sum(p * n for p, n in per_round) / sum(n for _, n in per_round)
    model = build_model(21, 5, tuple(b["hidden"]))
    model.load_state_dict(b["state_dict"])
    assert np.allclose(flatten_params(model), mean, rtol=0, atol=1e-6)
    assert enc["model"]["averaged_rounds"] == [1, 2] and enc["history"][-1]["model_rounds"] == [1, 2]
    assert plain["history"] == [{**h, "seconds": p["seconds"]} for h, p in zip(enc["history"], plain["history"])]
    assert enc["he"]["upload_bytes_per_client_round"] > 10 * 1318 * 8 / 100   # really ciphertexts
    assert plain["he"] is None and plain["privacy"] is None
    for rep in (plain, enc):
        assert rep["preprocessing"]["stages"] == 3 and rep["preprocessing"]["covered_by_epsilon"] is False
        assert torch.load(rep["model"]["path"], weights_only=False)["scaler"]["scale"] is not None   # asinh features
    # the report names the features whose released std is at the floor: with exact statistics, those
    # whose asinh(x / c) has a std below the floor on the training rows (c: the run's own)
    from carbonfed.data import load_dataset, split_countries
    from carbonfed.data.features import ASINH_STD_FLOOR
    ds = load_dataset("seed")
    x, _ = ds.all_arrays(split_countries(ds.countries()).train)
    scale = np.array(torch.load(plain["model"]["path"], weights_only=False)["scaler"]["scale"])
    flat = [f for f, sd in zip(ds.features, np.arcsinh(x / scale).std(axis=0)) if sd < ASINH_STD_FLOOR]
    assert flat == ["co2_including_luc"]
    assert plain["preprocessing"]["floored_std_features"] == enc["preprocessing"]["floored_std_features"] == flat
    # the privacy statement counts the exact releases from the ledger's stats lines
    from carbonfed.federation.report.statement import write_privacy_statement
    md = write_privacy_statement(tmp_path / "none", plain, None).read_text()
    assert "| statistics releases in the ledger | none charged: 3 exact stage(s), outside ε |" in md
    assert "who can see one client's update" not in md                        # no HE: no masks section

"""carbonfed.privacy.charter: a charter every client endorses, checked with public keys, and the
check a client uses to refuse a request that violates it (a lowered min-train-clients above all)."""

from __future__ import annotations

import json

import pytest
from signed_run_kit import CONFIG, ROLES, make_keys

from carbonfed.privacy.charter import (LOCAL_KEYS, Charter, CharterError, charter_document, check_charter,
                                       draft_charter, endorse, refusal, seal_charter)
from carbonfed.privacy.signing import new_signing_key, public_hex


@pytest.fixture(scope="module")
def keys():
    return make_keys()


@pytest.fixture(scope="module")
def doc(keys):
    return seal_charter(CONFIG, keys, ROLES, he_fingerprint="ab" * 32)


def test_sealed_charter_checks_and_drops_local_settings(doc, keys):
    out = check_charter(json.loads(json.dumps(doc)))
    assert out.problems == [] and out.charter.sha256 == doc["sha256"] and not out.anchored
    ch = out.charter
    assert ch.epsilon == 3.0 and ch.delta == 1e-5 and ch.rounds == 2 and ch.min_train_clients == 2
    assert ch.dp and ch.he and ch.plan == (0.2, 5) and ch.roles == ROLES
    assert not set(LOCAL_KEYS) & set(ch.config)             # paths and waits are not what a run computes
    assert check_charter(doc, trusted_keys={c: public_hex(k) for c, k in keys.items()}).anchored
    assert check_charter(doc, expected_sha256=doc["sha256"]).anchored


@pytest.mark.parametrize("key,value,why", [
    ("epsilon", float("nan"), "not a finite number"), ("epsilon", 0.0, "positive ε budget"),
    ("delta", 1.0, "not in (0, 1)"), ("min-train-clients", 0, "below 1"), ("rounds", "2", "not an integer"),
    ("rounds", True, "not an integer"), ("privacy", "dp+tee", "not one of"), ("stats-stages", 4, "1, 2 or 3"),
])
def test_impossible_settings_are_refused(keys, key, value, why):
    pub = {c: public_hex(k) for c, k in keys.items()}
    with pytest.raises(CharterError) as exc:
        draft_charter({**CONFIG, key: value}, pub, ROLES)
    assert str(exc.value).startswith("invalid charter") and why in str(exc.value)


def test_shared_keys_and_missing_roles_are_refused(keys):
    same = public_hex(keys["Atlantis"])
    with pytest.raises(CharterError, match="share one public key"):
        draft_charter(CONFIG, {"Atlantis": same, "Borduria": same}, {"Atlantis": "train", "Borduria": "train"})
    with pytest.raises(CharterError, match="role"):
        draft_charter(CONFIG, {"Atlantis": same}, {})


def test_a_client_endorses_only_its_own_key(doc, keys):
    ch = Charter.from_body(doc["charter"])
    with pytest.raises(CharterError, match="another public key"):
        endorse(keys["Borduria"], ch, "Atlantis")


def test_edited_unendorsed_or_unanchored_charters_are_named(doc, keys):
    edited = json.loads(json.dumps(doc))
    edited["charter"]["config"]["min-train-clients"] = 1
    probs = check_charter(edited).problems
    assert any("sha256 field" in p and "edited" in p for p in probs)
    assert sum("endorsement is invalid" in p for p in probs) == len(keys)
    partial = charter_document(doc["charter"], {c: s for c, s in doc["endorsements"].items() if c != "Syldavia"})
    assert check_charter(partial).problems == ["charter.json: Syldavia's endorsement is missing (the charter was "
                                               "changed after it was endorsed, or forged)"]
    stranger = {**{c: public_hex(k) for c, k in keys.items()}, "Atlantis": public_hex(new_signing_key())}
    out = check_charter(doc, trusted_keys=stranger)
    assert not out.anchored and out.problems == ["charter.json: Atlantis's public key differs from the trusted key "
                                                 "list: a key that is not the client's"]
    out = check_charter(doc, expected_sha256="0" * 64)
    assert not out.anchored and "not the published" in out.problems[0]


def test_refusal_of_requests_that_violate_the_charter(doc):
    ch = Charter.from_body(doc["charter"])
    ok = {**CONFIG, "out-dir": "/elsewhere"}                # local settings may differ
    assert refusal(ch, "Atlantis", ok, rnd=1, model_terms=3, stats_terms=[3]) is None
    assert "min-train-clients=0 differs from the charter Atlantis endorsed (min-train-clients=2" in \
        refusal(ch, "Atlantis", {**CONFIG, "min-train-clients": 0})
    assert "epsilon=30.0 differs" in refusal(ch, "Atlantis", {**CONFIG, "epsilon": 30.0})
    assert "(missing)" in refusal(ch, "Atlantis", {k: v for k, v in CONFIG.items() if k != "delta"})
    assert "stats-stages=True differs" in refusal(ch, "Atlantis", {**CONFIG, "stats-stages": True})   # == 1, not 1
    assert "outside the charter's rounds 0..2" in refusal(ch, "Atlantis", rnd=3)
    assert "model aggregate of 1 contribution(s)" in refusal(ch, "Atlantis", model_terms=1)
    assert "statistics aggregate of 1" in refusal(ch, "Atlantis", stats_terms=[3, 1])
    assert "not a client" in refusal(ch, "Zembla")

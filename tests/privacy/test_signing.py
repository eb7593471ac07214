"""carbonfed.privacy.signing and carbonfed.privacy.statements: real Ed25519 keys, canonical JSON, a
client's signed and chained statements (which replaced the clients' HMAC attestations)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from carbonfed.privacy.signing import (PUBLIC_KEYS_FILE, SigningError, canonical, key_file, keygen_clients,
                                       load_public_keys, load_signing_key, new_signing_key, public_hex, sign,
                                       signature_valid)
from carbonfed.privacy.statements import (FIELD, GENESIS, chain_after, checked_statement, received, sha256_hex,
                                          sign_facts, statement_hash, statement_problem)

CHARTER = "c" * 64


def test_canonical_is_deterministic_and_refuses_non_finite_numbers():
    a = canonical({"b": [1, 2.5, (3, 4)], "a": "é"})
    assert a == b'{"a":"\\u00e9","b":[1,2.5,[3,4]]}'
    assert canonical(json.loads(a)) == a                  # what a reader re-encodes is what was signed
    for bad in (float("nan"), float("inf"), {"x": [float("-inf")]}):
        with pytest.raises(ValueError, match="NaN or infinity"):
            canonical({"v": bad})


def test_signatures_verify_with_the_public_key_only():
    key, other = new_signing_key(), new_signing_key()
    obj = {"type": "test", "x": 1}
    sig = sign(key, obj)
    assert signature_valid(public_hex(key), json.loads(json.dumps(obj)), sig)
    assert not signature_valid(public_hex(other), obj, sig)              # another key
    assert not signature_valid(public_hex(key), {"type": "test", "x": 2}, sig)   # another object
    flipped = f"{int(sig[:2], 16) ^ 0x01:02x}" + sig[2:]  # one bit of R, never a no-op
    assert not signature_valid(public_hex(key), obj, flipped)
    assert not signature_valid("zz", obj, sig) and not signature_valid(public_hex(key), obj, None)
    with pytest.raises(ValueError, match="type"):
        sign(key, {"x": 1})                                # an object must say what it is


def test_keygen_clients_writes_private_keys_0600_and_keeps_them(tmp_path):
    pub = keygen_clients(tmp_path / "keys", ["Atlantis", "Côte d'Ivoire"])
    for c, hexkey in pub.items():
        path = key_file(tmp_path / "keys", c)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert public_hex(load_signing_key(path)) == hexkey
    assert load_public_keys(tmp_path / "keys" / PUBLIC_KEYS_FILE) == pub
    assert keygen_clients(tmp_path / "keys", ["Atlantis", "Borduria"])["Atlantis"] == pub["Atlantis"]   # enrolled once
    (tmp_path / "bad.json").write_text(json.dumps({"clients": {"A": "not hex"}}))
    with pytest.raises(SigningError, match="64 hex"):
        load_public_keys(tmp_path / "bad.json")
    with pytest.raises(SigningError, match="not found"):
        load_signing_key(tmp_path / "none.key")


# -- statements ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def key():
    return new_signing_key()


def _first(key, **kw):
    args = dict(charter=CHARTER, client="Atlantis", kind="train", rnd=1, facts={"epsilon": 1.5, "history": [(1.1, 0.2, 5)]},
                inputs=received(b"model", 3, [(b"stats", 3)]), output=b"upload")
    args.update(kw)
    return sign_facts(key, None, **args)


def test_statement_round_trips_through_json_and_chains(key):
    keys = {"Atlantis": public_hex(key)}
    st = json.loads(json.dumps(_first(key)))
    assert statement_problem(st, keys, CHARTER) is None
    assert st["seq"] == 0 and st["prev"] == GENESIS and st["facts"]["history"] == [[1.1, 0.2, 5]]
    assert st["inputs"] == {"model": sha256_hex(b"model"), "model_terms": 3, "stats": [[sha256_hex(b"stats"), 3]]}
    nxt = sign_facts(key, chain_after(st), charter=CHARTER, client="Atlantis", kind="train", rnd=2, facts={})
    assert nxt["seq"] == 1 and nxt["prev"] == statement_hash(st) != statement_hash(nxt)
    assert statement_problem(nxt, keys, CHARTER) is None
    assert FIELD == "signed"
    # the verifier's one-encoding check: the same verdict and, for a valid statement, the same hash
    assert checked_statement(nxt, keys, CHARTER) == (None, statement_hash(nxt))
    assert checked_statement(nxt, keys, CHARTER) == (None, statement_hash(nxt))      # again (remembered)
    flipped = {**nxt, "sig": f"{int(nxt['sig'][:2], 16) ^ 1:02x}" + nxt["sig"][2:]}   # same bytes, other signature
    edited = {**nxt, "round": 3}                                                     # same signature, other bytes
    assert all("signature" in checked_statement(x, keys, CHARTER)[0] for x in (flipped, edited))
    nxt["facts"]["epsilon"] = float("nan")              # unencodable: refused, not raised
    assert checked_statement(nxt, keys, CHARTER)[1] is None and "signature" in checked_statement(nxt, keys, CHARTER)[0]


@pytest.mark.parametrize("edit,why", [
    (lambda s: s["facts"].update(epsilon=0.5), "signature is not Atlantis's"),
    (lambda s: s.update(round=2), "signature is not Atlantis's"),
    (lambda s: s.update(seq=5), "signature is not Atlantis's"),
    (lambda s: s.update(client="Borduria"), "signature is not Borduria's"),
    (lambda s: s.update(client="Zembla"), "not in the charter"),
    (lambda s: s.update(charter="d" * 64), "another charter"),
    (lambda s: s["facts"].update(country="X"), "facts may hold only"),
    (lambda s: s.update(kind="setup"), "kind 'setup'"),
    (lambda s: s.pop("sig"), "exactly the fields"),
])
def test_statement_edits_are_named(key, edit, why):
    keys = {"Atlantis": public_hex(key), "Borduria": public_hex(new_signing_key())}
    st = _first(key)
    edit(st)
    assert why in (statement_problem(st, keys, CHARTER) or ""), statement_problem(st, keys, CHARTER)


def test_sign_facts_refuses_what_a_statement_cannot_carry(key):
    with pytest.raises(ValueError, match="facts may hold only"):
        _first(key, facts={"status": "accepted"})          # a server field
    with pytest.raises(ValueError, match="stage"):
        _first(key, kind="stats")                          # a statistics release names its stage
    with pytest.raises(ValueError, match="NaN"):
        _first(key, facts={"epsilon": float("nan")})
    with pytest.raises(ValueError, match="inputs"):
        _first(key, inputs={"model": None, "model_terms": 3, "stats": []})

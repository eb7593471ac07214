"""carbonfed.privacy.binding: aggregates bound to run, kind, round and contributors in their check slots.

Real TenSEAL BFV ciphertexts: clients encrypt tagged confusion matrices under the key holders' secret
context, the server sums them under the public context (:class:`SecureSum`), the key holders
decrypt and check. The server's tricks are played as it could play them, with the public key only.
"""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
from signed_run_kit import CONFIG, ROLES, make_keys, records, write_run

from carbonfed.privacy.binding import (BindingError, check_aggregate, expected_aggregates, secret_key_bytes, slot_tag,
                                       tag_checks, tag_key)
from carbonfed.privacy.charter import Charter, seal_charter
from carbonfed.privacy.he import BFVCipher, load_secret_context, params_of
from carbonfed.privacy.packing import BLOCK, CountLayout
from carbonfed.privacy.secure_sum import PlainCipher, SecureSum

RUN, OTHER_RUN = "1" * 64, "2" * 64
CLIENTS = ("Atlantis", "Borduria", "Carpania")
LAYOUT = CountLayout(3 * 3)


@pytest.fixture(scope="module")
def he(keys):
    t = params_of(keys["secret"]).plain_modulus
    return {"t": t, "key": tag_key(RUN, secret_key_bytes(keys["secret"])),
            "client": BFVCipher(keys["secret"], LAYOUT.length), "server": BFVCipher(keys["public"], LAYOUT.length),
            "public": keys["public"]}


def _counts(client: str, rnd: int) -> np.ndarray:
    return np.full(9, 1 + CLIENTS.index(client) + 10 * rnd, dtype=np.int64)


def _upload(he, client: str, rnd: int, key=None) -> bytes:
    tag = slot_tag(key or he["key"], client, "metrics", rnd, he["t"])
    return he["client"].encrypt(tag_checks(LAYOUT.pack(_counts(client, rnd)), tag))


def _server_encrypt(he, vec) -> bytes:
    """What the server can make: a public-key encryption of a vector of its choice."""
    return ts.bfv_vector(he["public"], np.asarray(vec, dtype=np.int64).tolist()).serialize()


def _aggregate(he, terms) -> bytes:
    total = SecureSum(he["server"])
    for data in terms:
        total.add(data)
    return total.serialize()


def _read(he, name, data, rnd, clients=CLIENTS, candidates=None):
    vec = check_aggregate(name, he["client"].decrypt(data), he["key"], [("metrics", rnd, tuple(clients))], he["t"],
                          candidates)
    return LAYOUT.unpack_sum(vec, len(clients))


def test_honest_aggregate_passes_and_unpacks(he, keys):
    data = _aggregate(he, [_upload(he, c, 2) for c in CLIENTS])
    assert np.array_equal(_read(he, "metrics_round_002.bin", data, 2), sum(_counts(c, 2) for c in CLIENTS))
    # the tag key is the key holders' secret key, whatever serialisation of the context holds it
    again = load_secret_context(keys["secret_path"])
    assert tag_key(RUN, secret_key_bytes(again)) == he["key"] != tag_key(RUN, None)


def test_swapped_stale_or_foreign_file_is_named(he):
    r1 = _aggregate(he, [_upload(he, c, 1) for c in CLIENTS])
    cands = {f"the metrics of round {r}": [("metrics", r, CLIENTS)] for r in (1, 2)}
    with pytest.raises(BindingError, match=r"metrics_round_002\.bin: .*it holds the metrics of round 1 \(a stale"):
        _read(he, "metrics_round_002.bin", r1, 2, candidates=cands)
    foreign = _aggregate(he, [_upload(he, c, 2, key=tag_key(OTHER_RUN, b"x")) for c in CLIENTS])
    with pytest.raises(BindingError, match="none of this run's aggregates"):
        _read(he, "metrics_round_002.bin", foreign, 2, candidates=cands)


def test_server_cannot_relabel_duplicate_or_pad_with_its_own_terms(he):
    """With the public key only: shift round 1's tags to round 2's as the public derivation would
    give them, count one client's ciphertext twice, or add a term it encrypted itself."""
    r1 = [_upload(he, c, 1) for c in CLIENTS]

    def shift(key):
        d = sum(slot_tag(key, c, "metrics", 2, he["t"]) - slot_tag(key, c, "metrics", 1, he["t"]) for c in CLIENTS) % he["t"]
        vec = np.zeros(LAYOUT.length, dtype=np.int64)
        vec[::BLOCK] = d - (he["t"] if d > he["t"] // 2 else 0)
        return _server_encrypt(he, vec)

    # the shift works homomorphically: with the secret tags it would relabel round 1 as round 2...
    assert _read(he, "m.bin", _aggregate(he, r1 + [shift(he["key"])]), 2) is not None
    # ...but the server can only derive public ones
    relabelled = _aggregate(he, r1 + [shift(tag_key(RUN, None))])
    twice = _aggregate(he, [_upload(he, "Atlantis", 2)] * 2 + [_upload(he, "Carpania", 2)])
    padded = _aggregate(he, [_upload(he, c, 2) for c in CLIENTS[:2]] + [_server_encrypt(he, LAYOUT.pack(np.zeros(9)))])
    for data in (relabelled, twice, padded):
        with pytest.raises(BindingError, match="do not carry the tags of the metrics of round 2"):
            _read(he, "metrics_round_002.bin", data, 2)


def test_corrupted_block_is_named():
    t = 65537
    vec = tag_checks(CountLayout(5000).pack(np.ones(5000)), 7)
    vec[BLOCK] += 1
    with pytest.raises(BindingError, match="check slots differ between blocks"):
        check_aggregate("x.bin", vec, b"k", [("metrics", 1, ("A",))], t)
    with pytest.raises(ValueError, match="freshly packed"):
        tag_checks(vec, 3)


def test_without_he_the_tags_are_public():
    """Documented limit: with no secret, anyone can compute the tags, so a relabel passes (the
    server sees every plaintext aggregate anyway)."""
    t, key = 65537, tag_key(RUN, None)
    plain = PlainCipher(LAYOUT.length, t)
    up = [plain.encrypt(tag_checks(LAYOUT.pack(np.ones(9)), slot_tag(key, c, "metrics", 1, t))) for c in CLIENTS]
    delta = sum(slot_tag(key, c, "metrics", 2, t) - slot_tag(key, c, "metrics", 1, t) for c in CLIENTS) % t
    shift = np.zeros(LAYOUT.length, dtype=np.int64)
    shift[::BLOCK] = delta - (t if delta > t // 2 else 0)
    total = SecureSum(plain)
    for data in up + [plain.encrypt(shift)]:
        total.add(data)
    vec = check_aggregate("m.bin", plain.decrypt(total.serialize()), key, [("metrics", 2, CLIENTS)], t)
    assert np.array_equal(LAYOUT.unpack_sum(vec, 3), np.full(9, 3))


def test_expected_aggregates_from_a_ledger(tmp_path):
    keys = make_keys()
    run = write_run(tmp_path / "run", keys)
    charter = Charter.from_body(seal_charter(CONFIG, keys, ROLES)["charter"])
    exp = {e.name: e for e in expected_aggregates(records(run), charter)}
    assert sorted(exp) == ["metrics_round_001.bin", "metrics_round_002.bin", "model.bin", "model_round_001.bin",
                           "model_round_002.bin", "stats.bin"]
    assert exp["model.bin"].parts == (("update", 2, CLIENTS),) and exp["stats.bin"].terms == 3
    assert exp["metrics_round_002.bin"].parts == (("metrics", 2, ("Syldavia",)),)
    # the run's model averages the last average-last model rounds; a round below min-train-clients makes none
    two = Charter.from_body(seal_charter({**CONFIG, "average-last": 2}, keys, ROLES)["charter"])
    assert [p[1] for p in {e.name: e for e in expected_aggregates(records(run), two)}["model.bin"].parts] == [1, 2]
    recs = [r for r in records(run) if not (r.get("kind") == "train" and r["round"] == 2 and r["country"] != "Atlantis")]
    assert "model_round_002.bin" not in {e.name for e in expected_aggregates(recs, charter)}


def test_a_round_made_again_after_a_resume_counts_from_its_last_attempt(tmp_path):
    """A restarted server makes an interrupted round again: the contributions accepted before the
    `resume` line are not in the file it kept (only those after are). A `resume` line after which
    nothing was made again drops nothing: it cannot excuse a missing file."""
    keys = make_keys()
    run = write_run(tmp_path / "run", keys)
    charter = Charter.from_body(seal_charter(CONFIG, keys, ROLES)["charter"])
    recs = records(run)
    cut = next(n for n, r in enumerate(recs) if r.get("kind") == "train" and r["round"] == 2)
    interrupted = [r for r in recs[cut:] if r.get("kind") == "train" and r["round"] == 2][:2]
    again = recs[:cut] + interrupted + [{"kind": "resume", "round": 1, "checkpoint_lines": cut}] + recs[cut:]
    exp = {e.name: e for e in expected_aggregates(again, charter)}
    assert exp["model_round_002.bin"].parts == (("update", 2, CLIENTS),)               # not 5 contributions
    assert min(exp["model_round_002.bin"].lines) > cut + len(interrupted) + 1
    appended = recs + [{"kind": "resume", "round": 2, "checkpoint_lines": 1}]
    assert {e.name: e.parts for e in expected_aggregates(appended, charter)} == \
        {e.name: e.parts for e in expected_aggregates(recs, charter)}

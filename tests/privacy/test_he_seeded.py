"""Key files, seeded symmetric ciphertexts and the run's ring (``carbonfed.privacy.he``,
``bfv_seeded``, ``he_ring``) on real SEAL/TenSEAL objects: no mocks."""

from __future__ import annotations

import stat
import struct

import numpy as np
import pytest
import tenseal as ts
from tenseal import sealapi

from carbonfed.privacy.bfv_seeded import chunk_sizes, scratch_file, vector_bytes, vector_layout
from carbonfed.privacy.fixed_point import FixedPointCodec
from carbonfed.privacy.he import (
    BFVCipher,
    CiphertextError,
    ContextFileError,
    HEParams,
    TenSEALBFVCipher,
    key_fingerprint,
    keygen,
    load_public_context,
    load_secret_context,
    new_secret_context,
    params_of,
    public_bytes,
)
from carbonfed.privacy.he_ring import check_ring, exact_terms, ring_for
from carbonfed.privacy.packing import IntegrityError, UpdateLayout
from carbonfed.privacy.secure_sum import PlainCipher, SecureSum

T = HEParams().plain_modulus
MAIN_PARAMS, MAIN_TERMS = 110, 256 * 10      # the seed main job: linear model, 256 clients x average-last 10


@pytest.fixture(scope="module")
def ring_keys(tmp_path_factory):
    """Two keys of the main job's ring (the second plays a client with another key)."""
    out = []
    for name in ("ring", "ring-other"):
        secret, public = keygen(tmp_path_factory.mktemp(name), MAIN_RING)
        out.append({"secret": load_secret_context(secret), "public": load_public_context(public)})
    return out


def _layout() -> UpdateLayout:
    return UpdateLayout(MAIN_PARAMS, 512, FixedPointCodec(T, clip=8.0, max_terms=MAIN_TERMS))


MAIN_RING = ring_for(_layout().length, MAIN_TERMS)


def _updates(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lay = _layout()
    return [lay.pack(rng.uniform(-8, 8, MAIN_PARAMS), int(rng.integers(1, 513)), rng)[0] for _ in range(n)]


def _record(like: bytes, members: bytes) -> bytes:
    """A SEAL 4 serialisation record, uncompressed: the header of ``like`` (magic, header size,
    version), compression mode none, the record's size; then ``members``."""
    return bytes(like[:5]) + b"\x00\x00\x00" + struct.pack("<Q", 16 + len(members)) + members


def _seal_ciphertext(like: bytes, parms_id, n: int, primes: int, coeffs: bytes, size: int = 2,
                     ntt: int = 0, seed: bytes | None = None) -> bytes:
    """A SEAL 4 ``Ciphertext`` record: parms_id, NTT flag, size, degree, primes, scale, correction
    factor | DynArray of the coefficients | for a seeded one, the seed record (PRNG type, 64 bytes)."""
    members = struct.pack("<4QBQQQdQ", *parms_id, ntt, size, n, primes, 1.0, 1)
    members += _record(like, struct.pack("<Q", len(coeffs) // 8) + coeffs)
    return _record(like, members + (b"" if seed is None else _record(like, seed)))


def _rebuilt(blob: bytes, ctx, seed: bytes | None, full: bool = False) -> bytes:
    """The ciphertext ``blob`` loaded and written again uncompressed: ``c0`` and the seed record
    ``seed`` (seeded), or ``c0`` and ``c1`` (``full``)."""
    ct = sealapi.Ciphertext()
    with scratch_file() as path:
        with open(path, "wb") as fh:
            fh.write(blob)
        ct.load(ctx.seal_context().data, path)
    n = ct.poly_modulus_degree()
    coeffs = np.array([ct[i] for i in range(2 * n if full else n)], dtype="<u8").tobytes()
    return _seal_ciphertext(blob, ct.parms_id(), n, 1, coeffs, seed=None if full else seed)


# ---------------------------------------------------------------------------------------------
# contexts and key files
# ---------------------------------------------------------------------------------------------

def test_public_context_has_no_secret_key(keys):
    pub = keys["public"]
    assert not pub.has_secret_key()
    assert pub.is_public()
    assert keys["secret"].has_secret_key()
    assert not ts.context_from(public_bytes(keys["secret"])).has_secret_key()


def test_load_public_context_refuses_secret_context(keys):
    with pytest.raises(ContextFileError, match="secret key"):
        load_public_context(keys["secret_path"])
    with pytest.raises(ContextFileError, match="no secret key"):
        load_secret_context(keys["public_path"])


def test_context_file_errors(tmp_path):
    with pytest.raises(ContextFileError, match="not found"):
        load_public_context(tmp_path / "missing.ctx")
    junk = tmp_path / "junk.ctx"
    junk.write_bytes(b"not a context")
    with pytest.raises(ContextFileError):
        load_secret_context(junk)


def test_keygen_files_are_private(keys):
    for p in (keys["secret_path"], keys["public_path"]):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE(keys["dir"].stat().st_mode) == 0o700


def test_key_fingerprint(keys, other_keys):
    fp = key_fingerprint(keys["secret"])
    assert len(fp) == 64
    assert key_fingerprint(keys["public"]) == fp
    BFVCipher(keys["secret"], 5).encrypt(np.arange(5))       # stable once the context has encrypted
    assert key_fingerprint(keys["secret"]) == fp
    assert key_fingerprint(other_keys["secret"]) != fp
    assert key_fingerprint(other_keys["public"]) == key_fingerprint(other_keys["secret"])


def test_security_level():
    p = HEParams()
    assert p.security_bits() >= 128
    assert sum(p.coeff_mod_bit_sizes) <= sealapi.CoeffModulus.MaxBitCount(
        p.poly_modulus_degree, sealapi.SEC_LEVEL_TYPE.TC128)
    assert HEParams(coeff_mod_bit_sizes=(60, 60)).security_bits() == 0


def test_keygen_writes_the_run_ring(ring_keys):
    secret, public = ring_keys[0]["secret"], ring_keys[0]["public"]
    assert params_of(secret) == params_of(public) == MAIN_RING
    assert secret.has_secret_key() and not public.has_secret_key()
    assert not secret.has_relin_keys() and not public.has_galois_keys()      # addition only
    assert key_fingerprint(secret) == key_fingerprint(public) != key_fingerprint(ring_keys[1]["secret"])
    with pytest.raises(ValueError, match="secret key"):
        BFVCipher(public, 5).encrypt(np.arange(5))                           # the server cannot encrypt


# ---------------------------------------------------------------------------------------------
# the ring of a run
# ---------------------------------------------------------------------------------------------

def test_ring_for_is_the_smallest_exact_ring():
    assert MAIN_RING == HEParams(2048, (51,), 32)                           # 112 slots, 2560 terms
    bits = MAIN_RING.coeff_mod_bit_sizes[0]
    assert exact_terms(MAIN_RING) >= MAIN_TERMS > exact_terms(HEParams(2048, (bits - 1,)))
    assert bits > sealapi.CoeffModulus.MaxBitCount(1024, sealapi.SEC_LEVEL_TYPE.TC128)   # 1024 cannot
    for params in (MAIN_RING, ring_for(1_000_246, 100), ring_for(2049, 2560)):
        assert params.security_bits() >= 128 and params.plain_modulus == T
    assert ring_for(2048, 2560).poly_modulus_degree == 2048
    assert ring_for(2049, 2560).poly_modulus_degree == 4096                 # check slots every 4096
    assert ring_for(1_000_246, 100) == HEParams(4096, (47,), 32)            # the bench: 1e6 x 100
    assert ring_for(112, 100_000).poly_modulus_degree == 4096               # noise outgrows 2048
    with pytest.raises(ValueError, match="no ring"):
        ring_for(112, 10 ** 9)
    check_ring(MAIN_RING, 112, MAIN_TERMS)
    check_ring(HEParams(), 5000, MAIN_TERMS)                                 # default keys fit any run
    for length, terms, why in ((3000, MAIN_TERMS, "check slots"), (112, 5000, "exact sums")):
        with pytest.raises(ValueError, match=why):
            check_ring(MAIN_RING, length, terms)


def _noise_budget(ctx, data: bytes) -> int:
    ct = ts.bfv_vector_from(ctx, data).ciphertext()[0]
    return sealapi.Decryptor(ctx.seal_context().data, ctx.secret_key().data).invariant_noise_budget(ct)


def test_sum_of_max_terms_is_exact_at_the_limit(ring_keys):
    """The main job's bound, 2560 terms at degree 2048, with entries near ±t/2 so that the sums
    wrap modulo t many times: 10 rounds' aggregates of 256 replies summed again (the model
    average), and one reply added 2560 times (its noise adds up coherently: the nearest an honest
    sum comes to the worst case of the bound). Both decrypt exactly, with the bit of noise budget
    the bound reserves still there."""
    secret, public = ring_keys[0]["secret"], ring_keys[0]["public"]
    length = _layout().length
    client, server = BFVCipher(secret, length), BFVCipher(public, length)
    rng = np.random.default_rng(0)
    zs = rng.integers(-(T // 2), T // 2 + 1, (256, length))
    round_sum, plain = SecureSum(server), SecureSum(PlainCipher(length, T))
    for z in zs:
        round_sum.add(client.encrypt(z))
        plain.add(PlainCipher(length, T).encrypt(z))
    total, plain_total = SecureSum(server), SecureSum(PlainCipher(length, T))
    for _ in range(MAIN_TERMS // 256):
        total.add(round_sum.serialize(), round_sum.terms)
        plain_total.add(plain.serialize(), plain.terms)
    assert total.terms == plain_total.terms == MAIN_TERMS <= exact_terms(MAIN_RING)
    np.testing.assert_array_equal(client.decrypt(total.serialize()),
                                  np.frombuffer(plain_total.serialize(), dtype=np.int64))
    assert _noise_budget(secret, total.serialize()) >= 1
    one = server.load(client.encrypt(zs[0]))
    same = server.load(client.encrypt(zs[0]))
    for _ in range(MAIN_TERMS - 1):
        same += one
    coherent = same.serialize()
    wrapped = MAIN_TERMS * zs[0] % T
    np.testing.assert_array_equal(client.decrypt(coherent), np.where(wrapped > T // 2, wrapped - T, wrapped))
    assert _noise_budget(secret, coherent) >= 1


# ---------------------------------------------------------------------------------------------
# the seeded format
# ---------------------------------------------------------------------------------------------

def test_upload_is_seeded_and_small(ring_keys, keys):
    secret = ring_keys[0]["secret"]
    z = _updates(1, seed=1)[0]
    seeded = BFVCipher(secret, len(z)).encrypt(z)
    full = TenSEALBFVCipher(secret, len(z)).encrypt(z)
    assert len(seeded) <= 16_000 < 32_000 and len(seeded) < 0.55 * len(full)
    sizes, blobs = vector_layout(seeded)
    assert sizes == [len(z)] and len(blobs) == 1
    # one polynomial of 2048 coefficients below 2^51 (SEAL keeps 8-byte words, then compresses)
    assert 2048 * 6 < len(blobs[0]) < 2048 * 8
    # default keys: the seeded upload of the main job is within 32 kB even at degree 4096
    assert len(BFVCipher(keys["secret"], len(z)).encrypt(z)) <= 32_000
    # many ciphertexts, at the ring of the bench (100 terms): at most 8 bytes per value
    ctx = new_secret_context(ring_for(2 * 4096, 100))
    assert len(BFVCipher(ctx, 2 * 4096).encrypt(np.arange(2 * 4096) - 4096)) <= 8 * 2 * 4096


def test_truncated_seed_is_rejected_for_that_client_alone(ring_keys):
    secret, public = ring_keys[0]["secret"], ring_keys[0]["public"]
    za, zb = _updates(2, seed=2)
    client, server = BFVCipher(secret, len(za)), BFVCipher(public, len(za))
    a, b = client.encrypt(za), client.encrypt(zb)
    blob = bytes(vector_layout(a)[1][0])
    seed = bytes([1]) + np.random.default_rng(3).bytes(64)
    bad = [blob[:-cut] for cut in (1, 8, 40, 64, 81)]                           # the compressed tail
    bad += [_rebuilt(blob, secret, seed[:keep]) for keep in (0, 1, 33, 64)]    # the seed record itself
    total = SecureSum(server)
    total.add(a)
    for ct in bad:
        with pytest.raises(CiphertextError, match="does not parse"):
            total.add(vector_bytes([len(za)], [ct]))
    total.add(b)
    assert total.terms == 2
    vec = client.decrypt(total.serialize())
    np.testing.assert_array_equal(vec, za + zb)
    _layout().unpack_sum(vec, 2)                                                # the check slot holds


def test_wrong_seed_is_caught_by_the_check_slot(ring_keys):
    """The server cannot tell a wrong seed (it expands to another uniform polynomial); the key
    holders' check slot can. An invalid PRNG type is refused at loading."""
    secret, public = ring_keys[0]["secret"], ring_keys[0]["public"]
    za, zb = _updates(2, seed=4)
    client, server = BFVCipher(secret, len(za)), BFVCipher(public, len(za))
    a, b = client.encrypt(za), client.encrypt(zb)
    blob = bytes(vector_layout(a)[1][0])
    # the rebuilt serialisation is faithful: with both polynomials it decrypts to the update
    np.testing.assert_array_equal(client.decrypt(vector_bytes([len(za)], [_rebuilt(blob, secret, None, full=True)])), za)
    rng = np.random.default_rng(5)
    for seed in (bytes([1]) + rng.bytes(64), bytes([2]) + rng.bytes(64)):      # BLAKE2xb, SHAKE-256
        wrong = vector_bytes([len(za)], [_rebuilt(blob, secret, seed)])
        total = SecureSum(server)
        total.add(wrong)                                                     # loads: a valid ciphertext
        total.add(b)
        with pytest.raises(IntegrityError, match="check slot"):
            _layout().unpack_sum(client.decrypt(total.serialize()), 2)
    for prng_type in (0, 3):
        with pytest.raises(CiphertextError):
            server.load(vector_bytes([len(za)], [_rebuilt(blob, secret, bytes([prng_type]) + rng.bytes(64))]))


def test_seed_from_another_key_is_caught_by_the_check_slot(ring_keys):
    ours, theirs = (BFVCipher(k["secret"], _layout().length) for k in ring_keys)
    za, zb, zc = _updates(3, seed=6)
    total = SecureSum(BFVCipher(ring_keys[0]["public"], _layout().length))
    for ct in (ours.encrypt(za), theirs.encrypt(zb), ours.encrypt(zc)):       # same ring, other key
        total.add(ct)
    assert total.terms == 3
    with pytest.raises(IntegrityError, match="check slot"):
        _layout().unpack_sum(ours.decrypt(total.serialize()), 3)


def test_container_framing_is_checked(ring_keys, keys):
    secret = ring_keys[0]["secret"]
    z = np.arange(112)
    good = BFVCipher(secret, 112).encrypt(z)
    sizes, blobs = vector_layout(good)
    server = BFVCipher(ring_keys[0]["public"], 112)
    for bad in (vector_bytes(sizes, [bytes(blobs[0])] * 2), vector_bytes(sizes, []),
                good + b"\x1a\x00", good + b"\x12\x05abc", vector_bytes([56, 56], [bytes(blobs[0])] * 2)):
        with pytest.raises(CiphertextError):
            server.load(bad)
    # SEAL refuses a ciphertext at the key level; a three-polynomial one (a product's) or one in
    # NTT form loads in SEAL (whose addition then fails), and BFVCipher refuses it
    ctx = keys["secret"]
    data = ctx.seal_context().data
    n = data.key_context_data().parms().poly_modulus_degree()
    like = bytes(vector_layout(BFVCipher(ctx, 3).encrypt(np.arange(3)))[1][0])

    def ciphertext(parms_id, size: int, primes: int, ntt: int = 0) -> bytes:
        zeros = bytes(8 * size * primes * n)
        return vector_bytes(chunk_sizes(3, n), [_seal_ciphertext(like, parms_id, n, primes, zeros, size, ntt)])

    assert np.array_equal(BFVCipher(ctx, 3).decrypt(ciphertext(data.first_parms_id(), 2, 1)), np.zeros(3))
    with pytest.raises(CiphertextError, match="does not parse"):
        BFVCipher(keys["public"], 3).load(ciphertext(data.key_parms_id(), 2, 2))
    for bad in (ciphertext(data.first_parms_id(), 3, 1), ciphertext(data.first_parms_id(), 2, 1, ntt=1)):
        with pytest.raises(CiphertextError, match="two-polynomial"):
            BFVCipher(keys["public"], 3).load(bad)

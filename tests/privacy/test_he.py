"""Tests for the encrypted aggregation path (``carbonfed.privacy.he``, ``fixed_point``, ``secure_sum``,
``packing``) and its benchmark, on real TenSEAL ciphertexts: no mocks. Key files, the seeded
format and the ring: ``test_he_seeded.py``; the key fixtures: ``conftest.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tenseal as ts
from tenseal import sealapi

from carbonfed.federation.experiments.bench_he import METRICS, format_table, main as bench_main, run_bench
from carbonfed.privacy.fixed_point import FixedPointCodec, WrapError
from carbonfed.privacy.he import BFVCipher, CiphertextError, HEParams
from carbonfed.privacy.packing import IntegrityError, UpdateLayout
from carbonfed.privacy.secure_sum import PlainCipher, SecureSum

T = HEParams().plain_modulus
MAX_TERMS = 200
MAX_SAMPLES = 64
CLIP = 1.0


def _layout(n_params: int, max_terms: int = MAX_TERMS) -> UpdateLayout:
    return UpdateLayout(n_params, MAX_SAMPLES, FixedPointCodec(T, clip=CLIP, max_terms=max_terms))


def _clients(n_clients: int, n_params: int, seed: int):
    rng = np.random.default_rng(seed)
    params = rng.uniform(-CLIP, CLIP, size=(n_clients, n_params))
    samples = rng.integers(1, MAX_SAMPLES + 1, size=n_clients)
    return params, samples


def _packed(layout: UpdateLayout, params, samples, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, 7])
    return [layout.pack(p, int(n), rng)[0] for p, n in zip(params, samples)]


def _centre(v, t=T):
    v = np.mod(np.asarray(v, dtype=np.int64), t)
    return np.where(v > t // 2, v - t, v)


# ---------------------------------------------------------------------------------------------
# encrypted FedAvg == plaintext FedAvg
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_clients", [1, 2, 200])
def test_encrypted_aggregate_equals_plaintext_fedavg(keys, n_clients):
    n_params = 300
    layout = _layout(n_params)
    params, samples = _clients(n_clients, n_params, seed=n_clients)
    packed = _packed(layout, params, samples, seed=n_clients)

    client = BFVCipher(keys["secret"], layout.length)
    server = SecureSum(BFVCipher(keys["public"], layout.length))    # no secret key on the server
    plain = SecureSum(PlainCipher(layout.length, T))
    for z in packed:
        server.add(client.encrypt(z))
        plain.add(PlainCipher(layout.length, T).encrypt(z))
    assert server.terms == plain.terms == n_clients

    he_sum = client.decrypt(server.serialize())
    plain_sum = np.frombuffer(plain.serialize(), dtype=np.int64)
    np_sum = np.sum(packed, axis=0)
    assert he_sum.dtype == np.int64
    np.testing.assert_array_equal(he_sum, plain_sum)            # exact: turning HE on changes no number
    np.testing.assert_array_equal(he_sum, np_sum)               # and nothing wrapped
    assert he_sum[0] == n_clients and he_sum[1] == np.minimum(samples, MAX_SAMPLES).sum()

    mean, total = layout.unpack_sum(he_sum, n_clients)
    mean_plain, total_plain = layout.unpack_sum(plain_sum, n_clients)
    np.testing.assert_array_equal(mean, mean_plain)
    weights = np.minimum(samples, MAX_SAMPLES).astype(np.float64)
    fedavg = (weights @ params) / weights.sum()
    assert total == int(weights.sum())
    # each client's entry is rounded by < 1/scale before the sum, then scaled by max_samples/total
    tol = n_clients * layout.codec.resolution * MAX_SAMPLES / total
    assert np.max(np.abs(mean - fedavg)) <= tol
    assert np.max(np.abs(mean - fedavg)) < 1e-5


def test_multi_ciphertext_vector_sums_exactly(keys):
    """A vector longer than one ciphertext (4096 slots) sums exactly across the boundary."""
    n_params = 5000
    layout = _layout(n_params, max_terms=3)
    params, samples = _clients(3, n_params, seed=11)
    packed = _packed(layout, params, samples, seed=11)
    client = BFVCipher(keys["secret"], layout.length)
    server = SecureSum(BFVCipher(keys["public"], layout.length))
    for z in packed:
        server.add(client.encrypt(z))
    np.testing.assert_array_equal(client.decrypt(server.serialize()), np.sum(packed, axis=0))


def test_secure_sum_over_public_context_matches_secret_context(keys):
    layout = _layout(100, max_terms=4)
    params, samples = _clients(4, 100, seed=3)
    packed = _packed(layout, params, samples, seed=3)
    client = BFVCipher(keys["secret"], layout.length)
    replies = [client.encrypt(z) for z in packed]
    via_public = SecureSum(BFVCipher(keys["public"], layout.length))
    via_secret = SecureSum(BFVCipher(keys["secret"], layout.length))
    for r in replies:
        via_public.add(r)
        via_secret.add(r)
    np.testing.assert_array_equal(client.decrypt(via_public.serialize()), client.decrypt(via_secret.serialize()))
    # the server can add but not read
    with pytest.raises(Exception):
        BFVCipher(keys["public"], layout.length).decrypt(via_public.serialize())


def test_bad_contribution_leaves_running_total_untouched(keys):
    client = BFVCipher(keys["secret"], 10)
    total = SecureSum(BFVCipher(keys["public"], 10))
    a, b = np.arange(10), np.arange(10) * -3
    total.add(client.encrypt(a))
    good = client.encrypt(b)
    for bad in (good[: len(good) // 2], BFVCipher(keys["secret"], 11).encrypt(np.arange(11)), b"junk"):
        with pytest.raises(CiphertextError):
            total.add(bad)
    total.add(good)
    assert total.terms == 2
    np.testing.assert_array_equal(client.decrypt(total.serialize()), a + b)


# ---------------------------------------------------------------------------------------------
# overflow / wrap detection
# ---------------------------------------------------------------------------------------------

def test_check_sum_rejects_more_terms_than_max():
    codec = FixedPointCodec(T, clip=CLIP, max_terms=4)
    z = np.zeros(8, dtype=np.int64)
    codec.check_sum(z, 4)
    with pytest.raises(WrapError, match="exceed"):
        codec.check_sum(z, 5)


def test_check_sum_bound_is_tight_and_wraps_are_impossible_honestly():
    codec = FixedPointCodec(T, clip=CLIP, max_terms=10)
    assert codec.max_terms * codec.bound <= (T - 1) // 2      # an honest full sum cannot wrap
    rng = np.random.default_rng(0)
    z, clipped = codec.encode(np.array([CLIP, -CLIP, 5.0, -5.0, 0.0]), rng)
    assert clipped == 2 and np.abs(z).max() < codec.bound
    for terms in (1, 3, 10):
        codec.check_sum(np.full(4, terms * codec.bound), terms)          # reachable: accepted
        forged = np.array([0, terms * codec.bound + 1, 0, 0])           # out of range: rejected
        with pytest.raises(WrapError):
            codec.check_sum(forged, terms)
        with pytest.raises(WrapError):
            codec.check_sum(-forged, terms)


def test_real_bfv_wrap_is_detected(keys):
    """Values near t/2 are in range for one ciphertext, but three of them wrap modulo t."""
    codec = FixedPointCodec(T, clip=CLIP, max_terms=10)
    v = np.array([T // 2, T // 2 - 5, -(T // 2), 12345], dtype=np.int64)
    client = BFVCipher(keys["secret"], len(v))
    server = SecureSum(BFVCipher(keys["public"], len(v)))
    plain = SecureSum(PlainCipher(len(v), T))
    for _ in range(3):
        server.add(client.encrypt(v))
        plain.add(PlainCipher(len(v), T).encrypt(v))
    got = client.decrypt(server.serialize())
    np.testing.assert_array_equal(got, _centre(3 * v))               # it really wrapped
    assert not np.array_equal(got, 3 * v)
    np.testing.assert_array_equal(got, np.frombuffer(plain.serialize(), dtype=np.int64))
    with pytest.raises(WrapError, match="wrapped"):
        codec.check_sum(got, 3)
    # and through the layout: the wrapped parameters are refused, not decoded
    layout = UpdateLayout(len(v), MAX_SAMPLES, codec)
    vec = np.concatenate([[3, 3 * MAX_SAMPLES], got])
    with pytest.raises(WrapError):
        layout.unpack_sum(vec, 3)


def test_encrypt_refuses_values_outside_centred_range(keys):
    c = BFVCipher(keys["secret"], 2)
    with pytest.raises(OverflowError):
        c.encrypt(np.array([T // 2 + 1, 0]))
    with pytest.raises(OverflowError):
        PlainCipher(2, T).encrypt(np.array([0, -(T // 2) - 1]))


# ---------------------------------------------------------------------------------------------
# malformed ciphertexts
# ---------------------------------------------------------------------------------------------

def _bfv_context(n: int, coeff: list[int], plain_bits: int = 32) -> ts.Context:
    t = sealapi.PlainModulus.Batching(n, plain_bits).value()
    return ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=n, plain_modulus=t, coeff_mod_bit_sizes=coeff,
                      n_threads=1)


@pytest.mark.parametrize("other", [
    pytest.param(lambda: _bfv_context(8192, [60, 40, 40]), id="N=8192"),
    pytest.param(lambda: _bfv_context(4096, [56, 53], plain_bits=30), id="other-plain-modulus"),
    pytest.param(lambda: _bfv_context(4096, [40, 40]), id="other-coeff-modulus"),
])
def test_ciphertext_for_other_parameters_is_rejected(keys, other):
    foreign = ts.bfv_vector(other(), [1, 2, 3]).serialize()
    with pytest.raises(CiphertextError, match="does not parse"):
        BFVCipher(keys["public"], 3).load(foreign)


def test_ckks_ciphertext_is_rejected(keys):
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40], n_threads=1)
    ctx.global_scale = 2 ** 40
    with pytest.raises(CiphertextError):
        BFVCipher(keys["public"], 3).load(ts.ckks_vector(ctx, [1.0, 2.0, 3.0]).serialize())


def test_truncated_bytes_are_rejected(keys):
    data = BFVCipher(keys["secret"], 50).encrypt(np.arange(50))
    server = BFVCipher(keys["public"], 50)
    for cut in (0, 1, 16, len(data) // 3, len(data) // 2, len(data) - 1):
        with pytest.raises(CiphertextError):
            server.load(data[:cut])
    for junk in (data + b"\x00" * 7, data + data, b"\xff" * 64):
        with pytest.raises(CiphertextError):
            server.load(junk)


def test_bit_flipped_bytes_never_yield_a_silent_wrong_aggregate(keys):
    """The parser rejects some corruptions; the others either decrypt to the same numbers (a flip in
    a low-order coefficient bit is absorbed like noise) or garble the ciphertext, which the check
    slot then catches. Single-ciphertext layout: see the next test for longer vectors."""
    layout = _layout(200, max_terms=3)
    params, samples = _clients(3, 200, seed=5)
    packed = _packed(layout, params, samples, seed=5)
    client = BFVCipher(keys["secret"], layout.length)
    replies = [client.encrypt(z) for z in packed]
    honest = np.sum(packed, axis=0)
    outcomes = {"rejected": 0, "unchanged": 0, "detected": 0}
    target = replies[-1]
    for pos in range(0, len(target), max(1, len(target) // 60)):
        for bit in (0, 5):
            bad = bytearray(target)
            bad[pos] ^= 1 << bit
            total = SecureSum(BFVCipher(keys["public"], layout.length))
            try:
                for r in replies[:-1] + [bytes(bad)]:
                    total.add(r)
            except CiphertextError:
                outcomes["rejected"] += 1
                continue
            vec = client.decrypt(total.serialize())
            if np.array_equal(vec, honest):
                outcomes["unchanged"] += 1
                continue
            with pytest.raises((IntegrityError, WrapError)):
                layout.unpack_sum(vec, 3)
            outcomes["detected"] += 1
    assert outcomes["rejected"] > 0 and outcomes["detected"] > 0, outcomes


def test_corruption_in_a_later_ciphertext_is_detected(keys):
    """Every 4096-slot block has its own check slot, so a later ciphertext is covered too."""
    n_params = 4095                            # two ciphertexts; the second holds a check slot + 1 value
    layout = _layout(n_params, max_terms=3)
    params, samples = _clients(3, n_params, seed=9)
    packed = _packed(layout, params, samples, seed=9)
    client = BFVCipher(keys["secret"], layout.length)
    replies = [client.encrypt(z) for z in packed]
    honest = np.sum(packed, axis=0)
    target = replies[-1]
    silent = 0
    for pos in range(len(target) - 30000, len(target), 1500):      # bytes of the last ciphertext
        bad = bytearray(target)
        bad[pos] ^= 0x20
        total = SecureSum(BFVCipher(keys["public"], layout.length))
        try:
            for r in replies[:-1] + [bytes(bad)]:
                total.add(r)
        except CiphertextError:
            continue
        vec = client.decrypt(total.serialize())
        if np.array_equal(vec, honest):
            continue
        try:
            layout.unpack_sum(vec, 3)
        except (IntegrityError, WrapError):
            continue
        silent += 1
    assert silent == 0, f"{silent} corrupted aggregates were accepted"


def test_wrong_length_is_rejected(keys):
    data = BFVCipher(keys["secret"], 50).encrypt(np.arange(50))
    for n in (49, 51, 4096 + 50):
        with pytest.raises(CiphertextError, match="expected"):
            BFVCipher(keys["public"], n).load(data)
    with pytest.raises(CiphertextError):
        BFVCipher(keys["secret"], 50).encrypt(np.arange(49))
    with pytest.raises(CiphertextError):
        PlainCipher(50, T).load(np.arange(49, dtype=np.int64).tobytes())


def test_ciphertext_under_another_key_is_caught_by_check_slot(keys, other_keys):
    layout = _layout(100, max_terms=4)
    params, samples = _clients(3, 100, seed=21)
    packed = _packed(layout, params, samples, seed=21)
    ours = BFVCipher(keys["secret"], layout.length)
    theirs = BFVCipher(other_keys["secret"], layout.length)      # same parameters, other key
    total = SecureSum(BFVCipher(keys["public"], layout.length))
    total.add(ours.encrypt(packed[0]))
    total.add(theirs.encrypt(packed[1]))                         # the server cannot tell
    total.add(ours.encrypt(packed[2]))
    assert total.terms == 3
    vec = ours.decrypt(total.serialize())
    with pytest.raises(IntegrityError, match="check slot"):
        layout.unpack_sum(vec, 3)


# ---------------------------------------------------------------------------------------------
# benchmark (behaviour, not timing)
# ---------------------------------------------------------------------------------------------

def test_run_bench_small():
    # 8192 = two full ciphertexts; a size that leaves the last ciphertext mostly empty (e.g. 5000)
    # pays for the whole ciphertext and reports ~25 bytes/param.
    r = run_bench(8192, 3, seed=1)
    assert r["n_params"] == 8192 and r["n_clients"] == 3
    for name in ("carbonfed", "baseline"):
        assert set(METRICS) <= set(r[name]), name
        assert isinstance(r[name]["scheme"], str)
        for m in METRICS:
            assert r[name][m] > 0 or m == "max_abs_error", (name, m)
    ours, base = r["carbonfed"], r["baseline"]
    assert ours["bytes_per_param"] <= 16
    assert ours["max_abs_error"] <= 1e-6
    assert ours["security_bits"] >= 128 and base["security_bits"] >= 128
    assert base["bytes_per_param"] > ours["bytes_per_param"]
    assert base["max_abs_error"] < 1e-4                          # CKKS is approximate but close
    table = format_table(r)
    assert "carbonfed" in table and "baseline" in table and "bytes / param" in table


def test_bench_main_json_is_one_clean_object(capfd):
    # 5000 params span two ciphertexts, which makes TenSEAL print a warning on C++ stdout
    assert bench_main(["--params", "5000", "--clients", "2", "--json", "--no-progress"]) == 0
    out = capfd.readouterr().out
    r = json.loads(out)
    assert {"carbonfed", "baseline"} <= set(r)
    assert r["carbonfed"]["max_abs_error"] <= 1e-6


def test_sample_count_above_public_bound_is_refused():
    layout = _layout(10)
    with pytest.raises(ValueError, match="max-client-samples"):
        layout.pack(np.zeros(10), MAX_SAMPLES + 1, np.random.default_rng(0))

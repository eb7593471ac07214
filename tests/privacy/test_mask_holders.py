"""The keys step asks only the share-key holders it needs, and a pair's round material (issue 22).

Real TenSEAL BFV, real X25519 / AES-GCM / ChaCha20 from ``cryptography``, real Ed25519 keys.
"""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from carbonfed.privacy.he import BFVCipher, keygen, load_public_context, load_secret_context
from carbonfed.privacy.he_ring import ring_for
from carbonfed.privacy.mask_adverts import read_adverts
from carbonfed.privacy.mask_wire import names_digest
from carbonfed.privacy.masks import pair_round, plan_masks, unmask_sum
from carbonfed.privacy.secure_sum import SecureSum
from mask_kit import Drops, federation, payload_of, plain_sum, reseal, share_and_upload, updates

LENGTH = 112


@pytest.fixture(scope="module")
def ciphers(tmp_path_factory):
    """(key holder's cipher, server's cipher) for 112-slot vectors of up to 13 clients and the correction."""
    secret_path, public_path = keygen(tmp_path_factory.mktemp("holder-keys"), ring_for(LENGTH, 14))
    return BFVCipher(load_secret_context(secret_path), LENGTH), BFVCipher(load_public_context(public_path), LENGTH)


@pytest.mark.parametrize("degree", [None, 4])
def test_only_the_holders_picked_reveal_and_a_failed_one_is_replaced(degree, ciphers):
    """The keys step asks only the holders :meth:`pick_holders` names (a complete graph: T + 1 of
    them); one that sends a bad key leaves its dealers short, and the next pick replaces it; the sum
    is exact, and no client outside the picks ever revealed a key."""
    secret_cipher, public_cipher = ciphers
    fed = federation(12, secret_cipher.plain_modulus, LENGTH, plan_masks(12, degree))
    xs = updates(fed, seed=12)
    rec, cts = share_and_upload(fed, 1, xs, secret_cipher, Drops())
    rec.start_recovery(cts, liveness=False)
    rec.start_keys()
    asked, rounds = [], 0
    while picked := rec.pick_holders(fed.names[5:] + fed.names[:5]):
        rounds += 1
        for h in picked:
            reply = fed.clients[h].reveal_keys(1, rec.summed())
            if rounds == 1 and h == picked[0]:              # a bad key: opens none of its dealers' shares
                reply = reseal(fed, h, "keys", 1, payload_of(reply)[:-1] + b"\0", names_digest(rec.summed()))
            rec.add_keys(reply, sender=h)
        asked += picked
    t = fed.plan.threshold
    if degree is None:                                          # T + 1, then one more for the bad key
        assert len(asked) == t + 2 and asked[0] == "c005" and rounds == 2
    assert len(set(asked)) == len(asked) < len(fed.names)      # (degree 4: 10 picks cover all with T = 3)
    assert [r.client for r in rec.rejections] == [asked[0]]
    total = SecureSum(public_cipher)
    for c in rec.summed():
        total.add(cts[c])
    out = unmask_sum(public_cipher, total.serialize(), rec.correction(LENGTH))
    np.testing.assert_array_equal(secret_cipher.decrypt(out), plain_sum(xs, fed.names, secret_cipher.plain_modulus))
    assert not any(st.keys_revealed for c in set(fed.names) - set(asked) for st in fed.clients[c]._rounds.values())


def test_a_pairs_round_material_is_the_chacha20_block_of_that_round():
    """pair_round(K, r) is keystream block r of ChaCha20 under K, whichever rounds were asked before
    (eight rounds come from one call), and it refuses a round past the 32-bit block counter."""
    key = bytes(range(32))
    for r in (0, 1, 7, 8, 9, 70, 1000, 2 ** 32 - 9):
        block = Cipher(algorithms.ChaCha20(key, r.to_bytes(4, "little") + b"rnd\0" + bytes(8)),
                       mode=None).encryptor().update(bytes(64))
        got = pair_round(key, r)
        assert got.seed + got.key_low + got.key_high == block
    assert pair_round(key, 3) != pair_round(bytes(32), 3) and pair_round(key, 3).seed != pair_round(key, 4).seed
    with pytest.raises(ValueError, match="block counter"):
        pair_round(key, 2 ** 32 - 8)



def test_shares_read_together_are_the_shares_read_one_by_one():
    """The keys step reads a holder's opened shares in one go: the same rows, and None exactly where
    one alone would be refused (a wrong length, a limb outside the field)."""
    from carbonfed.privacy import shamir
    shares = shamir.split(shamir.new_secret(), 3, [1, 2, 3, 4])
    datas = [shamir.share_to_bytes(s) for s in shares]
    rows = shamir.shares_from_bytes(datas)
    assert all(np.array_equal(r, shamir.share_from_bytes(d)) for r, d in zip(rows, datas))
    outside = (shamir.P).to_bytes(4, "little") + datas[1][4:]
    assert [r is None for r in shamir.shares_from_bytes([datas[0], outside, datas[2]])] == [False, True, False]
    assert [r is None for r in shamir.shares_from_bytes([datas[0], datas[1][:-1]])] == [False, True]
    assert shamir.shares_from_bytes([]) == []


def test_a_restored_round_masks_and_reveals_as_the_client_that_made_it():
    """A deployed client rebuilds its masking client at every message: restored from its round state,
    it masks and reveals exactly what the client that made the bundle would."""
    from carbonfed.privacy.mask_client import MaskingClient, mask_root
    from carbonfed.privacy.mask_adverts import read_adverts
    from carbonfed.privacy.signing import new_signing_key, public_hex
    names, run, modulus = [f"c{i}" for i in range(6)], "run-restore", ring_for(LENGTH, 7).plain_modulus
    plan, signing = plan_masks(6), {c: new_signing_key() for c in names}
    made = {c: MaskingClient(c, signing[c], run, names, plan, modulus, root=mask_root(signing[c], run, c)) for c in names}
    keys, _ = read_adverts({c: m.advert() for c, m in made.items()}, run, {c: public_hex(k) for c, k in signing.items()})
    me = made["c2"]
    pair_keys = me.use_peer_keys(keys)
    me.share(1), me.share(2)
    me.agree(1, names)
    again = MaskingClient("c2", signing["c2"], run, names, plan, modulus, root=mask_root(signing["c2"], run, "c2"))
    again.use_pair_keys(pair_keys)
    again.restore(me.round_state())
    vec = np.arange(LENGTH) % 7
    assert np.array_equal(again.mask(1, vec, names), me.mask(1, vec, names))
    assert again.reveal_keys(1, names[:5]) == me.reveal_keys(1, names[:5])
    assert again.round_state() == me.round_state()


def test_adverts_read_twice_give_fresh_results_and_a_shared_key_is_refused():
    """read_adverts is remembered per process: a caller that changes what it got changes nothing
    for the next; the second client advertising a key already advertised is refused."""
    fed = federation(4, 65537, LENGTH)
    ads = dict(zip(fed.names, fed.adverts))
    keys, rejected = read_adverts(ads, fed.run, fed.public_keys)
    keys.clear(), rejected.append("changed")
    assert read_adverts(ads, fed.run, fed.public_keys) == (dict(zip(fed.names, map(payload_of, fed.adverts))), [])
    twin = reseal(fed, "c003", "key", 0, payload_of(fed.adverts[1]))
    keys, rejected = read_adverts({**ads, "c003": twin}, fed.run, fed.public_keys)
    assert set(keys) == {"c000", "c001", "c002"} and rejected[0].reason == "advertises the same key as c001"


def test_a_client_that_missed_sharing_a_round_still_opens_its_shares_and_never_shares_that_round(ciphers):
    """A client that missed round 2's sharing (it restarted) is not summed, yet its neighbours dealt
    it shares: asked as a holder, it reveals their keys, and with T summed holders (a complete graph
    needs T + 1) they rebuild every self mask (the sum is exact). It then refuses every other step of that round, also once
    restored from its round state, while its next round goes on."""
    from carbonfed.privacy.mask_client import MaskingClient, MaskRefusal, mask_root
    secret_cipher, public_cipher = ciphers
    fed = federation(9, secret_cipher.plain_modulus, LENGTH)
    late = "c004"
    signing = fed.signing[late]
    fed.clients[late] = MaskingClient(late, signing, fed.run, fed.names, fed.plan, fed.modulus,
                                      root=mask_root(signing, fed.run, late))     # as deployed: a derived root
    fed.adverts = [fed.clients[c].advert() for c in fed.names]
    keys = read_adverts(dict(zip(fed.names, fed.adverts)), fed.run, fed.public_keys)[0]
    for c in fed.names:
        fed.clients[c].use_peer_keys(keys)
    pair_keys = fed.clients[late].use_peer_keys(keys)
    fed.clients[late].share(1)
    xs = updates(fed, seed=9)
    rec, cts = share_and_upload(fed, 2, xs, secret_cipher, Drops(before_share=(late,)))
    assert late not in rec.shared()
    rec.start_recovery(cts, liveness=False)
    rec.start_keys()
    summed, t = rec.summed(), fed.plan.threshold
    assert len(summed) == 8 and t > 1
    me = fed.clients[late]
    assert me.may_hold(2) and not me.has_round(2)
    holders = summed[:t] + [late]            # without the late client, each of these T holders' own mask is one share short
    for h in holders:
        assert rec.add_keys(fed.clients[h].reveal_keys(2, summed), sender=h) > 0
    assert rec.pick_holders(fed.names) == [] and rec.rejections == []
    total = SecureSum(public_cipher)
    for c in summed:
        total.add(cts[c])
    out = unmask_sum(public_cipher, total.serialize(), rec.correction(LENGTH))
    np.testing.assert_array_equal(secret_cipher.decrypt(out), plain_sum(xs, summed, secret_cipher.plain_modulus))
    again = MaskingClient(late, signing, fed.run, fed.names, fed.plan, fed.modulus, root=mask_root(signing, fed.run, late))
    again.use_pair_keys(pair_keys)
    again.restore(me.round_state())
    for client in (me, again):
        assert client.reveal_keys(2, summed) == me.reveal_keys(2, summed)       # asked again: the same keys
        args = {"share": (2,), "agree": (2, fed.names), "reveal_seeds": (2, summed), "mask": (2, xs[late], fed.names)}
        for step, given in args.items():
            with pytest.raises(MaskRefusal):
                getattr(client, step)(*given)
        assert client.share(3)
        assert not client.may_hold(1)                      # a round it shared and let go of: never a holder
    assert again.round_state()["rounds"][0] == {**again.round_state()["rounds"][0], "round": 2, "holder": True}

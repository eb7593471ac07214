"""The per-process memos that make a round cheap change no value: the check-slot tags and their
expected sums, and the ε of a history (with Opacus's RDP terms memoised), are the very numbers
computed afresh."""

from __future__ import annotations

import hashlib
import hmac
import warnings

from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from carbonfed.privacy import accountant
from carbonfed.privacy.binding import expected_check, slot_tag
from carbonfed.privacy.signing import canonical

T = 1 << 32


def _fresh_tag(key: bytes, client: str, kind: str, rnd: int) -> int:
    mac = hmac.new(key, canonical({"client": client, "kind": kind, "round": rnd}), hashlib.sha256).digest()
    return int.from_bytes(mac[:8], "big") % (T // 2) + 1


def test_memoised_tags_and_sums_are_the_fresh_ones():
    key, other = b"k" * 32, b"o" * 32
    clients = [f"c{i}" for i in range(40)]
    for _ in range(2):                   # the second pass is served from the memo
        assert [slot_tag(key, c, "update", 3, T) for c in clients] == [_fresh_tag(key, c, "update", 3) for c in clients]
        assert expected_check(key, [("update", 3, clients)], T) == sum(_fresh_tag(key, c, "update", 3)
                                                                         for c in clients) % T
    # another key, round or contributor set is another value, not a stale one
    assert expected_check(other, [("update", 3, clients)], T) != expected_check(key, [("update", 3, clients)], T)
    assert expected_check(key, [["update", 4, list(clients)]], T) != expected_check(key, [("update", 3, clients)], T)
    assert expected_check(key, [("update", 3, clients[:-1])], T) != expected_check(key, [("update", 3, clients)], T)


def _unmemoised_epsilon(history, delta: float) -> float:
    """ε as Opacus computes it without any memo (its original RDP function restored meanwhile)."""
    memo = opacus_rdp._compute_rdp
    opacus_rdp._compute_rdp = memo.__wrapped__
    try:
        acc = PRVAccountant()
        acc.history = list(history)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(acc.get_epsilon(delta=delta, eps_error=accountant.EPS_ERROR))
    finally:
        opacus_rdp._compute_rdp = memo


def test_memoised_epsilon_is_opacus_own():
    assert hasattr(opacus_rdp._compute_rdp, "cache_info")          # memoised on import of the accountant
    history = [(4.5, 1.0, 3), (2.1, 0.2, 20)]
    accountant._epsilon_merged.cache_clear()
    first = accountant.epsilon_of(history, 1e-5)
    accountant._epsilon_merged.cache_clear()                       # the RDP terms now come from the memo
    assert accountant.epsilon_of(history, 1e-5) == first == _unmemoised_epsilon(history, 1e-5)

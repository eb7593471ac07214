"""A process opens the statistics aggregates of one run once (carbonfed.federation.client.scaler_cache):
the same request is served from the memo, any difference (aggregate bytes, terms, named
contributions, client key) opens them anew, and a refusal is never kept."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from carbonfed.federation.client import scaler_cache


def _participant(fingerprint="fp"):
    signer = SimpleNamespace(tag_key=b"k", charter=SimpleNamespace(sha256="c" * 64), modulus=7)
    return SimpleNamespace(cfg=("run",), fingerprint=fingerprint, signer=signer)


def test_the_same_aggregates_are_opened_once_and_any_difference_anew():
    calls = []

    def opened(key, value):
        return scaler_cache.scaler(key, lambda: calls.append(value) or value)

    stats, named = [(b"stage1", 131), (b"stage2", 131)], [["stats", 0, ["A", "B"]], ["stats2", 0, ["A", "B"]]]
    key = scaler_cache.scaler_key(_participant(), stats, named)
    again = scaler_cache.scaler_key(_participant(), list(stats), named)      # the same request once more
    assert opened(key, "s1") == "s1" and opened(again, "x") == "s1"
    others = [scaler_cache.scaler_key(_participant(), [(b"stage1", 131), (b"stage2!", 131)], named),
              scaler_cache.scaler_key(_participant(), [(b"stage1", 131), (b"stage2", 130)], named),
              scaler_cache.scaler_key(_participant(), stats, [["stats", 0, ["A", "C"]], named[1]]),
              scaler_cache.scaler_key(_participant("foreign"), stats, named)]
    assert [opened(k, f"o{i}") for i, k in enumerate(others)] == ["o0", "o1", "o2", "o3"]
    assert calls == ["s1", "o0", "o1", "o2", "o3"]


def test_a_refusal_is_not_kept():
    key = scaler_cache.scaler_key(_participant(), [(b"refused", 2)], [["stats", 0, ["A", "B"]]])

    def refuse():
        raise RuntimeError("refused")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="refused"):
            scaler_cache.scaler(key, refuse)
    assert scaler_cache.scaler(key, lambda: "made") == "made"

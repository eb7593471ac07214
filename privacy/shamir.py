"""Shamir secret sharing of short secrets over the prime field GF(2^31 - 1), vectorised with numpy.

A secret is a vector of :data:`LIMBS` field elements (155 bits of entropy when drawn by
:func:`new_secret`); every limb is shared with its own random polynomial of degree
``threshold - 1``, and the share of the holder with x-coordinate ``x`` is the vector of the
polynomials' values at ``x`` (:data:`SHARE_BYTES` bytes on the wire).

Why not Flower's ``flwr.common.secure_aggregation.crypto.shamir``: it wraps pycryptodome's
Shamir over GF(2^128) in pure-Python bit loops. Measured here (Flower 1.42.0, pycryptodome 3.24)
splitting one 16-byte secret into 130 shares of threshold 87 takes 0.9 s and combining 1.3 s,
so a 131-client round would spend minutes in sharing alone; this module does the same scheme
in a field small enough for int64 arithmetic, a few milliseconds for the same split.

Guarantees
----------
* Perfect secrecy: any ``threshold - 1`` shares are uniformly distributed whatever the secret
  (the random coefficients come from ``secrets``, the OS CSPRNG).
* :func:`combine` returns the secret from any ``threshold`` (or more) shares of one dealing,
  by Lagrange interpolation at 0; x-coordinates must be distinct and in ``1 .. P - 1``.
* :func:`share_from_bytes` refuses a share of the wrong length or with a limb outside the field.
* With ``draw`` (:func:`keyed_uniform`: the ChaCha20 keystream of a 32-byte key) a secret and its
  dealing are a deterministic function of that key, so a client that keeps nothing in memory
  re-derives the very same shares (never a second dealing of one secret); without it, the OS CSPRNG.
"""

from __future__ import annotations

import secrets
from functools import lru_cache

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

P = 2 ** 31 - 1          # Mersenne prime: products of two elements fit int64
LIMBS = 5                # 5 x 31 = 155 bits of secret
SHARE_BYTES = 4 * LIMBS


def _uniform(shape: tuple[int, ...]) -> np.ndarray:
    """Uniform field elements: 31-bit words from the OS CSPRNG, the one value P redrawn."""
    n = int(np.prod(shape))
    out = np.frombuffer(secrets.token_bytes(4 * n), dtype="<u4").astype(np.int64) & P
    while (bad := np.flatnonzero(out == P)).size:
        out[bad] = np.frombuffer(secrets.token_bytes(4 * bad.size), dtype="<u4").astype(np.int64) & P
    return out.reshape(shape)


def keyed_uniform(key: bytes):
    """``draw(shape)``: uniform field elements from the ChaCha20 keystream of ``key`` (32 bytes),
    31-bit words with the one value P redrawn; successive calls continue the stream."""
    stream = Cipher(algorithms.ChaCha20(key, b"\0" * 8 + b"shamir\0\0"), mode=None).encryptor()

    def words(n: int) -> np.ndarray:
        return np.frombuffer(stream.update(bytes(4 * n)), dtype="<u4").astype(np.int64) & P

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        out = words(int(np.prod(shape)))
        while (bad := np.flatnonzero(out == P)).size:
            out[bad] = words(bad.size)
        return out.reshape(shape)
    return draw


def new_secret(draw=None) -> np.ndarray:
    """A uniformly random secret: :data:`LIMBS` field elements (from ``draw`` if given)."""
    return (draw or _uniform)((LIMBS,))


def secret_bytes(secret: np.ndarray) -> bytes:
    return np.asarray(secret, dtype="<u4").tobytes()


def _xs(xs) -> np.ndarray:
    x = np.asarray(xs, dtype=np.int64)
    if x.ndim != 1 or x.size == 0 or (x < 1).any() or (x >= P).any() or np.unique(x).size != x.size:
        raise ValueError("x-coordinates must be distinct integers in 1 .. P-1")
    return x


def split(secret: np.ndarray, threshold: int, xs, draw=None) -> np.ndarray:
    """Shares (one row of :data:`LIMBS` elements per x-coordinate) of ``secret``; any
    ``threshold`` of them rebuild it, fewer reveal nothing (coefficients from ``draw`` if given)."""
    x = _xs(xs)
    s = np.asarray(secret, dtype=np.int64)
    if s.shape != (LIMBS,) or (s < 0).any() or (s >= P).any():
        raise ValueError(f"a secret is {LIMBS} field elements")
    if not 1 <= threshold <= x.size:
        raise ValueError(f"threshold {threshold} outside 1..{x.size} (the number of shares)")
    coeffs = np.vstack([s[None, :], (draw or _uniform)((threshold - 1, LIMBS))])
    powers = _power_table(int(x.max()), threshold)[x]      # x_i^k mod P: one table per roster and threshold
    # sum_k x_i^k c_k mod P, with each coefficient cut in 16-bit halves so no int64 sum overflows
    # (terms < 2^47, at most 2^16 of them): the values of the polynomials, exactly
    low, high = powers @ (coeffs & 0xFFFF), powers @ (coeffs >> 16)
    return ((high % P) * (1 << 16) + low) % P


@lru_cache(maxsize=64)
def _power_table(top: int, threshold: int) -> np.ndarray:
    """Row ``x``: ``x^0 .. x^(threshold-1)`` mod P, for ``x`` in ``0 .. top`` (each client's holders
    are a subset of the roster's x-coordinates: one table serves them all)."""
    x = np.arange(top + 1, dtype=np.int64)
    out = np.ones((top + 1, threshold), dtype=np.int64)
    for k in range(1, threshold):
        out[:, k] = out[:, k - 1] * x % P
    out.flags.writeable = False
    return out


@lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...]) -> np.ndarray:
    """λ_j = Π_{m≠j} x_m / (x_m − x_j) mod P, for distinct non-zero ``xs``: λ_j = (Π_m x_m) / (x_j · d_j)
    with d_j = Π_{m≠j} (x_m − x_j); the d_j by a pairwise product tree over the difference matrix,
    the n inverses by one exponentiation (Montgomery's batch inversion)."""
    x = np.asarray(xs, dtype=np.int64)
    d = (x[None, :] - x[:, None]) % P
    np.fill_diagonal(d, 1)                            # skip m == j
    while d.shape[1] > 1:                             # row products, two columns at a time
        if d.shape[1] % 2:
            d = np.hstack([d, np.ones((d.shape[0], 1), dtype=np.int64)])
        d = d[:, 0::2] * d[:, 1::2] % P
    den = [int(v) * int(xj) % P for v, xj in zip(d[:, 0], x)]
    prefix = [1]
    for v in den:
        prefix.append(prefix[-1] * v % P)
    inv, out = pow(prefix[-1], P - 2, P), [0] * len(den)
    for j in range(len(den) - 1, -1, -1):             # inv = 1 / (den_0 ... den_j)
        out[j], inv = inv * prefix[j] % P, inv * den[j] % P
    total = 1
    for v in x:
        total = total * int(v) % P
    return np.array([total * o % P for o in out], dtype=np.int64)


def combine(xs, shares: np.ndarray) -> np.ndarray:
    """The secret whose polynomials pass through ``(xs[i], shares[i])``."""
    x = _xs(xs)
    y = np.asarray(shares, dtype=np.int64)
    if y.shape != (x.size, LIMBS) or (y < 0).any() or (y >= P).any():
        raise ValueError(f"expected {x.size} shares of {LIMBS} field elements")
    lam = _lagrange_at_zero(tuple(int(v) for v in x))
    return (lam[:, None] * y % P).sum(axis=0) % P


def share_to_bytes(share: np.ndarray) -> bytes:
    return np.asarray(share, dtype="<u4").tobytes()


def shares_from_bytes(datas: list[bytes]) -> list[np.ndarray | None]:
    """:func:`share_from_bytes` of each, converted together; ``None`` where it would raise."""
    if not datas:
        return []
    if any(len(d) != SHARE_BYTES for d in datas):
        return [_or_none(d) for d in datas]
    rows = np.frombuffer(b"".join(datas), dtype="<u4").astype(np.int64).reshape(len(datas), LIMBS)
    bad = (rows >= P).any(axis=1)
    return [None if b else row for row, b in zip(rows, bad)]


def _or_none(data: bytes) -> np.ndarray | None:
    try:
        return share_from_bytes(data)
    except ValueError:
        return None


def share_from_bytes(data: bytes) -> np.ndarray:
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    share = np.frombuffer(data, dtype="<u4").astype(np.int64)
    if (share >= P).any():
        raise ValueError("share limb outside the field")
    return share

"""Streaming sum of encrypted (or, with HE off, plaintext) integer vectors.

Guarantees
----------
* :class:`SecureSum` adds each contribution into one running total as it arrives and keeps
  nothing else, so its memory does not grow with the number of clients.
* A contribution that does not parse, belongs to other HE parameters, has the wrong length or
  chunking, or is not a two-polynomial ciphertext at the data level raises
  :class:`~carbonfed.privacy.he.CiphertextError` and leaves the running total untouched; what
  loads adds without error, so one client's bad reply never costs another client's.
* Clients' uploads are seeded symmetric ciphertexts; the running total (and :meth:`SecureSum.serialize`)
  holds full ones. Both load through the same cipher, so an aggregate can be added again with
  its term count (the model average); the sum stays exact for the terms
  :func:`~carbonfed.privacy.he_ring.exact_terms` allows.
* :class:`PlainCipher` is the HE-off twin of :class:`~carbonfed.privacy.he.BFVCipher`: the same integer
  vectors, summed modulo the same plain modulus, so turning HE on changes no number.
"""

from __future__ import annotations

import numpy as np

from carbonfed.privacy.he import BFVCipher, CiphertextError


class PlainCipher:
    """Integer vectors in the clear (``--privacy none|dp``), with BFV's modular arithmetic."""

    stype = "numpy.int64"

    def __init__(self, length: int, plain_modulus: int):
        self.length = int(length)
        self.plain_modulus = int(plain_modulus)

    def encrypt(self, values: np.ndarray) -> bytes:
        v = np.asarray(values, dtype=np.int64)
        if v.shape != (self.length,):
            raise CiphertextError(f"expected a vector of {self.length} integers, got shape {v.shape}")
        if np.abs(v).max(initial=0) > self.plain_modulus // 2:
            raise OverflowError("value outside the centred range of the plain modulus")
        return v.tobytes()

    def load(self, data: bytes) -> np.ndarray:
        if len(data) != 8 * self.length:
            raise CiphertextError(f"plaintext update has {len(data)} bytes, expected {8 * self.length}")
        return np.frombuffer(bytes(data), dtype=np.int64).copy()

    def decrypt(self, data: bytes) -> np.ndarray:
        return self.load(data)


def _centre(v: np.ndarray, t: int) -> np.ndarray:
    v = np.mod(v, t)
    return np.where(v > t // 2, v - t, v)


class SecureSum:
    """Running sum of contributions under one cipher (BFV or plain)."""

    def __init__(self, cipher: BFVCipher | PlainCipher):
        self.cipher = cipher
        self._total = None
        self.terms = 0

    def add(self, data: bytes, terms: int = 1) -> None:
        """Add one contribution; ``terms``: how many it sums itself (an earlier aggregate's count)."""
        item = self.cipher.load(data)
        if self._total is None:
            self._total = item
        elif isinstance(self.cipher, PlainCipher):
            self._total = _centre(self._total + item, self.cipher.plain_modulus)
        else:
            self._total += item
        self.terms += terms

    def serialize(self) -> bytes:
        if self._total is None:
            raise ValueError("no contribution was added")
        if isinstance(self.cipher, PlainCipher):
            return self._total.astype(np.int64).tobytes()
        return self._total.serialize()

"""Integer layouts of what clients upload: model updates, metric counts, feature statistics.

Every block of ``BLOCK`` slots (one BFV ciphertext's worth) starts with a *check slot* holding 1.
In an honest sum of K contributions each check slot decrypts to exactly K, the number of replies
the server says it added. A ciphertext made under another key, or corrupted in a way the parser
cannot see, turns the slots of the ciphertext it hits into noise, including that ciphertext's
check slot, so the key holder detects the bad aggregate instead of using it
(:func:`with_checks` / :func:`strip_checks`).

Guarantees
----------
* :class:`UpdateLayout` carries the sample weight *inside* the vector: the first payload value is
  the client's sample count (at most the public ``max_client_samples``) and the parameters are
  encoded already multiplied by ``count / max_client_samples``; the server learns neither.
  Unpacking the sum gives the sample-weighted FedAvg of the (fixed-point) parameters.
* :class:`CountLayout` carries exact integer counts (confusion matrices).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from carbonfed.privacy.fixed_point import FixedPointCodec, WrapError

BLOCK = 4096  # slots per BFV ciphertext (HEParams.poly_modulus_degree)


class IntegrityError(ValueError):
    """A decrypted aggregate fails a check slot: a foreign-key or corrupted term was summed."""


def checked_length(payload: int) -> int:
    """Vector length for ``payload`` values with one check slot per block."""
    return payload + -(-payload // (BLOCK - 1))


def with_checks(payload: np.ndarray) -> np.ndarray:
    payload = np.asarray(payload, dtype=np.int64)
    chunks = [payload[i:i + BLOCK - 1] for i in range(0, len(payload), BLOCK - 1)]
    return np.concatenate([np.concatenate([[1], c]) for c in chunks]).astype(np.int64)


def strip_checks(vec: np.ndarray, terms: int, what: str) -> np.ndarray:
    vec = np.asarray(vec, dtype=np.int64)
    checks = vec[::BLOCK]
    bad = np.flatnonzero(checks != terms)
    if bad.size:
        raise IntegrityError(
            f"{what}: check slot of block {int(bad[0])} reads {int(checks[bad[0]])}, expected {terms} "
            f"contributions; a ciphertext under another key, or a corrupted one, was summed")
    return np.delete(vec, np.arange(0, len(vec), BLOCK))


@dataclass(frozen=True)
class UpdateLayout:
    n_params: int
    max_client_samples: int
    codec: FixedPointCodec

    @property
    def length(self) -> int:
        return checked_length(1 + self.n_params)

    def pack(self, params: np.ndarray, n_samples: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Returns the integer vector and the number of parameters clipped by the codec."""
        params = np.asarray(params, dtype=np.float64)
        if params.shape != (self.n_params,):
            raise ValueError(f"update has {params.shape} values, the layout expects {self.n_params}")
        count = int(n_samples)
        if not (1 <= count <= self.max_client_samples):
            raise ValueError(f"sample count {count} outside 1..max-client-samples={self.max_client_samples}")
        z, clipped = self.codec.encode(params * (count / self.max_client_samples), rng)
        return with_checks(np.concatenate([[count], z])), clipped

    def unpack_sum(self, vec: np.ndarray, terms: int) -> tuple[np.ndarray, int]:
        """(weighted mean parameters, total samples) from the sum of ``terms`` packed updates."""
        payload = strip_checks(vec, terms, "model aggregate")
        total = int(payload[0])
        if not (terms <= total <= terms * self.max_client_samples):
            raise WrapError(f"sample count {total} impossible for {terms} clients")
        self.codec.check_sum(payload[1:], terms)
        return self.codec.decode(payload[1:]) * (self.max_client_samples / total), total


@dataclass(frozen=True)
class CountLayout:
    """Exact non-negative integer counts, e.g. a flattened confusion matrix."""

    n_counts: int

    @property
    def length(self) -> int:
        return checked_length(self.n_counts)

    def pack(self, counts: np.ndarray) -> np.ndarray:
        counts = np.asarray(counts, dtype=np.int64).ravel()
        if counts.shape != (self.n_counts,) or (counts < 0).any():
            raise ValueError(f"expected {self.n_counts} non-negative counts")
        return with_checks(counts)

    def unpack_sum(self, vec: np.ndarray, terms: int) -> np.ndarray:
        counts = strip_checks(vec, terms, "count aggregate")
        if (counts < 0).any():
            raise WrapError("negative count in an aggregate of non-negative counts: the sum wrapped")
        return counts

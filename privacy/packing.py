"""Integer layouts of what clients upload: model updates, metric counts, feature statistics.

Every layout starts with a *check slot* holding 1. In an honest sum of K contributions that
slot decrypts to exactly K, the number of replies the server says it added; a ciphertext made
under another key, or corrupted in a way the parser cannot see, turns it (and every other slot)
into noise, so the key holder detects the bad aggregate instead of using it.

Guarantees
----------
* :class:`UpdateLayout` carries the sample weight *inside* the vector: slot 1 holds the client's
  sample count (capped at the public ``max_client_samples``) and the parameters are encoded
  already multiplied by ``count / max_client_samples``; the server learns neither. Unpacking the
  sum gives the sample-weighted FedAvg of the (fixed-point) parameters.
* :class:`CountLayout` carries exact integer counts (confusion matrices).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privacy.fixed_point import FixedPointCodec, WrapError


class IntegrityError(ValueError):
    """A decrypted aggregate fails its check slot: a foreign-key or corrupted term was summed."""


def _check(vec: np.ndarray, terms: int, what: str) -> None:
    if int(vec[0]) != terms:
        raise IntegrityError(
            f"{what}: check slot reads {int(vec[0])}, expected {terms} contributions; a ciphertext under "
            f"another key, or a corrupted one, was summed")


@dataclass(frozen=True)
class UpdateLayout:
    n_params: int
    max_client_samples: int
    codec: FixedPointCodec

    @property
    def length(self) -> int:
        return 2 + self.n_params

    def pack(self, params: np.ndarray, n_samples: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Returns the integer vector and the number of parameters clipped by the codec."""
        params = np.asarray(params, dtype=np.float64)
        if params.shape != (self.n_params,):
            raise ValueError(f"update has {params.shape} values, the layout expects {self.n_params}")
        count = min(int(n_samples), self.max_client_samples)
        if count < 1:
            raise ValueError("a client with no samples has no update")
        z, clipped = self.codec.encode(params * (count / self.max_client_samples), rng)
        return np.concatenate([[1, count], z]).astype(np.int64), clipped

    def unpack_sum(self, vec: np.ndarray, terms: int) -> tuple[np.ndarray, int]:
        """(weighted mean parameters, total samples) from the sum of ``terms`` packed updates."""
        vec = np.asarray(vec, dtype=np.int64)
        _check(vec, terms, "model aggregate")
        total = int(vec[1])
        if not (terms <= total <= terms * self.max_client_samples):
            raise WrapError(f"sample count {total} impossible for {terms} clients")
        self.codec.check_sum(vec[2:], terms)
        return self.codec.decode(vec[2:]) * (self.max_client_samples / total), total


@dataclass(frozen=True)
class CountLayout:
    """Exact non-negative integer counts, e.g. a flattened confusion matrix."""

    n_counts: int

    @property
    def length(self) -> int:
        return 1 + self.n_counts

    def pack(self, counts: np.ndarray) -> np.ndarray:
        counts = np.asarray(counts, dtype=np.int64).ravel()
        if counts.shape != (self.n_counts,) or (counts < 0).any():
            raise ValueError(f"expected {self.n_counts} non-negative counts")
        return np.concatenate([[1], counts]).astype(np.int64)

    def unpack_sum(self, vec: np.ndarray, terms: int) -> np.ndarray:
        vec = np.asarray(vec, dtype=np.int64)
        _check(vec, terms, "count aggregate")
        if (vec[1:] < 0).any():
            raise WrapError("negative count in an aggregate of non-negative counts: the sum wrapped")
        return vec[1:]

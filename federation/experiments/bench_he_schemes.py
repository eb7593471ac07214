"""The HE aggregation schemes that ``carbonfed bench he`` compares, each as a client side
(encrypt, and decrypt as the key holder) and a server side (add replies, finish).

carbonfed's BFV secure sum in three forms, beside NVIDIA FLARE's default CKKS (``baseline``):

``carbonfed``
    what a run uploads: seeded symmetric ciphertexts (:mod:`carbonfed.privacy.bfv_seeded`) under
    the smallest ring that sums ``n_clients`` replies of ``n_params`` values exactly
    (:func:`carbonfed.privacy.he_ring.ring_for`).
``carbonfed_default_ring``
    the same seeded ciphertexts under the default ring (:class:`~carbonfed.privacy.he.HEParams`).
``tenseal_public_key``
    the upload before seeded ciphertexts: TenSEAL's public-key ``bfv_vector`` under the default
    ring (:class:`~carbonfed.privacy.he.TenSEALBFVCipher`).

Guarantees
----------
* Every scheme uses TenSEAL contexts with ``n_threads=1``; a server is built from the *public*
  context bytes only and raises if they hold a secret key.
* ``scheme.decrypt(server.finish())`` is the mean of the ``n_clients`` updates that were added
  (carbonfed: exact fixed-point sum, checked against overflow, then ``/ n_clients``; baseline: the
  server's CKKS product with ``1 / n_clients``). The carbonfed schemes also set ``exact``: whether
  the decrypted integers equal the integer sum of the encoded updates (round-robin, as added).
* :data:`SCHEMES` maps each scheme's ``name`` to its (client side, server side) classes, in the
  order the benchmark runs them.
"""

from __future__ import annotations

import math

import numpy as np
import tenseal as ts

from carbonfed.privacy.fixed_point import FixedPointCodec
from carbonfed.privacy.he import BFVCipher, HEParams, TenSEALBFVCipher, new_secret_context, public_bytes
from carbonfed.privacy.he_ring import ring_for
from carbonfed.privacy.secure_sum import SecureSum

BASELINE_N = 8192
BASELINE_COEFF_MOD_BIT_SIZES = (60, 40, 40)
BASELINE_SCALE_BITS = 40
BASELINE_CHUNK = BASELINE_N // 2          # CKKS slots: what one ciphertext ("one tensor") holds


class CarbonFedScheme:
    """carbonfed's client side and key holder as a run uses it: fixed point, one BFVVector of all
    params, seeded symmetric ciphertexts under the run's ring, secret context."""

    name = "carbonfed"
    upload = "seeded symmetric ciphertexts (one polynomial + seed each), the run's ring ring_for(n_params, n_clients)"
    cipher_class = BFVCipher

    def ring(self, n_params: int, n_clients: int) -> HEParams:
        return ring_for(n_params, n_clients)

    def __init__(self, n_params: int, n_clients: int):
        self.params = self.ring(n_params, n_clients)
        self.n_params, self.n_clients = n_params, n_clients
        self.codec = FixedPointCodec(plain_modulus=self.params.plain_modulus, clip=1.0, max_terms=n_clients)
        self.ctx = new_secret_context(self.params)              # n_threads=1
        self.cipher = self.cipher_class(self.ctx, n_params)
        self.public = public_bytes(self.ctx)
        self.encoded: list[np.ndarray] = []                     # the integers of each distinct update
        self.exact: bool | None = None

    def describe(self) -> str:
        p = self.params
        return (f"BFV N={p.poly_modulus_degree}, coeff_mod_bit_sizes={list(p.coeff_mod_bit_sizes)}, "
                f"plain modulus {p.plain_modulus} ({p.plain_modulus_bits}-bit batching prime); {self.upload}; "
                f"fixed point clip=1, scale=2^{int(math.log2(self.codec.scale))}, stochastic rounding; one "
                f"BFVVector of all params ({p.slots} per ciphertext); server: SecureSum over the public context "
                f"(no secret key), replies added as they arrive; mean = decode(sum) / n_clients after decryption")

    def security_bits(self) -> int:
        return self.params.security_bits()

    def encrypt(self, update: np.ndarray, rng: np.random.Generator) -> list[bytes]:
        z, _ = self.codec.encode(update, rng)
        self.encoded.append(z)
        return [self.cipher.encrypt(z)]

    def decrypt(self, parts: list[bytes]) -> np.ndarray:
        z = self.cipher.decrypt(parts[0])
        self.codec.check_sum(z, self.n_clients)
        k = len(self.encoded)
        counts = np.bincount(np.arange(self.n_clients) % k, minlength=k)   # the server's round-robin
        self.exact = bool(np.array_equal(z, sum(int(c) * e for c, e in zip(counts, self.encoded))))
        return self.codec.decode(z) / self.n_clients


class DefaultRingScheme(CarbonFedScheme):
    """Seeded symmetric ciphertexts under the default ring (degree 4096, TenSEAL's two primes)."""

    name = "carbonfed_default_ring"
    upload = "seeded symmetric ciphertexts (one polynomial + seed each), the default ring"

    def ring(self, n_params: int, n_clients: int) -> HEParams:
        return HEParams()


class TenSEALPublicKeyScheme(DefaultRingScheme):
    """The upload before seeded ciphertexts: TenSEAL's public-key ``bfv_vector``, default ring."""

    name = "tenseal_public_key"
    upload = "TenSEAL public-key bfv_vector (two full polynomials each), the default ring"
    cipher_class = TenSEALBFVCipher


class CarbonFedServer:
    """carbonfed's server: a SecureSum over the public context; refuses a context with a secret key."""

    def __init__(self, public: bytes, n_params: int, n_clients: int):
        ctx = ts.context_from(public, n_threads=1)
        if ctx.has_secret_key():
            raise RuntimeError("benchmark server was handed a secret key")
        self.sum = SecureSum(BFVCipher(ctx, n_params))

    def add(self, parts: list[bytes]) -> None:
        self.sum.add(parts[0])

    def finish(self) -> list[bytes]:
        return [self.sum.serialize()]


class BaselineScheme:
    """NVIDIA FLARE's default HE (``nvflare.app_opt.he``): TenSEAL CKKS, N=8192, [60, 40, 40],
    scale 2^40, one ``ckks_vector`` per weight tensor; here tensors of N/2 = 4096 values, which is
    what one CKKS ciphertext holds. The server sums and multiplies by the plaintext 1/n_clients."""

    name = "baseline"

    def __init__(self, n_params: int, n_clients: int):
        self.n_params, self.n_clients = n_params, n_clients
        self.ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=BASELINE_N,
                              coeff_mod_bit_sizes=list(BASELINE_COEFF_MOD_BIT_SIZES), n_threads=1)
        self.ctx.global_scale = 2 ** BASELINE_SCALE_BITS
        self.ctx.generate_relin_keys()  # as NVFlare's key generation does; the server does not get them
        self.public = self.ctx.serialize(save_public_key=True, save_secret_key=False,
                                         save_galois_keys=False, save_relin_keys=False)
        self.bounds = [(i, min(i + BASELINE_CHUNK, n_params)) for i in range(0, n_params, BASELINE_CHUNK)]

    def describe(self) -> str:
        return (f"NVIDIA FLARE default HE: TenSEAL CKKS N={BASELINE_N}, coeff_mod_bit_sizes="
                f"{list(BASELINE_COEFF_MOD_BIT_SIZES)}, global scale 2^{BASELINE_SCALE_BITS}; one ckks_vector per "
                f"tensor (tensors of {BASELINE_CHUNK} values = one ciphertext each); server sums the replies and "
                f"multiplies by the plaintext 1/n_clients (one rescale level)")

    def security_bits(self) -> int:
        return HEParams(poly_modulus_degree=BASELINE_N, coeff_mod_bit_sizes=BASELINE_COEFF_MOD_BIT_SIZES).security_bits()

    def encrypt(self, update: np.ndarray, rng: np.random.Generator) -> list[bytes]:
        update = np.asarray(update, dtype=np.float64)
        return [ts.ckks_vector(self.ctx, update[a:b].tolist()).serialize() for a, b in self.bounds]

    def decrypt(self, parts: list[bytes]) -> np.ndarray:
        return np.concatenate([np.asarray(ts.ckks_vector_from(self.ctx, p).decrypt(), dtype=np.float64)
                               for p in parts])


class BaselineServer:
    """The baseline's server: sums the CKKS vectors, then multiplies by the plaintext 1/n_clients."""

    def __init__(self, public: bytes, n_params: int, n_clients: int):
        self.ctx = ts.context_from(public, n_threads=1)
        if self.ctx.has_secret_key():
            raise RuntimeError("benchmark server was handed a secret key")
        self.n_clients = n_clients
        self.total = None

    def add(self, parts: list[bytes]) -> None:
        vecs = [ts.ckks_vector_from(self.ctx, p) for p in parts]
        if self.total is None:
            self.total = vecs
        else:
            for acc, v in zip(self.total, vecs):
                acc += v

    def finish(self) -> list[bytes]:
        w = 1.0 / self.n_clients
        for acc in self.total:
            acc *= w
        return [acc.serialize() for acc in self.total]


SCHEMES = {"tenseal_public_key": (TenSEALPublicKeyScheme, CarbonFedServer),
           "carbonfed_default_ring": (DefaultRingScheme, CarbonFedServer),
           "carbonfed": (CarbonFedScheme, CarbonFedServer), "baseline": (BaselineScheme, BaselineServer)}

"""Homomorphic encryption of integer vectors with TenSEAL BFV.

Guarantees
----------
* Parameters are checked against the HomomorphicEncryption.org security table that SEAL
  enforces: :meth:`HEParams.security_bits` reports the level (128, 192 or 256 bits) that the
  total coefficient-modulus size allows for the ring dimension, and key generation fails below 128.
* A *public* context (the server's) holds the parameters and the public key only: no secret key,
  no relinearisation and no Galois keys, so it can add ciphertexts and nothing else.
  :func:`load_public_context` refuses a file that contains a secret key, so a misconfigured server
  cannot start with one.
* The secret context (the clients') is written with file mode 0600.
* Clients encrypt *symmetrically* with the secret key, as seeded ciphertexts
  (:mod:`carbonfed.privacy.bfv_seeded`): one polynomial and a PRNG seed per ciphertext, half of a
  public-key ciphertext. The server loads them (SEAL re-expands the seed) and adds them.
* The BFV sum of integer vectors is exact modulo the plain modulus for as many terms as
  :func:`carbonfed.privacy.he_ring.exact_terms` proves; :class:`BFVCipher` only encrypts vectors
  whose entries already lie in the centred range of that modulus.
* The plain modulus is the same prime for every ring degree up to 4096 (the 32-bit batching prime
  of degree 4096, which also batches degree 2048), so the fixed-point integers, and with them the
  model, do not depend on the ring a run uses.

Addition-only aggregation needs no multiplicative depth: the ring a run needs is one data prime
(:mod:`carbonfed.privacy.he_ring`); the default parameters keep TenSEAL's data prime plus special
prime.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tenseal as ts
from tenseal import sealapi

from carbonfed.privacy.bfv_seeded import SeededEncryptor, chunk_sizes, new_key_contexts, seal_bytes, vector_layout

SECRET_CONTEXT_FILE = "secret.ctx"
PUBLIC_CONTEXT_FILE = "public.ctx"
PLAIN_MODULUS_DEGREE = 4096   # the plain modulus is the batching prime of this degree (and of every smaller one)


@functools.lru_cache(maxsize=8)
def _batching_prime(degree: int, bits: int) -> int:
    """SEAL's ``bits``-bit batching prime for ``degree`` (a prime search: asked for on every message)."""
    return int(sealapi.PlainModulus.Batching(degree, bits).value())


class ContextFileError(ValueError):
    """A context file is missing, unreadable, or of the wrong kind (secret vs public)."""


class CiphertextError(ValueError):
    """A ciphertext is malformed, for other parameters, or of the wrong length."""


@dataclass(frozen=True)
class HEParams:
    """BFV parameters for addition-only aggregation.

    ``plain_modulus_bits`` selects the batching prime (≡ 1 mod 2N) of that size; sums are exact
    modulo that prime, so the fixed-point codec sizes its scale to keep them far from wrapping.
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (56, 53)
    plain_modulus_bits: int = 32

    @property
    def plain_modulus(self) -> int:
        return _batching_prime(max(self.poly_modulus_degree, PLAIN_MODULUS_DEGREE), self.plain_modulus_bits)

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree

    def security_bits(self) -> int:
        """Security level the HE standard table gives these parameters (0 if below 128)."""
        total = sum(self.coeff_mod_bit_sizes)
        for bits, level in ((256, sealapi.SEC_LEVEL_TYPE.TC256), (192, sealapi.SEC_LEVEL_TYPE.TC192),
                            (128, sealapi.SEC_LEVEL_TYPE.TC128)):
            if total <= sealapi.CoeffModulus.MaxBitCount(self.poly_modulus_degree, level):
                return bits
        return 0

    def describe(self) -> dict:
        d = asdict(self)
        d["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        d.update(scheme="BFV", plain_modulus=self.plain_modulus, security_bits=self.security_bits())
        return d


def _key_contexts(params: HEParams) -> tuple[bytes, bytes]:
    if params.security_bits() < 128:
        raise ValueError(f"HE parameters {params} give less than 128-bit security")
    return new_key_contexts(params.poly_modulus_degree, params.coeff_mod_bit_sizes, params.plain_modulus)


def new_secret_context(params: HEParams = HEParams()) -> ts.Context:
    """A fresh BFV context with a new secret key (for the key holders, i.e. the clients)."""
    return ts.context_from(_key_contexts(params)[0], n_threads=1)


def public_bytes(ctx: ts.Context) -> bytes:
    """Serialise the parameters and public key only: what the server may hold."""
    return ctx.serialize(save_public_key=True, save_secret_key=False,
                         save_galois_keys=False, save_relin_keys=False)


def key_fingerprint(ctx: ts.Context) -> str:
    """SHA-256 of the public key (which embeds the parameter id): equal for the server and every
    key holder of one key, different for any other key or parameter set.

    (A whole-context serialisation is not stable: TenSEAL's changes once it has encrypted.)
    """
    return hashlib.sha256(seal_bytes(ctx.public_key().data)).hexdigest()


def params_of(ctx: ts.Context) -> HEParams:
    """Recover :class:`HEParams` from a loaded context."""
    data = ctx.seal_context().data.key_context_data().parms()
    n = data.poly_modulus_degree()
    bits = tuple(m.bit_count() for m in data.coeff_modulus())
    t = data.plain_modulus().value()
    return HEParams(poly_modulus_degree=n, coeff_mod_bit_sizes=bits, plain_modulus_bits=t.bit_length())


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def keygen(out_dir: str | os.PathLike, params: HEParams = HEParams()) -> tuple[Path, Path]:
    """Write ``secret.ctx`` (clients) and ``public.ctx`` (server), both mode 0600.

    ``params``: the run's ring (:func:`carbonfed.privacy.he_ring.ring_for`); the default is the
    TenSEAL ring of degree 4096 that holds any vector.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    secret_bytes, public = _key_contexts(params)
    secret, public_path = out / SECRET_CONTEXT_FILE, out / PUBLIC_CONTEXT_FILE
    _write_private(secret, secret_bytes)
    _write_private(public_path, public)
    return secret, public_path


def _read(path: str | os.PathLike, what: str) -> ts.Context:
    p = Path(path)
    if not p.is_file():
        raise ContextFileError(f"{what} context file not found: {p} (create one with `carbonfed keygen --out DIR`)")
    try:
        return ts.context_from(p.read_bytes(), n_threads=1)
    except Exception as exc:  # TenSEAL raises bare RuntimeError/ValueError on a bad stream
        raise ContextFileError(f"{what} context file {p} is not a TenSEAL context: {exc}") from exc


def load_secret_context(path: str | os.PathLike) -> ts.Context:
    """Load the key holders' context; it must contain the secret key."""
    ctx = _read(path, "secret")
    if not ctx.has_secret_key():
        raise ContextFileError(f"{path} holds no secret key: clients need the secret context, not the public one")
    return ctx


def load_public_context(path: str | os.PathLike) -> ts.Context:
    """Load the server's context; refuse one that holds a secret key."""
    ctx = _read(path, "public")
    if ctx.has_secret_key():
        raise ContextFileError(f"refusing to start: {path} contains a secret key. The server must load the "
                        f"public context ({PUBLIC_CONTEXT_FILE}) only")
    return ctx


class BFVCipher:
    """Encrypts, adds and decrypts integer vectors of one fixed length under one context.

    Every vector travels as one serialised TenSEAL ``BFVVector`` (one ciphertext per ``slots``
    values). :meth:`encrypt` (key holders only) writes seeded symmetric ciphertexts.
    :meth:`load` rejects bytes that do not parse, that belong to other parameters, whose chunking
    or length differs from ``length``, or whose ciphertexts are not fresh-or-summed ones (two
    polynomials, data level, coefficient form): whatever it returns adds to any other loaded
    vector of the same cipher without error.
    """

    stype = "tenseal.bfv_vector"

    def __init__(self, ctx: ts.Context, length: int):
        self.ctx = ctx
        self.length = int(length)
        self.plain_modulus = params_of(ctx).plain_modulus
        self._half = self.plain_modulus // 2
        seal_context = ctx.seal_context().data
        self.slots = seal_context.first_context_data().parms().poly_modulus_degree()
        self._data_level = list(seal_context.first_parms_id())
        self._chunks = chunk_sizes(self.length, self.slots)
        self._encryptor = None

    def _checked(self, values: np.ndarray) -> np.ndarray:
        v = np.asarray(values, dtype=np.int64)
        if v.shape != (self.length,):
            raise CiphertextError(f"expected a vector of {self.length} integers, got shape {v.shape}")
        if np.abs(v).max(initial=0) > self._half:
            raise OverflowError("value outside the centred range of the plain modulus")
        return v

    def encrypt(self, values: np.ndarray) -> bytes:
        v = self._checked(values)
        if self._encryptor is None:
            self._encryptor = SeededEncryptor(self.ctx)
        return self._encryptor.encrypt(v)

    def load(self, data: bytes) -> ts.BFVVector:
        try:
            sizes, blobs = vector_layout(data)
        except ValueError as exc:
            raise CiphertextError(f"ciphertext does not parse under this context: {exc}") from exc
        if sizes != self._chunks:
            raise CiphertextError(f"ciphertext holds {sum(sizes)} values in chunks {sizes[:4]}..., expected "
                                  f"{self.length} in chunks {self._chunks[:4]}...")
        if len(blobs) != len(sizes):
            raise CiphertextError(f"ciphertext does not parse under this context: {len(blobs)} ciphertexts "
                                  f"for {len(sizes)} chunks")
        try:
            vec = ts.bfv_vector_from(self.ctx, bytes(data))
            cts = vec.ciphertext()
        except Exception as exc:
            raise CiphertextError(f"ciphertext does not parse under this context: {exc}") from exc
        for ct in cts:   # what SEAL's loader lets through but its addition refuses, or a product's
            if ct.size() != 2 or ct.is_ntt_form() or list(ct.parms_id()) != self._data_level:
                raise CiphertextError("ciphertext does not parse under this context: not a two-polynomial "
                                      "ciphertext at the data level in coefficient form")
        return vec

    def decrypt(self, data: bytes) -> np.ndarray:
        return np.asarray(self.load(data).decrypt(), dtype=np.int64)


class TenSEALBFVCipher(BFVCipher):
    """The pre-seeded upload, for comparison (``carbonfed bench he``): TenSEAL's public-key
    ``bfv_vector`` (two full polynomials per ciphertext, the values replicated over the slots).
    Its noise is larger than the symmetric bound of :mod:`carbonfed.privacy.he_ring`."""

    def encrypt(self, values: np.ndarray) -> bytes:
        return ts.bfv_vector(self.ctx, self._checked(values).tolist()).serialize()

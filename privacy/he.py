"""Homomorphic encryption of integer vectors with TenSEAL BFV.

Guarantees
----------
* Parameters are checked against the HomomorphicEncryption.org security table that SEAL
  enforces: :meth:`HEParams.security_bits` reports the level (128, 192 or 256 bits) that the
  total coefficient-modulus size allows for the ring dimension, and construction fails below 128.
* A *public* context (the server's) holds no secret key, no relinearisation and no Galois keys:
  it can add ciphertexts and nothing else. :func:`load_public_context` refuses a file that
  contains a secret key, so a misconfigured server cannot start with one.
* The secret context (the clients') is written with file mode 0600.
* The BFV sum of integer vectors is exact modulo the plain modulus; :class:`BFVCipher`
  only encrypts vectors whose entries already lie in the centred range of that modulus.

Addition-only aggregation needs no multiplicative depth, so the chain is one data prime plus
the special prime TenSEAL requires for its key-switching keys: a fresh ciphertext carries a
single 56-bit prime, about 15 bytes per slot after SEAL's compression.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tenseal as ts
from tenseal import sealapi

SECRET_CONTEXT_FILE = "secret.ctx"
PUBLIC_CONTEXT_FILE = "public.ctx"


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
        return int(sealapi.PlainModulus.Batching(self.poly_modulus_degree, self.plain_modulus_bits).value())

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


def new_secret_context(params: HEParams = HEParams()) -> ts.Context:
    """A fresh BFV context with a new secret key (for the key holders, i.e. the clients)."""
    if params.security_bits() < 128:
        raise ValueError(f"HE parameters {params} give less than 128-bit security")
    return ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=params.poly_modulus_degree,
                      plain_modulus=params.plain_modulus,
                      coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes), n_threads=1)


def public_bytes(ctx: ts.Context) -> bytes:
    """Serialise the parameters and public key only: what the server may hold."""
    return ctx.serialize(save_public_key=True, save_secret_key=False,
                         save_galois_keys=False, save_relin_keys=False)


def key_fingerprint(ctx: ts.Context) -> str:
    """SHA-256 of the public key (which embeds the parameter id): equal for the server and every
    key holder of one key, different for any other key or parameter set.

    (A whole-context serialisation is not stable: TenSEAL's changes once it has encrypted.)
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "public.key")
        ctx.public_key().data.save(path)
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()


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
    """Write ``secret.ctx`` (clients) and ``public.ctx`` (server), both mode 0600."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    ctx = new_secret_context(params)
    secret, public = out / SECRET_CONTEXT_FILE, out / PUBLIC_CONTEXT_FILE
    _write_private(secret, ctx.serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=True))
    _write_private(public, public_bytes(ctx))
    return secret, public


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

    Every vector travels as one serialised TenSEAL ``BFVVector`` (which packs ``slots`` values per
    ciphertext). :meth:`load` rejects bytes that do not parse, that belong to other parameters,
    or whose length differs from ``length``.
    """

    stype = "tenseal.bfv_vector"

    def __init__(self, ctx: ts.Context, length: int):
        self.ctx = ctx
        self.length = int(length)
        self.plain_modulus = params_of(ctx).plain_modulus
        self._half = self.plain_modulus // 2

    def encrypt(self, values: np.ndarray) -> bytes:
        v = np.asarray(values, dtype=np.int64)
        if v.shape != (self.length,):
            raise CiphertextError(f"expected a vector of {self.length} integers, got shape {v.shape}")
        if np.abs(v).max(initial=0) > self._half:
            raise OverflowError("value outside the centred range of the plain modulus")
        return ts.bfv_vector(self.ctx, v.tolist()).serialize()

    def load(self, data: bytes) -> ts.BFVVector:
        try:
            vec = ts.bfv_vector_from(self.ctx, bytes(data))
        except Exception as exc:
            raise CiphertextError(f"ciphertext does not parse under this context: {exc}") from exc
        if vec.size() != self.length:
            raise CiphertextError(f"ciphertext holds {vec.size()} values, expected {self.length}")
        return vec

    def decrypt(self, data: bytes) -> np.ndarray:
        return np.asarray(self.load(data).decrypt(), dtype=np.int64)

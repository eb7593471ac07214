"""Seeded symmetric BFV encryption, and the TenSEAL containers that carry it.

A key holder encrypts with the *secret* key (Microsoft SEAL's ``Encryptor.encrypt_symmetric``,
reached through TenSEAL's ``tenseal.sealapi``). A fresh symmetric ciphertext is ``(c0, c1)`` with
``c1`` uniform, so SEAL stores ``c1`` as the seed of the PRNG that drew it: the saved ciphertext is
one polynomial plus a seed record (SEAL 4: 16-byte header, PRNG type, 64-byte seed), compressed.
Loading it (``Ciphertext::load``, which TenSEAL's ``BFVVector`` loader calls) re-expands the seed,
so the server adds what it loads exactly as before.

Guarantees
----------
* :class:`SeededEncryptor` writes one seeded ciphertext per ``slots`` values, in a TenSEAL
  ``BFVVectorProto`` (``tenseal/proto/tensors.proto``: ``sizes`` = 1, ``ciphertexts`` = 2): the
  bytes load with ``ts.bfv_vector_from`` under the key holders' or the server's context.
* :func:`vector_layout` parses that container strictly (only fields 1 and 2, every length in
  range, nothing after the last field), so a caller can check the chunk sizes and the ciphertext
  count *before* TenSEAL touches them.
* :func:`context_bytes` writes a ``TenSEALContextProto`` (``tenseal/proto/tensealcontext.proto``)
  with the parameters, the public key and, for the key holders only, the secret key; it holds no
  relinearisation or Galois keys, so it also serves rings with a single prime (which TenSEAL's own
  ``ts.context`` refuses because it always makes relinearisation keys).
* Secret material goes through SEAL's file-only ``save`` in a private (0700) scratch folder, on
  ``/dev/shm`` where there is one, and is deleted at once.

Checked against TenSEAL 0.3.18 (its bundled SEAL writes serialisation version 4.x).
"""

from __future__ import annotations

import os
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tenseal import sealapi

AUTO_FLAGS = 7              # TenSEAL's default: auto relin | auto rescale | auto mod switch
NO_SCALE = -1.0             # TenSEAL's "no global scale" (BFV has none)


def _scratch_root() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


@contextmanager
def scratch_file():
    """A path in a fresh private folder (memory-backed where possible), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="carbonfed-seal-", dir=_scratch_root()) as tmp:
        yield os.path.join(tmp, "obj")


def seal_bytes(obj, path: str | None = None) -> bytes:
    """The SEAL serialisation of ``obj`` (its ``save`` is file-only in ``tenseal.sealapi``)."""
    if path is None:
        with scratch_file() as p:
            return seal_bytes(obj, p)
    obj.save(path)
    with open(path, "rb") as fh:
        return fh.read()


# -- protobuf wire format (proto3: varints and length-delimited fields only) --------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _read_varint(data, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


def vector_bytes(sizes: list[int], ciphertexts: list[bytes]) -> bytes:
    """A ``BFVVectorProto``: packed chunk sizes, then one SEAL ciphertext per chunk."""
    packed = b"".join(_varint(s) for s in sizes)
    return _bytes_field(1, packed) + b"".join(_bytes_field(2, c) for c in ciphertexts)


def vector_layout(data: bytes) -> tuple[list[int], list[memoryview]]:
    """``(chunk sizes, SEAL ciphertexts)`` of a ``BFVVectorProto`` (the ciphertexts as views of
    ``data``); ``ValueError`` on any other field, a wire type other than TenSEAL's, or a length
    running past the end."""
    view = memoryview(bytes(data))
    sizes: list[int] = []
    blobs: list[memoryview] = []
    i = 0
    while i < len(view):
        tag, i = _read_varint(view, i)
        number, wire = tag >> 3, tag & 7
        if (number, wire) == (1, 0):
            size, i = _read_varint(view, i)
            sizes.append(size)
            continue
        if wire != 2 or number not in (1, 2):
            raise ValueError(f"unexpected field {number} (wire type {wire}) in a BFV vector")
        length, i = _read_varint(view, i)
        if length > len(view) - i:
            raise ValueError("field runs past the end of the data")
        if number == 1:
            j, end = i, i + length
            while j < end:
                size, j = _read_varint(view[:end], j)
                sizes.append(size)
        else:
            blobs.append(view[i:i + length])
        i += length
    return sizes, blobs


def chunk_sizes(length: int, slots: int) -> list[int]:
    """How TenSEAL (and :class:`SeededEncryptor`) cut ``length`` values into ciphertexts."""
    full, rest = divmod(int(length), int(slots))
    return [slots] * full + ([rest] if rest else [])


# -- contexts ---------------------------------------------------------------------------------

def context_bytes(parms: bytes, public_key: bytes, secret_key: bytes | None = None) -> bytes:
    """A ``TenSEALContextProto``: asymmetric type (the default, field 4 omitted)."""
    public = (_bytes_field(1, public_key) + _varint(2 << 3) + _varint(AUTO_FLAGS)
              + _varint(3 << 3 | 1) + struct.pack("<d", NO_SCALE))
    out = _bytes_field(1, parms) + _bytes_field(2, public)
    if secret_key is not None:
        out += _bytes_field(3, _bytes_field(1, secret_key))
    return out


def new_key_contexts(poly_modulus_degree: int, coeff_mod_bit_sizes: tuple[int, ...],
                     plain_modulus: int) -> tuple[bytes, bytes]:
    """(secret, public) ``TenSEALContextProto`` bytes of a fresh key; SEAL enforces 128-bit
    security (its default ``SEALContext`` check) and rejects parameters it cannot use."""
    parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.BFV)
    parms.set_poly_modulus_degree(int(poly_modulus_degree))
    parms.set_coeff_modulus(sealapi.CoeffModulus.Create(int(poly_modulus_degree), list(coeff_mod_bit_sizes)))
    parms.set_plain_modulus(int(plain_modulus))
    context = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise ValueError(f"SEAL refuses these BFV parameters: {context.parameters_error_message()}")
    keygen = sealapi.KeyGenerator(context)
    public_key = sealapi.PublicKey()
    keygen.create_public_key(public_key)
    with scratch_file() as path:
        parms_b, pk_b = seal_bytes(parms, path), seal_bytes(public_key, path)
        sk_b = seal_bytes(keygen.secret_key(), path)
    return context_bytes(parms_b, pk_b, sk_b), context_bytes(parms_b, pk_b)


# -- encryption -------------------------------------------------------------------------------

class SeededEncryptor:
    """Seeded symmetric encryption under a TenSEAL context that holds the secret key."""

    def __init__(self, ctx):
        if not ctx.has_secret_key():
            raise ValueError("seeded symmetric encryption needs the secret key (a key holder's context)")
        seal_context = ctx.seal_context().data
        self.slots = seal_context.first_context_data().parms().poly_modulus_degree()
        self._encoder = sealapi.BatchEncoder(seal_context)
        self._encryptor = sealapi.Encryptor(seal_context, ctx.secret_key().data)

    def encrypt(self, values: np.ndarray) -> bytes:
        """One seeded ciphertext per ``slots`` values (unused slots hold 0), as a BFV vector."""
        values = np.asarray(values, dtype=np.int64)
        sizes = chunk_sizes(len(values), self.slots)
        blobs = []
        with scratch_file() as path:
            for start in range(0, len(values), self.slots):
                plain = sealapi.Plaintext()
                self._encoder.encode(values[start:start + self.slots].tolist(), plain)
                blobs.append(seal_bytes(self._encryptor.encrypt_symmetric(plain), path))
        return vector_bytes(sizes, blobs)

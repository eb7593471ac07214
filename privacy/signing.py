"""Ed25519 signatures over canonical JSON: the clients' signing keys and what a verifier needs.

Each client holds its own Ed25519 key (RFC 8032, via ``cryptography``), made once at enrolment
(:func:`keygen_clients`). Its public half, 32 bytes in hex, is all a verifier needs: checking a
signature takes no secret, so a reviewer holding only a run folder can check every one.

Guarantees
----------
* :func:`canonical` is deterministic: sorted keys, no whitespace, ASCII escapes, and it refuses
  NaN and infinity (which JSON cannot carry faithfully). A reader on another machine that parses
  a signed object from JSON and encodes it again gets the very bytes that were signed.
* Every signed object names its own ``type`` (:func:`sign` refuses one that does not), so a
  signature made for one purpose (a charter endorsement, a statement of facts) never verifies
  as another.
* A private key file is PKCS#8 PEM, mode 0600, in a ``signing/`` folder of mode 0700;
  :func:`keygen_clients` keeps a key that already exists (a client enrols once) and writes the
  public keys to ``clients.pub.json``, the file a client or reviewer publishes.
* :func:`signature_valid` returns False (never raises) for a malformed key or signature.
* A signature verified once in a process is not verified again: :func:`signature_valid_over`
  remembers the valid ones (only those) by public key, SHA-256 of the signed bytes and signature
  (a run's statements are checked as they arrive, then by the report, the keyless verify and the
  documents; every client of a mask stream reads the same adverts).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PUBLIC_KEYS_FILE = "clients.pub.json"
SIGNING_DIR = "signing"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX128 = re.compile(r"^[0-9a-f]{128}$")


class SigningError(ValueError):
    """A key file or public-key list is missing, malformed, or of the wrong kind."""


def canonical(obj) -> bytes:
    """The bytes a signature or hash covers: sorted keys, no whitespace, ASCII, finite numbers."""
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except ValueError as e:           # the encoder's own check (in C: the run's ledgers hold ~10^7 numbers)
        if "Out of range float" not in str(e):
            raise
        raise ValueError("a value cannot be signed: JSON has no faithful encoding of NaN or infinity") from e
    return text.encode()


def digest(obj) -> str:
    """SHA-256 (hex) of :func:`canonical` bytes."""
    return hashlib.sha256(canonical(obj)).hexdigest()


def new_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_hex(key: Ed25519PrivateKey) -> str:
    """The 32-byte raw public key, hex: what a charter lists and a verifier checks against."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def is_public_hex(value) -> bool:
    return isinstance(value, str) and bool(_HEX64.match(value))


def sign(key: Ed25519PrivateKey, obj: dict) -> str:
    """Ed25519 signature (hex) of ``obj``'s canonical bytes; ``obj`` must name its ``type``."""
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ValueError("a signed object must be a dict that names its 'type'")
    return key.sign(canonical(obj)).hex()


def signature_valid(public: str, obj: dict, signature) -> bool:
    """True if ``signature`` (hex) is the holder of ``public``'s signature of ``obj``."""
    try:
        data = canonical(obj)
    except (ValueError, TypeError):
        return False
    return signature_valid_over(public, data, signature)


def signature_valid_over(public: str, data: bytes, signature) -> bool:
    """:func:`signature_valid` for an object's :func:`canonical` bytes, already encoded."""
    if not (is_public_hex(public) and isinstance(signature, str) and _HEX128.match(signature)):
        return False
    key = (public, hashlib.sha256(data).digest(), signature)
    if key in _VERIFIED:                  # SHA-256 binds the bytes: a hit is a signature on these bytes
        return True
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public)).verify(bytes.fromhex(signature), data)
    except (InvalidSignature, ValueError, TypeError):
        return False
    if len(_VERIFIED) >= _VERIFIED_MAX:
        _VERIFIED.clear()
    _VERIFIED[key] = None
    return True


_VERIFIED: dict[tuple[str, bytes, str], None] = {}     # (public, SHA-256 of the bytes, signature) that verified
_VERIFIED_MAX = 1 << 15


# -- key files -----------------------------------------------------------------------------------

def key_file(keys_dir: str | os.PathLike, client: str) -> Path:
    """``keys_dir/signing/<slug>-<hash>.key``: one file per client, whatever its name's characters."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", client).strip("_") or "client"
    return Path(keys_dir) / SIGNING_DIR / f"{slug}-{hashlib.sha256(client.encode()).hexdigest()[:8]}.key"


def save_signing_key(path: str | os.PathLike, key: Ed25519PrivateKey) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(p.parent, 0o700)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(p, 0o600)
    return p


def load_signing_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    p = Path(path)
    if not p.is_file():
        raise SigningError(f"signing key not found: {p} (enrol the client with `carbonfed keygen`)")
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{p} is not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{p} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def keygen_clients(keys_dir: str | os.PathLike, clients: Iterable[str]) -> dict[str, str]:
    """Make (or keep) a signing key per client under ``keys_dir/signing/`` and write their public
    keys to ``keys_dir/clients.pub.json``; returns ``{client: public key hex}``."""
    public = {}
    for client in sorted(set(clients)):
        path = key_file(keys_dir, client)
        key = load_signing_key(path) if path.exists() else new_signing_key()
        if not path.exists():
            save_signing_key(path, key)
        public[client] = public_hex(key)
    write_public_keys(Path(keys_dir) / PUBLIC_KEYS_FILE, public)
    return public


def write_public_keys(path: str | os.PathLike, public: dict[str, str]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"clients": dict(sorted(public.items()))}, indent=1) + "\n")
    return p


def load_public_keys(path: str | os.PathLike) -> dict[str, str]:
    """``{client: public key hex}`` from a ``clients.pub.json``; refuses a malformed one."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SigningError(f"cannot read the public keys in {p}: {exc}") from exc
    keys = doc.get("clients") if isinstance(doc, dict) else None
    if not isinstance(keys, dict) or not all(isinstance(c, str) and is_public_hex(k) for c, k in keys.items()):
        raise SigningError(f"{p}: expected {{\"clients\": {{name: 64 hex digits}}}}")
    return dict(keys)

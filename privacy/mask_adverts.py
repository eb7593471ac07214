"""Reading the clients' signed X25519 adverts of a mask stream (issue 22): which keys the run uses.

Guarantees
----------
* :func:`read_adverts` keeps an advert only if it is signed by the client it names, for this run,
  carries a key no other client advertises and, with ``check_keys``, a usable X25519 key (not a
  low-order point); every other advert is a named :class:`~carbonfed.privacy.mask_wire.Rejection`.
* It is a pure function of its arguments, memoised per process (every client of a stream reads the
  same adverts); callers get fresh containers.
"""

from __future__ import annotations

import functools

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from carbonfed.privacy.mask_wire import MaskRejection, Rejection, open_message
from carbonfed.privacy.masks import new_agreement_key


def check_agreement_key(public: bytes) -> None:
    """Raise ``ValueError`` unless ``public`` is a usable X25519 key (32 bytes, not low order)."""
    if len(public) != 32:
        raise ValueError("an X25519 public key is 32 bytes")
    if not _usable_key(bytes(public)):
        raise ValueError("a low-order point: no shared secret")


@functools.lru_cache(maxsize=4096)
def _usable_key(public: bytes) -> bool:
    """An exchange with it gives a shared secret (X25519 refuses the low-order points), checked
    once per key and process (every client of a stream checks the same 130 adverts)."""
    try:
        _probe_key().exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return False
    return True


@functools.cache
def _probe_key() -> X25519PrivateKey:
    return new_agreement_key()


def read_adverts(adverts: list[bytes] | dict[str, bytes], run: str, public_keys: dict[str, str],
                 check_keys: bool = True) -> tuple[dict[str, bytes], list[Rejection]]:
    """``{client: X25519 public key}`` of the adverts that check (signed by the named client, for
    this run, a key that no other client advertises and, with ``check_keys``, usable), and the
    refused ones, named (by their sender, when ``adverts`` maps senders to adverts). A pure function
    of its arguments, memoised per process (every client of a stream reads the same adverts)."""
    items = tuple(adverts.items()) if isinstance(adverts, dict) else tuple((None, a) for a in adverts)
    keys, rejected = _read_adverts(items, run, tuple(sorted(public_keys.items())), bool(check_keys))
    return dict(keys), list(rejected)


@functools.lru_cache(maxsize=8)
def _read_adverts(items: tuple, run: str, public_keys: tuple, check_keys: bool) -> tuple[dict, tuple]:
    keys, rejected, owner = {}, [], {}       # owner: key -> the client that advertised it
    public_keys = dict(public_keys)
    for sender, data in items:
        try:
            msg = open_message(data, "key", run, 0, public_keys, sender)
        except MaskRejection as exc:
            rejected.append(exc.rejection)
            continue
        try:
            if check_keys or len(msg.payload) != 32:
                check_agreement_key(msg.payload)
        except ValueError as exc:
            rejected.append(Rejection(msg.client, "key", f"unusable X25519 key: {exc}"))
            continue
        twin = owner.get(msg.payload)
        if msg.client in keys or twin is not None:
            rejected.append(Rejection(msg.client, "key", "a second advert" if msg.client in keys
                                      else f"advertises the same key as {twin}"))
            continue
        keys[msg.client], owner[msg.payload] = msg.payload, msg.client
    return keys, tuple(rejected)

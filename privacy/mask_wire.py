"""Signed binary messages of the mask protocol, and the record of a rejected one.

A message is ``len(header) (2 bytes) | header | payload | Ed25519 signature (64 bytes)``. The
header is canonical JSON ``{type, run, round, client, answers}``; the signature covers the header
plus the SHA-256 of the payload (:func:`carbonfed.privacy.signing.sign`, typed
``carbonfed-mask-<kind>``), so the payload stays binary and compact.

Guarantees
----------
* :func:`open_message` returns a message only if it parses, is of the expected kind, is signed by
  the key of the client it names, came from that client when the transport says who sent it, and
  belongs to this run and round and answers this request (``answers``: the digest of the list it
  answers). Otherwise it raises :class:`MaskRejection` naming the client to blame and why: a
  forged name ("claims to be"), a replay (another run or round), a corrupt message.
* Bitmaps (:func:`bitmap`, :func:`from_bitmap`) say which of a known, sorted list of names a
  payload answers, so a reply carries no names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from carbonfed.privacy.signing import canonical, sign, signature_valid_over

SIGNATURE_BYTES = 64
KINDS = ("key", "bundle", "seeds", "keys")


@dataclass(frozen=True)
class Rejection:
    """A message or a client the protocol refused: who, at which step, why."""

    client: str
    step: str
    reason: str

    def as_dict(self) -> dict:
        return {"client": self.client, "step": self.step, "reason": self.reason}


class MaskRejection(ValueError):
    def __init__(self, client: str, step: str, reason: str):
        super().__init__(f"{step}: {client}: {reason}")
        self.rejection = Rejection(client, step, reason)


@dataclass(frozen=True)
class Message:
    kind: str
    run: str
    round: int
    client: str
    answers: str
    payload: bytes


def names_digest(names) -> str:
    """What a reply answers: SHA-256 of the sorted list of names the request carried."""
    return hashlib.sha256(canonical(sorted(names))).hexdigest()[:32]


def _signed(header: dict, payload: bytes) -> dict:
    return {**header, "payload": hashlib.sha256(payload).hexdigest()}


def seal(key: Ed25519PrivateKey, kind: str, run: str, rnd: int, client: str, payload: bytes,
         answers: str = "") -> bytes:
    if kind not in KINDS:
        raise ValueError(f"unknown message kind {kind!r}")
    header = {"type": f"carbonfed-mask-{kind}", "run": run, "round": int(rnd), "client": client,
              "answers": answers}
    head = canonical(header)
    return len(head).to_bytes(2, "little") + head + payload + bytes.fromhex(sign(key, _signed(header, payload)))


def _parse(data: bytes, step: str, sender: str | None) -> tuple[dict, bytes, bytes]:
    blame = sender or "?"
    if len(data) < 2 + SIGNATURE_BYTES:
        raise MaskRejection(blame, step, "message too short")
    n = int.from_bytes(data[:2], "little")
    if 2 + n + SIGNATURE_BYTES > len(data):
        raise MaskRejection(blame, step, "message header overruns it")
    try:
        header = json.loads(data[2:2 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MaskRejection(blame, step, "message header is not JSON") from None
    if not (isinstance(header, dict) and set(header) == {"type", "run", "round", "client", "answers"}
            and isinstance(header["client"], str) and isinstance(header["round"], int)):
        raise MaskRejection(blame, step, "message header malformed")
    return header, bytes(data[2 + n:-SIGNATURE_BYTES]), bytes(data[-SIGNATURE_BYTES:])


def read_unchecked(data: bytes) -> Message:
    """A message's header and payload, *not* checked (its sender re-sealing its own message in a drill)."""
    header, payload, _ = _parse(bytes(data), "?", None)
    return Message(header["type"].removeprefix("carbonfed-mask-"), header["run"], header["round"], header["client"],
                   header["answers"], payload)


def open_message(data: bytes, kind: str, run: str, rnd: int, public_keys: dict[str, str],
                 sender: str | None = None, answers: str = "") -> Message:
    """Check ``data`` (see the module docstring) and return its content."""
    step = kind
    header, payload, signature = _parse(bytes(data), step, sender)
    claimed = header["client"]
    if claimed not in public_keys:
        raise MaskRejection(sender or claimed, step, f"names {claimed!r}, who is not on the roster")
    if not signature_valid_over(public_keys[claimed], canonical(_signed(header, payload)), signature.hex()):
        raise MaskRejection(sender or claimed, step,
                            f"claims to be {claimed} but is not signed by {claimed}'s key")
    if sender is not None and sender != claimed:
        raise MaskRejection(sender, step, f"sent by {sender} but claims to be {claimed}")
    if header["type"] != f"carbonfed-mask-{kind}":
        raise MaskRejection(claimed, step, f"a {header['type']} message where a {kind} message was due")
    if header["run"] != run or header["round"] != rnd:
        raise MaskRejection(claimed, step, f"replayed: made for run {header['run']!r} round {header['round']}, "
                                           f"this is run {run!r} round {rnd}")
    if header["answers"] != answers:
        raise MaskRejection(claimed, step, "answers another request (the lists it was sent differ)")
    return Message(kind, run, rnd, claimed, answers, payload)


def bitmap(flags: list[bool]) -> bytes:
    out = bytearray((len(flags) + 7) // 8)
    for i, f in enumerate(flags):
        if f:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def from_bitmap(data: bytes, n: int) -> list[bool]:
    if len(data) != (n + 7) // 8:
        raise ValueError("bitmap of the wrong length")
    flags = [bool(data[i // 8] >> (i % 8) & 1) for i in range(n)]
    if any(data[i // 8] >> (i % 8) & 1 for i in range(n, 8 * len(data))):
        raise ValueError("bitmap has bits past its list")
    return flags

"""What the server and the clients both speak: message types, ciphertexts in records, stage names.

Both sides import these names from here (the server from :mod:`carbonfed.federation.server`, the
clients from :mod:`carbonfed.federation.client`), so that neither side imports the other.

Guarantees
----------
* :func:`record_bytes` gives back exactly the bytes :func:`bytes_record` was given, and refuses
  (:class:`~carbonfed.privacy.he.CiphertextError`) a record that is anything but one array
  ``payload`` of the expected type: a ciphertext is never read as plaintext or the reverse.
* :func:`stage_key` is the one name of statistics stage k, as a record of a message and as the
  file of its aggregate (``aggregates/<stage_key>.bin``), on both sides.
* :func:`gone` is the only place that reads a Flower error code (an internal of Flower 1.42.0).
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Message

from carbonfed.federation.flower_compat import node_unavailable
from carbonfed.privacy.he import CiphertextError

# The message types of carbonfed's own requests (the ClientApp registers them as
# ``@app.query("setup")`` and so on); training and evaluation use Flower's MessageType.
SETUP = "query.setup"     # round 0: role, country, key fingerprint and the stage-1 statistics
REFINE = "query.refine"   # round 0: statistics stage 2 or 3 (DP runs of more stages)
ROLE = "query.role"       # a resumed server asks a node who it is (no data, no budget)
CLOSE = "query.close"     # after the last round: each client signs its final history (carbonfed.privacy.statements)
MASKS = "query.masks"     # the mask protocol's steps (issue 22): config "mask-step" = advert, share, seeds, unmask
MASK_STEPS = ("advert", "share", "seeds", "unmask")


def bytes_record(data: bytes, stype: str) -> ArrayRecord:
    """Carry opaque bytes (a ciphertext) in an ArrayRecord, which Flower chunks in transit."""
    return ArrayRecord({"payload": Array(dtype="bytes", shape=(len(data),), stype=stype, data=data)})


def record_bytes(record: ArrayRecord, stype: str) -> bytes:
    """The bytes :func:`bytes_record` packed; raises CiphertextError unless the record is one
    array ``payload`` of type ``stype`` (a mismatch means HE is on on one side only)."""
    if list(record.keys()) != ["payload"]:
        raise CiphertextError(f"expected one array 'payload', got {list(record.keys())}")
    arr = record["payload"]
    if arr.stype != stype:
        raise CiphertextError(f"payload is of type {arr.stype!r}, expected {stype!r} (HE on one side only?)")
    return bytes(arr.data)


def stage_key(stage: int) -> str:
    """The record (and aggregate file) name of statistics stage ``stage``: stats, stats2, stats3."""
    return "stats" if stage == 1 else f"stats{stage}"


def gone(msg: Message) -> bool:
    """An error reply made by the SuperLink because the node is gone (no heartbeat); the Flower
    internal it needs lives in :mod:`carbonfed.federation.flower_compat`."""
    return node_unavailable(msg)

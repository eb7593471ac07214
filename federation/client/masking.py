"""A training client's part of the mask protocol (issue 22) over Flower messages.

:class:`~carbonfed.privacy.mask_client.MaskingClient` does the cryptography; this module rebuilds
it at every message from what a deployed client keeps (nothing in memory):

* its secrets are derived from its Ed25519 signing key and the run (the charter's SHA-256):
  :func:`~carbonfed.privacy.mask_client.mask_root`; a bundle asked twice is the same bytes;
* its durable state (``state["masks"]``, written with the participant's state) holds the
  neighbours' X25519 keys it checked (once per run) and what it was told and revealed in its
  latest round (:meth:`~carbonfed.privacy.mask_client.MaskingClient.round_state`).

Steps (run config ``mask-step`` of a ``query.masks`` request, :data:`~carbonfed.federation.wire.MASK_STEPS`):
``advert`` (its signed X25519 key), ``share`` (the server's accepted adverts in, the bundle of round
``mask-round`` out), ``seeds`` (the pair seeds of dropped neighbours of round ``mask-round``), and
``unmask`` (the share keys of round ``mask-round`` for the summed clients ``mask-summed``, and in the
same reply the bundle of round ``mask-next`` unless it is 0). A training request carries
``mask-shared``: the clients whose bundles the server accepted; :func:`arm` makes the participant mask
its update with them.

Guarantees
----------
* Every rule of :class:`~carbonfed.privacy.mask_client.MaskingClient` holds across messages and
  restarts: the round state is written (by the ClientApp, once per message) before the reply that
  reveals anything leaves.
* A refused step is answered ``mask-refused`` with the reason (never an unmasked upload): a
  training request this client cannot mask is refused before anything is charged (:func:`arm`).
* With an empty ``fault-drill`` nothing here changes a message; the drills :data:`MASK_FAULTS`
  (once :mod:`carbonfed.federation.faults` lists them) make this client misbehave on purpose.
"""

from __future__ import annotations

import json


from carbonfed.federation.wire import mask_plan, mask_roster
from carbonfed.privacy.mask_client import MaskingClient, MaskRefusal, mask_root, read_adverts
from carbonfed.privacy.mask_wire import read_unchecked, seal

STATE_KEY = "masks"
__all__ = ["MaskRefusal", "answer", "arm", "masking_client"]


def masking_client(p) -> MaskingClient:
    """Participant ``p``'s masking client as its durable state leaves it."""
    signer = p.signer
    if signer is None:
        raise MaskRefusal("masks need the run's charter and this client's signing key")
    run, roster = signer.charter.sha256, mask_roster(signer.charter)
    if p.country not in roster:
        raise MaskRefusal(f"{p.country} is not a training client of the charter: it masks nothing")
    root = mask_root(signer.key, run, p.country)
    mc = MaskingClient(p.country, signer.key, run, roster, mask_plan(p.cfg, signer.charter), signer.modulus, root=root)
    saved = p.state.get(STATE_KEY) or {}
    mc.use_pair_keys(_pair_keys(mc, root, tuple(sorted(saved.get("peers", {}).items()))))
    if saved.get("round"):
        mc.restore(saved["round"])
    return mc


_PAIR_KEYS: dict[tuple, dict[str, bytes]] = {}


def _pair_keys(mc: MaskingClient, root: bytes, peers: tuple) -> dict[str, bytes]:
    """The pair keys with ``peers`` (a pure function of this client's ``root`` and their keys),
    memoised per process: a simulation worker serves many nodes; a deployed client only saves time."""
    key = (root, peers)
    if key not in _PAIR_KEYS:
        if len(_PAIR_KEYS) >= 512:
            _PAIR_KEYS.clear()
        _PAIR_KEYS[key] = mc.use_peer_keys({c: bytes.fromhex(k) for c, k in peers})
    return _PAIR_KEYS[key]


def _save(p, mc: MaskingClient, peers: dict | None = None) -> None:
    """Set the mask state without writing it: the ClientApp writes the state before any reply
    leaves (:func:`~carbonfed.federation.client.state.save_state`), so what a reply reveals is on
    disk before it is sent, with one write per message."""
    saved = dict(p.state.get(STATE_KEY) or {})
    if peers is not None:
        saved["peers"] = peers
    saved["round"] = mc.round_state()
    dict.__setitem__(p.state, STATE_KEY, saved)


def _share(p, mc: MaskingClient, config: dict) -> dict:
    charter = p.signer.charter
    adverts = dict(zip(json.loads(config["mask-senders"]), config["mask-adverts"]))
    keys, _ = read_adverts(adverts, charter.sha256, charter.keys)
    mc.use_peer_keys(keys)
    bundle = mc.share(int(config["mask-round"]))
    _save(p, mc, {c: k.hex() for c, k in keys.items() if c in mc.neighbours})
    return {"mask-bundle": bundle}


def _unmask(p, mc: MaskingClient, config: dict) -> dict:
    out, rnd, nxt, why = {}, int(config["mask-round"]), int(config.get("mask-next", 0)), []
    try:
        if "mask-summed" in config and mc.round_state().get("round") == rnd:    # it shared round rnd
            out["mask-keys"] = mc.reveal_keys(rnd, json.loads(config["mask-summed"]))
            _save(p, mc)                      # written before the keys leave (with the reply)
    except MaskRefusal as exc:
        why.append(f"keys: {exc}")
    try:
        if nxt:
            out["mask-bundle"] = mc.share(nxt)
            _save(p, mc)
    except MaskRefusal as exc:
        why.append(f"bundle: {exc}")
    return {**out, "mask-refused": "; ".join(why)} if why else out


MASK_FAULTS = ("mask-impostor", "mask-bad-key", "mask-replay")


def _drill(p, out: dict) -> dict:
    """Fault drills (``fault-drill``, :mod:`carbonfed.federation.faults`): a bundle that claims another
    client's name, share keys that open nothing, a keys message replayed from the round before.
    Each message stays signed with this client's own key, as a misbehaving client would send it."""
    charter = p.signer.charter
    for field, kind in (("mask-bundle", "bundle"), ("mask-keys", "keys")):
        if field not in out:
            continue
        msg = read_unchecked(out[field])
        client, rnd, payload = msg.client, msg.round, msg.payload
        if p.fault == "mask-impostor" and kind == "bundle":
            client = next(c for c in mask_roster(charter) if c != p.country)
        elif p.fault == "mask-bad-key" and kind == "keys" and payload:
            payload = payload[:-1] + bytes([payload[-1] ^ 0xFF])
        elif p.fault == "mask-replay" and kind == "keys":
            rnd -= 1
        else:
            continue
        out[field] = seal(p.signer.key, kind, charter.sha256, rnd, client, payload, msg.answers)
    return out


def answer(p, config: dict) -> dict:
    """The reply metadata of one ``query.masks`` step (see the module docstring)."""
    out = _answer(p, config)
    return _drill(p, out) if getattr(p, "fault", "") in MASK_FAULTS else out


def _answer(p, config: dict) -> dict:
    step = config.get("mask-step")
    try:
        mc = masking_client(p)
        if step == "advert":
            return {"mask-advert": mc.advert()}
        if step == "share":
            return _share(p, mc, config)
        if step == "seeds":
            seeds = mc.reveal_seeds(int(config["mask-round"]), json.loads(config["mask-summed"]))
            _save(p, mc)
            return {"mask-seeds": seeds}
        if step == "unmask":
            return _unmask(p, mc, config)
        raise MaskRefusal(f"unknown mask step {step!r}")
    except (MaskRefusal, ValueError, KeyError) as exc:
        return {"mask-refused": f"{type(exc).__name__}: {exc}"}


def arm(p, config: dict, rnd: int) -> str:
    """Make participant ``p`` mask its round-``rnd`` update with the clients of the request's
    ``mask-shared``; the list's JSON ("" when the run has no masks). Raises MaskRefusal before
    anything is charged if this client cannot mask that round."""
    if not p.cfg.masked:
        return ""
    if "mask-shared" not in config:
        raise MaskRefusal("the request names no clients that shared masks this round: an unmasked upload "
                          "would expose this client's update to the server and one key holder")
    shared = json.loads(config["mask-shared"])
    mc = masking_client(p)
    mc.agree(rnd, shared)                    # refuses now, before the round is charged
    _save(p, mc)
    p.masker = lambda vec, r: mc.mask(r, vec, shared)
    return json.dumps(shared)

"""A client's part of the mask protocol (issue 22) over Flower messages.

:class:`~carbonfed.privacy.mask_client.MaskingClient` does the cryptography; this module rebuilds
it at every message from what a deployed client keeps (nothing in memory):

* its secrets are derived from its Ed25519 signing key and the run (the charter's SHA-256, and the stream):
  :func:`~carbonfed.privacy.mask_client.mask_root`; a bundle asked twice is the same bytes;
* its durable state (``state["masks"]``, written with the participant's state) holds what it was
  told and revealed in its kept rounds (:meth:`~carbonfed.privacy.mask_client.MaskingClient.round_state`)
  and the SHA-256 of the neighbours' X25519 keys it checked (once per run), which lie in a file beside
  the state file (``<state>.masks-peers.json``; in the state itself when there is no state file).

Steps (run config ``mask-step`` of a ``query.masks`` request, :data:`~carbonfed.federation.wire.MASK_STEPS`):
``advert`` (its signed X25519 key), ``share`` (the server's accepted adverts in, the bundle of round
``mask-round`` out), ``seeds`` (the pair seeds of dropped neighbours of round ``mask-round``), and
``unmask`` (with ``mask-summed``, sent to the share-key holders the server picks: the share keys of
round ``mask-round`` for those summed clients; with ``mask-next``: the bundle of that round). A training request carries
``mask-shared``: the clients whose bundles the server accepted; :func:`arm` makes the participant mask
its update with them. An upload request (training, evaluation) may also carry ``mask-next``: the reply
then carries this client's bundle of that round (:func:`ahead`), so that the ``unmask`` exchange need go
only to the share-key holders the server picks, not to every client.

Streams (:mod:`carbonfed.privacy.mask_streams`; ``mask-stream`` of a ``query.masks`` request, default
``update``): the statistics releases (``stats``, round = stage) and the held-out clients' evaluation
counts (``metrics``) are masked the same way, each stream with its own keys, its own durable state
(``state["masks"]``, ``state["masks-stats"]``, ``state["masks-metrics"]``) and its own rounds;
:func:`arm_upload` arms the setup, ``query.refine`` and evaluation requests as :func:`arm` arms training.

Guarantees
----------
* Every rule of :class:`~carbonfed.privacy.mask_client.MaskingClient` holds across messages and
  restarts: the round state is written (by the ClientApp, once per message) before the reply that
  reveals anything leaves.
* A refused step is answered ``mask-refused`` with the reason (never an unmasked upload): a
  training request this client cannot mask is refused before anything is charged (:func:`arm`).
* A masked run never sends an unmasked statistics release or evaluation: without ``mask-shared``
  in the request (or naming a list this client cannot mask with) :func:`arm_upload` refuses before
  anything is charged. A stream of fewer than two clients is not masked (on both sides).
* With an empty ``fault-drill`` nothing here changes a message; the drills :data:`MASK_FAULTS`
  make this client misbehave on purpose (in the ``update`` stream).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from flwr.app import Message

from carbonfed.federation.durable import atomic_write
from carbonfed.privacy.mask_client import KEPT, MaskingClient, MaskRefusal, mask_root
from carbonfed.privacy.mask_adverts import read_adverts
from carbonfed.privacy.mask_streams import stream_of, stream_plan, stream_role, stream_roster, stream_run
from carbonfed.privacy.mask_wire import read_unchecked, seal

STATE_KEY = "masks"
__all__ = ["MaskRefusal", "ahead", "answer", "apply", "arm", "arm_upload", "masking_client"]


def state_key(stream: str) -> str:
    """Where a stream's durable mask state lives in the participant's state."""
    return STATE_KEY if stream == "update" else f"{STATE_KEY}-{stream}"


def masking_client(p, stream: str = "update") -> MaskingClient:
    """Participant ``p``'s masking client of ``stream`` as its durable state leaves it."""
    signer = p.signer
    if signer is None:
        raise MaskRefusal("masks need the run's charter and this client's signing key")
    run, roster = stream_run(signer.charter.sha256, stream), stream_roster(signer.charter, stream)
    if p.country not in roster:
        raise MaskRefusal(f"{p.country} is not a {stream_role(stream)} client of the charter: it masks no {stream}")
    plan = stream_plan(p.cfg, signer.charter, stream)
    if plan is None:
        raise MaskRefusal(f"the {stream} stream has one client: nothing to mask its upload among")
    root = mask_root(signer.key, run, p.country)
    keep = p.cfg.stats_releases if stream == "stats" else KEPT    # the setup's stages: all of them (a restart)
    mc = MaskingClient(p.country, signer.key, run, roster, plan, signer.modulus, root=root, keep=keep)
    saved = p.state.get(state_key(stream)) or {}
    peers = _peers_id(saved)
    if "peers-sha256" in saved:             # checked once, kept beside the state (written once per run)
        mc.use_pair_keys(_pair_keys(mc, root, peers, lambda: _read_peers(_peers_file(p, stream), peers)))
    else:
        mc.use_pair_keys(_pair_keys(mc, root, peers, lambda: dict(peers)))
    if saved.get("round"):
        mc.restore(saved["round"])
    return mc


_PAIR_KEYS: dict[tuple, dict[str, bytes]] = {}


def _peers_id(saved: dict):
    """What names the neighbours' keys a stream's saved state holds: their file's SHA-256, or the keys."""
    return saved["peers-sha256"] if "peers-sha256" in saved else tuple(sorted(saved.get("peers", {}).items()))


def _pair_keys(mc: MaskingClient, root: bytes, peers, load) -> dict[str, bytes]:
    """The pair keys with the neighbours' keys ``load()`` returns (``peers`` names them: the keys, or
    their file's SHA-256), a pure function of this client's ``root`` and those keys, memoised per
    process: a simulation worker serves many nodes; a deployed client only saves time."""
    if not peers:
        return {}
    if (root, peers) not in _PAIR_KEYS:
        _remember_pair_keys(root, peers, mc.use_peer_keys({c: bytes.fromhex(k) for c, k in load().items()}))
    return _PAIR_KEYS[(root, peers)]


def _remember_pair_keys(root: bytes, peers, pair_keys: dict[str, bytes]) -> None:
    """Memoise pair keys just derived from the keys ``peers`` names (see :func:`_pair_keys`)."""
    while len(_PAIR_KEYS) >= 1024:           # the oldest first: 3 streams of 164 nodes fit
        _PAIR_KEYS.pop(next(iter(_PAIR_KEYS)))
    _PAIR_KEYS[(root, peers)] = dict(pair_keys)


def _peers_file(p, stream: str) -> Path | None:
    """Beside the state file: the neighbours' X25519 keys this client checked (None: no state file)."""
    path = getattr(p.state, "path", None)
    return None if path is None else path.with_name(f"{path.stem}.{state_key(stream)}-peers.json")


def _read_peers(path: Path | None, digest: str) -> dict[str, str]:
    data = path.read_bytes() if path is not None and path.exists() else b""
    if hashlib.sha256(data).hexdigest() != digest:
        raise MaskRefusal(f"the neighbours' keys this client checked are lost or changed ({path}): it cannot mask")
    return json.loads(data)


def _save(p, mc: MaskingClient, peers: dict | None = None, stream: str = "update") -> None:
    """Set the mask state without writing it: the ClientApp writes the state before any reply
    leaves (:func:`~carbonfed.federation.client.state.save_state`), so what a reply reveals is on
    disk before it is sent, with one write per message."""
    saved = dict(p.state.get(state_key(stream)) or {})
    path = _peers_file(p, stream)
    if peers is not None and path is None:
        saved["peers"] = peers
    elif peers is not None:                 # 13 kB for 130 neighbours: not re-encoded at every message
        data = json.dumps(peers, sort_keys=True).encode()
        digest = hashlib.sha256(data).hexdigest()
        if saved.get("peers-sha256") != digest:
            atomic_write(path, data)
        saved.pop("peers", None)
        saved["peers-sha256"] = digest
    saved["round"] = mc.round_state()
    dict.__setitem__(p.state, state_key(stream), saved)


def _share(p, mc: MaskingClient, config: dict, stream: str) -> dict:
    charter = p.signer.charter
    adverts = dict(zip(json.loads(config["mask-senders"]), config["mask-adverts"]))
    keys, _ = read_adverts(adverts, mc.run, charter.keys)
    pair_keys = mc.use_peer_keys(keys)
    bundle = mc.share(int(config["mask-round"]))
    peers = {c: k.hex() for c, k in keys.items() if c in mc.neighbours}
    _save(p, mc, peers, stream)
    # what masking_client derives from the saved keys at the next message: derived once, here
    _remember_pair_keys(mc.root, _peers_id(p.state[state_key(stream)]), {c: pair_keys[c] for c in peers})
    return {"mask-bundle": bundle}


def _unmask(p, mc: MaskingClient, config: dict, stream: str) -> dict:
    out, rnd, nxt, why = {}, int(config["mask-round"]), int(config.get("mask-next", 0)), []
    try:
        if "mask-summed" in config and mc.may_hold(rnd):     # it shared round rnd, or missed its sharing
            out["mask-keys"] = mc.reveal_keys(rnd, json.loads(config["mask-summed"]))
            _save(p, mc, stream=stream)       # written before the keys leave (with the reply)
    except MaskRefusal as exc:
        why.append(f"keys: {exc}")
    try:
        if nxt:
            out["mask-bundle"] = mc.share(nxt)
            _save(p, mc, stream=stream)
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
            client = next(c for c in stream_roster(charter, "update") if c != p.country)
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
    stream = str(config.get("mask-stream", "update"))
    out = _answer(p, config, stream)
    return _drill(p, out) if stream == "update" and getattr(p, "fault", "") in MASK_FAULTS else out


def _answer(p, config: dict, stream: str) -> dict:
    step = config.get("mask-step")
    try:
        mc = masking_client(p, stream)
        if step == "advert":
            return {"mask-advert": mc.advert()}
        if step == "share":
            return _share(p, mc, config, stream)
        if step == "seeds":
            seeds = mc.reveal_seeds(int(config["mask-round"]), json.loads(config["mask-summed"]))
            _save(p, mc, stream=stream)
            return {"mask-seeds": seeds}
        if step == "unmask":
            return _unmask(p, mc, config, stream)
        raise MaskRefusal(f"unknown mask step {step!r}")
    except (MaskRefusal, ValueError, KeyError) as exc:
        return {"mask-refused": f"{type(exc).__name__}: {exc}"}


def _armed(p, config, stream: str, rnd: int, what: str) -> tuple[list[str], MaskingClient]:
    """The request's ``mask-shared`` list, checked by ``p``'s masking client of ``stream`` for its
    round ``rnd`` (and recorded in the state); raises MaskRefusal before anything is charged."""
    if "mask-shared" not in config:
        raise MaskRefusal(f"the request names no clients that shared masks this round: an unmasked upload "
                          f"would expose this client's {what} to the server and one key holder")
    shared = json.loads(config["mask-shared"])
    mc = masking_client(p, stream)
    mc.agree(rnd, shared)                    # refuses now, before the round is charged
    _save(p, mc, stream=stream)
    return shared, mc


def arm(p, config: dict, rnd: int) -> str:
    """Make participant ``p`` mask its round-``rnd`` update with the clients of the request's
    ``mask-shared``; the list's JSON ("" when the run has no masks). Raises MaskRefusal before
    anything is charged if this client cannot mask that round."""
    if not p.cfg.masked:
        return ""
    shared, mc = _armed(p, config, "update", rnd, "update")
    p.maskers["update"] = _masker(mc, rnd, shared)
    return json.dumps(shared)


def _masker(mc: MaskingClient, rnd: int, shared: list[str]):
    """``vec`` -> ``vec`` masked for round ``rnd``; the masking client rides along (:func:`ahead` reuses it)."""
    def masker(vec):
        return mc.mask(rnd, vec, shared)
    masker.client = mc
    return masker


def arm_upload(p, request: Message | dict, kind: str, rnd: int) -> tuple[str, ...]:
    """Make participant ``p`` mask its ``kind`` upload (``stats``, ``stats2``, ``stats3``: ``rnd`` is
    the stage; ``metrics``: the round) of ``request`` (a message, or its run config) with the
    clients of its ``mask-shared``.
    Returns what a reply cache key must add (the list's JSON; nothing when this upload is not
    masked: masks off, a client of the other role, a stream of one client). Raises MaskRefusal
    before anything is charged if this client cannot mask it."""
    stream = stream_of(kind)
    if not (p.cfg.masked and p.signer is not None and p.role == stream_role(stream)
            and stream_plan(p.cfg, p.signer.charter, stream) is not None):
        return ()
    config = request.content.config_records["config"] if isinstance(request, Message) else request
    shared, mc = _armed(p, config, stream, rnd, "statistics" if stream == "stats" else "evaluation counts")
    p.maskers[kind] = _masker(mc, rnd, shared)
    return (json.dumps(shared),)


def ahead(p, config: dict, stream: str) -> dict:
    """The reply metadata that carries the bundle of round ``mask-next`` on an upload of ``stream``
    (``{}``: none asked, masks off, not a client of the stream, or a bundle this client will not make:
    the server then asks for it in the ``unmask`` exchange, where the refusal is answered).
    Call it after :func:`arm` / :func:`arm_upload`: the state it leaves records both rounds."""
    nxt = int(config.get("mask-next", 0) or 0)
    if not (nxt and p.cfg.masked and p.signer is not None and p.role == stream_role(stream)):
        return {}
    try:
        mc = getattr(p.maskers.get(stream), "client", None) or masking_client(p, stream)
        bundle = mc.share(nxt)
    except (MaskRefusal, ValueError, KeyError):     # as :func:`answer`: the unmask exchange asks again
        return {}
    _save(p, mc, stream=stream)       # written with the reply, before the bundle leaves
    return {"mask-bundle": bundle}


def apply(p, vec, kind: str):
    """``vec`` (a tagged ``kind`` upload) masked as :func:`arm` / :func:`arm_upload` set up for this
    message; unchanged when they did not (masks off, or not this kind)."""
    masker = p.maskers.get(kind)
    return vec if masker is None else masker(vec)

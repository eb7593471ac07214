"""The client side of the mask protocol (:mod:`carbonfed.privacy.masks` explains it).

Per run: :meth:`MaskingClient.advert` (signed X25519 public key), then
:meth:`MaskingClient.accept_adverts` with everyone's adverts. Per round ``r``:

1. :meth:`share` -> bundle: self-mask commitment, and for each neighbour the AES-GCM encrypted
   Shamir share of the self-mask secret plus the commitment to the pair seed;
2. :meth:`mask` (given ``U``, the clients whose bundles the server accepted) -> masked vector to
   encrypt and upload;
3. recovery: :meth:`reveal_seeds` (given ``S``, the summed clients) -> the pair seeds of dropped
   neighbours; :meth:`reveal_keys` (given the final ``S``) -> the share keys of summed neighbours.

Guarantees
----------
* A fresh self-mask secret every round; a round number never goes back. The bundle of round
  ``r + 1`` may be made before round ``r`` is unmasked (it rides on the round-``r`` upload): the two
  latest rounds are kept (``keep``: more), each with its own record, and a bundle is made again only
  for a kept round (derived: the very same bytes; a server restarted in the middle of a round, or of
  the statistics stages, whose stream keeps every stage, asks for it again).
* :meth:`mask` refuses (:class:`MaskRefusal`) unless this client and at least ``T`` of its
  neighbours are in ``U``; :meth:`reveal_seeds` unless this client and at least ``T`` neighbours
  are in ``S``.
* Never both for one neighbour in one round: the pair seed (seeds step) and the key of the share
  it dealt this client (keys step). The seeds step is refused once keys were revealed, a key is
  withheld for a neighbour whose seed was revealed, and ``S`` may only shrink between requests.
* A round this client did not share (it missed the sharing, say while it restarted) that comes
  after every round it made a bundle for: it still reveals the keys of the shares its neighbours
  dealt it (:meth:`MaskingClient.may_hold`), and from then on makes no bundle, mask or seeds reply
  for that round, nor a new bundle before it (nobody masked with it there: no seed of it is due).
* With a ``root`` (:func:`mask_root`, derived from the client's Ed25519 key; a deployed client keeps
  nothing in memory between messages) the agreement key and every round's self-mask secret and
  dealing are derived from it: a bundle asked again is the same bytes, and
  :meth:`MaskingClient.round_state` / :meth:`MaskingClient.restore` carry what the rule above needs
  (the lists it was told, the seeds and keys it revealed) through the client's durable state.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from carbonfed.privacy import shamir
from carbonfed.privacy.mask_adverts import read_adverts
from carbonfed.privacy.mask_wire import Rejection, bitmap, names_digest, seal
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from carbonfed.privacy.masks import (DOMAIN, MaskPlan, PairRound, agreement_public, commit, mask_sum,
                                     mask_vector, neighbourhoods, new_agreement_key, pair_key, pair_round,
                                     self_seed)
from carbonfed.privacy.signing import canonical

NONCE = b"\0" * 12        # every share key encrypts exactly one share
KEPT = 2                  # rounds a client keeps: the one being unmasked and the next (its bundle made)


def _hkdf(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=DOMAIN + info).derive(key)


def mask_root(signing_key: Ed25519PrivateKey, run: str, name: str) -> bytes:
    """The per-run root of a client's mask secrets: HKDF-SHA256 of its Ed25519 key's seed, bound
    to the run and the client (key separation: nothing derived from it is a signing key)."""
    seed = signing_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
    return _hkdf(seed, b"root/" + canonical([run, name]))


class MaskRefusal(RuntimeError):
    """A request this client will not answer (it would weaken its own or a neighbour's mask)."""


def _field(text: str | bytes) -> bytes:
    data = text if isinstance(text, bytes) else text.encode()
    return len(data).to_bytes(4, "little") + data


@functools.lru_cache(maxsize=64)
def _aad_head(run: str, rnd: int) -> bytes:
    return _field(b"carbonfed-mask-share") + _field(run) + _field(str(int(rnd)))


@functools.lru_cache(maxsize=4096)
def _name_field(name: str) -> bytes:
    return _field(name)


def share_aad(run: str, rnd: int, dealer: str, holder: str) -> bytes:
    """What a share's AES-GCM tag binds: run, round, dealer and holder (length-prefixed)."""
    return _aad_head(run, int(rnd)) + _name_field(dealer) + _name_field(holder)


@functools.lru_cache(maxsize=4096)
def _own_seed(root: bytes, rnd: int) -> bytes:
    """The self-mask seed of round ``rnd`` that :meth:`MaskingClient.share` draws from ``root``."""
    return self_seed(shamir.secret_bytes(shamir.new_secret(_self_draw(root, rnd))))


def _self_draw(root: bytes, rnd: int):
    return shamir.keyed_uniform(_hkdf(root, b"self/%d" % int(rnd)))


@functools.lru_cache(maxsize=1024)
def _bitmap_names(names: tuple[str, ...], bits_hex: str) -> frozenset[str]:
    """The names (sorted roster ``names``) whose bits are set in a hex bitmap (bit ``i``: ``names[i]``)."""
    bits = int(bits_hex, 16)
    return frozenset(names[i] for i in range(min(bits.bit_length(), len(names))) if bits >> i & 1)


class _Pairs(Mapping):
    """A restored round's :class:`PairRound` per holder, each made when asked (:func:`pair_round`
    is memoised): a client rebuilt at every message needs few of them for most messages."""

    def __init__(self, pair_keys: dict[str, bytes], holders: list[str], rnd: int):
        self._holders, self._rnd = tuple(holders), int(rnd)
        self._keys = {h: pair_keys[h] for h in self._holders}      # as they are now
        self._set = frozenset(self._holders)

    def __getitem__(self, holder: str) -> PairRound:
        if holder not in self._set:
            raise KeyError(holder)
        return pair_round(self._keys[holder], self._rnd)

    def __contains__(self, holder) -> bool:
        return holder in self._set

    def __iter__(self):
        return iter(self._holders)

    def __len__(self) -> int:
        return len(self._holders)


@dataclass
class _Round:
    rnd: int
    own_seed: bytes
    pairs: Mapping[str, PairRound]
    shared: set[str] = field(default_factory=set)
    seeds_revealed: set[str] = field(default_factory=set)
    summed: set[str] | None = None
    keys_revealed: bool = False
    holder: bool = False         # not shared by this client: it only revealed keys of its neighbours' shares


class MaskingClient:
    def __init__(self, name: str, signing_key: Ed25519PrivateKey, run: str, roster: list[str],
                 plan: MaskPlan, modulus: int, root: bytes | None = None, keep: int = KEPT):
        self.name, self.run, self.plan = name, run, plan
        self.keep = max(KEPT, int(keep))      # rounds kept (a stream of few rounds may keep them all)
        self.modulus = int(modulus)
        self._signing = signing_key
        self._root = root
        self.neighbours = neighbourhoods(roster, plan, run)[name]
        self._near = frozenset(self.neighbours)
        self._names_sorted = tuple(sorted(roster))
        self._xs = {c: i + 1 for i, c in enumerate(self._names_sorted)}
        self._agreement = (new_agreement_key() if root is None
                           else X25519PrivateKey.from_private_bytes(_hkdf(root, b"agreement")))
        self._pair_keys: dict[str, bytes] = {}
        self._rounds: dict[int, _Round] = {}       # the KEPT latest rounds this client made bundles for
        self._last_round = 0

    # -- per run ----------------------------------------------------------------------------------

    def advert(self) -> bytes:
        return seal(self._signing, "key", self.run, 0, self.name, agreement_public(self._agreement))

    def accept_adverts(self, adverts: list[bytes], public_keys: dict[str, str]) -> list[Rejection]:
        """Derive the pair keys with every neighbour whose advert checks; name the others."""
        keys, rejected = read_adverts(adverts, self.run, public_keys, check_keys=False)
        for peer, public in keys.items():
            if peer in self.neighbours:
                try:
                    self._pair_keys[peer] = pair_key(self._agreement, public, self.run, self.name, peer)
                except ValueError as exc:       # a low-order key: the server refuses it too
                    rejected.append(Rejection(peer, "key", f"unusable X25519 key: {exc}"))
        return rejected

    def use_peer_keys(self, keys: dict[str, bytes]) -> dict[str, bytes]:
        """Derive the pair keys from neighbours' X25519 keys checked before (:func:`read_adverts`);
        returns them (a caller may keep them for :meth:`use_pair_keys`)."""
        for peer, public in keys.items():
            if peer in self._near:
                self._pair_keys[peer] = pair_key(self._agreement, public, self.run, self.name, peer)
        return dict(self._pair_keys)

    def use_pair_keys(self, pair_keys: dict[str, bytes]) -> None:
        """Pair keys :meth:`use_peer_keys` derived for this very client before."""
        self._pair_keys.update({p: k for p, k in pair_keys.items() if p in self._near})

    @property
    def root(self) -> bytes | None:
        """The per-run root its secrets derive from (:func:`mask_root`; None: fresh random secrets)."""
        return self._root

    @property
    def holders(self) -> list[str]:
        return [c for c in self.neighbours if c in self._pair_keys]

    # -- per round --------------------------------------------------------------------------------

    def share(self, rnd: int) -> bytes:
        """Step 1: the bundle (see the module docstring)."""
        if rnd in self._rounds and self._rounds[rnd].holder:
            raise MaskRefusal(f"this client revealed share keys of round {rnd} as a holder: it makes no bundle for it")
        again = self._root is not None and (rnd == self._last_round or rnd in self._rounds)   # derived: same bytes
        if rnd <= self._last_round and not again:
            raise MaskRefusal(f"round {rnd} does not follow round {self._last_round}")
        holders = self.holders
        if len(holders) < self.plan.threshold:
            raise MaskRefusal(f"only {len(holders)} neighbours with keys, the threshold is {self.plan.threshold}")
        draw = None if self._root is None else self._draw(rnd)
        secret = shamir.new_secret(draw)
        own = self_seed(shamir.secret_bytes(secret))
        shares = shamir.split(secret, self.plan.threshold, [self._xs[h] for h in holders], draw)
        pairs = {h: pair_round(self._pair_keys[h], rnd) for h in holders}
        body = [commit(b"self", own), bitmap([c in pairs for c in self.neighbours])]
        plain = shamir.share_to_bytes(shares)             # row i: holder i's share, as share_to_bytes(shares[i])
        size = len(plain) // len(holders)
        for i, h in enumerate(holders):
            key = pairs[h].share_key(dealer_first=self.name < h)
            body.append(AESGCM(key).encrypt(NONCE, plain[i * size:(i + 1) * size], share_aad(self.run, rnd, self.name, h)))
            body.append(commit(b"pair", pairs[h].seed))
        self._keep(_Round(rnd, own, pairs))
        return seal(self._signing, "bundle", self.run, rnd, self.name, b"".join(body))

    def _draw(self, rnd: int):
        return _self_draw(self._root, rnd)

    def round_state(self) -> dict:
        """What this client must remember of its kept rounds (JSON): see :meth:`restore`."""
        return {"last": self._last_round, "rounds": [
            {"round": st.rnd, "shared": self._bits(st.shared), "seeds": sorted(st.seeds_revealed),
             "keys": st.keys_revealed, "summed": None if st.summed is None else self._bits(st.summed),
             **({"holder": True} if st.holder else {})}
            for _, st in sorted(self._rounds.items())]}

    def _bits(self, names: set[str]) -> str | list[str]:
        """A set of roster names as a hex bitmap over the sorted roster (a list if one is not on it)."""
        if not set(names) <= set(self._xs):
            return sorted(names)
        return format(sum(1 << (self._xs[c] - 1) for c in names), "x")

    def _names(self, saved: str | list[str]) -> set[str]:
        if isinstance(saved, list):
            return set(saved)
        return set(_bitmap_names(self._names_sorted, saved))

    def restore(self, saved: dict) -> None:
        """Take up the rounds :meth:`round_state` described (a client with a ``root`` and its pair keys)."""
        if self._root is None:
            raise MaskRefusal("only a client with a derived root can restore a round")
        for entry in saved.get("rounds", [saved] if saved.get("round") is not None else []):
            rnd = int(entry["round"])
            holder = bool(entry.get("holder"))
            own = b"" if holder else _own_seed(self._root, rnd)       # as share() drew it
            self._rounds[rnd] = st = _Round(rnd, own, _Pairs(self._pair_keys, self.holders, rnd), holder=holder)
            st.shared, st.seeds_revealed = self._names(entry["shared"]), set(entry["seeds"])
            st.keys_revealed = bool(entry["keys"])
            st.summed = None if entry["summed"] is None else self._names(entry["summed"])
        self._last_round = int(saved.get("last", 0))

    def has_round(self, rnd: int) -> bool:
        """Whether this client made (and keeps) a bundle for round ``rnd``."""
        return int(rnd) in self._rounds and not self._rounds[int(rnd)].holder

    def may_hold(self, rnd: int) -> bool:
        """Whether :meth:`reveal_keys` can answer for round ``rnd``: a round it shared and keeps, or one
        after every round it made a bundle for (it missed that round's sharing, say while it restarted:
        its neighbours still dealt it shares, which it opens as a holder only)."""
        return int(rnd) in self._rounds or int(rnd) > self._last_round

    def _state(self, rnd: int) -> _Round:
        if rnd not in self._rounds:
            raise MaskRefusal(f"no bundle was made for round {rnd}")
        if self._rounds[rnd].holder:
            raise MaskRefusal(f"round {rnd} was not shared by this client (it revealed share keys as a holder only)")
        return self._rounds[rnd]

    def _holder_round(self, rnd: int) -> _Round:
        """The record of a round this client did not share (:meth:`may_hold`): no self mask, no pair
        mask of its own; from now on it makes no bundle for that round, nor a new one before it."""
        if not self.may_hold(rnd):
            raise MaskRefusal(f"no bundle was made for round {rnd}")
        if rnd in self._rounds:
            return self._rounds[rnd]
        return self._keep(_Round(rnd, b"", _Pairs(self._pair_keys, self.holders, rnd), holder=True))

    def _keep(self, st: _Round) -> _Round:
        """The kept record of round ``st.rnd`` (``st`` unless one is kept already): the latest round
        so far is at least that one, and only the ``keep`` latest rounds are kept."""
        st = self._rounds.setdefault(st.rnd, st)
        self._last_round = max(self._last_round, st.rnd)
        self._rounds = {r: s for r, s in self._rounds.items() if r > self._last_round - self.keep}
        return st

    def mask(self, rnd: int, vector: np.ndarray, shared: list[str], purpose: int = 0) -> np.ndarray:
        """Step 2: ``vector`` plus the self mask and the pair masks with neighbours in ``shared``;
        every vector of the round (model update, counts, statistics) has its own ``purpose``."""
        st, peers = self._state(rnd), self.agree(rnd, shared)
        total = mask_sum(len(vector), self.modulus, st.own_seed, {h: st.pairs[h].seed for h in peers}, self.name,
                         purpose)
        return mask_vector(vector, total, self.modulus)

    def agree(self, rnd: int, shared: list[str]) -> list[str]:
        """The checks and the record of :meth:`mask` without the masks (a client refuses a round
        before anything is charged): the neighbours it masks against; refuses as :meth:`mask` does."""
        st = self._state(rnd)
        shared_set = set(shared)
        if st.shared and st.shared != shared_set:
            raise MaskRefusal("told another list of clients that shared this round")
        peers = [h for h in st.pairs if h in shared_set]
        if self.name not in shared or len(peers) < self.plan.threshold:
            raise MaskRefusal(f"{len(peers)} neighbours shared this round, the threshold is {self.plan.threshold}")
        st.shared = shared_set
        return peers

    def _check_summed(self, st: _Round, summed: list[str]) -> set[str]:
        s = set(summed)
        if self.name not in s:
            raise MaskRefusal("this client is not summed: it reveals nothing")
        if not s <= st.shared:
            raise MaskRefusal("the summed list names clients that did not share this round")
        if st.summed is not None and not s <= st.summed:
            raise MaskRefusal("the summed list grew since the last request")
        if len([h for h in st.pairs if h in s]) < self.plan.threshold:
            raise MaskRefusal(f"fewer than {self.plan.threshold} neighbours remain summed")
        return s

    def reveal_seeds(self, rnd: int, summed: list[str]) -> bytes:
        """Seeds step: the pair seeds with neighbours that shared but are not summed."""
        st = self._state(rnd)
        if st.keys_revealed:
            raise MaskRefusal("share keys were revealed this round: no seed is revealed after them")
        s = self._check_summed(st, summed)
        dropped = sorted(h for h in self.neighbours if h in st.shared and h not in s)
        flags = [h in st.pairs for h in dropped]
        st.summed, st.seeds_revealed = s, st.seeds_revealed | {h for h in dropped if h in st.pairs}
        payload = bitmap(flags) + b"".join(st.pairs[h].seed for h in dropped if h in st.pairs)
        return seal(self._signing, "seeds", self.run, rnd, self.name, payload, names_digest(summed))

    def reveal_keys(self, rnd: int, summed: list[str]) -> bytes:
        """Keys step: the key of the share each summed neighbour dealt this client (also for a round
        it did not share: :meth:`may_hold`)."""
        st = self._holder_round(rnd)
        s = set(summed)
        if st.summed is not None and not s <= st.summed:
            raise MaskRefusal("the summed list grew since the seeds step")
        dealers = sorted(h for h in self.neighbours if h in s)
        give = [h in st.pairs and h not in st.seeds_revealed for h in dealers]
        st.keys_revealed, st.summed = True, s
        payload = bitmap(give) + b"".join(st.pairs[h].share_key(dealer_first=h < self.name)
                                          for h, g in zip(dealers, give) if g)
        return seal(self._signing, "keys", self.run, rnd, self.name, payload, names_digest(summed))


"""The server side of the mask protocol: collect bundles, recover dropped clients' masks, and
compute the plaintext correction that unmasks the encrypted sum (:mod:`carbonfed.privacy.masks`).

One :class:`RoundRecovery` per round, in this order:

1. :meth:`~RoundRecovery.add_bundle` for each client's bundle; :meth:`~RoundRecovery.shared` is
   ``U``, sent to every client before it masks and uploads.
2. :meth:`~RoundRecovery.start_recovery` with the clients whose ciphertexts arrived: ``S``.
   Only the ciphertexts of :meth:`~RoundRecovery.summed` may be in the sum.
3. While :meth:`~RoundRecovery.seeds_due` names clients: send each ``summed()``, pass the replies
   to :meth:`~RoundRecovery.add_seeds`, and :meth:`~RoundRecovery.drop` those that do not answer
   (a dropped client's ciphertext must then leave the sum). A client that uploaded but is gone by
   now is thus left out, as if it had never sent.
4. :meth:`~RoundRecovery.start_keys`; send ``summed()`` to the holders :meth:`~RoundRecovery.pick_holders`
   names (enough for ``T`` shares of every summed client's self mask, not every client), pass replies
   to :meth:`~RoundRecovery.add_keys`, and ask more holders while :meth:`~RoundRecovery.pick_holders`
   names any (a holder that failed leaves a dealer short); then :meth:`~RoundRecovery.correction` and
   :func:`~carbonfed.privacy.masks.unmask_sum`.

Guarantees
----------
* A message is used only if :func:`~carbonfed.privacy.mask_wire.open_message` accepts it; every
  refused message or client is in :attr:`RoundRecovery.rejections` with its name and the reason:
  a forged identity, a replay (another round, or a self-mask seed committed in an earlier round),
  a pair seed that does not match its commitment, a share key that does not open the share, a
  missing reply. A client whose seeds reply is refused leaves ``S``; a refused share key only
  costs that share.
* The round goes on while every summed client keeps ``T`` summed neighbours and ``T`` valid shares
  of its self mask; otherwise :class:`RoundAbandoned` says why (also :meth:`~RoundRecovery.blocker`),
  and no correction is ever computed, so the sum cannot be unmasked.
* :meth:`~RoundRecovery.correction` checks every rebuilt self-mask seed against its dealer's
  commitment; the masked sum minus the correction is the sum of the summed clients' vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from carbonfed.privacy import shamir
from carbonfed.privacy.mask_client import NONCE, share_aad
from carbonfed.privacy.mask_wire import MaskRejection, Rejection, from_bitmap, names_digest, open_message
from carbonfed.privacy.masks import (COMMIT_BYTES, KEY_BYTES, SEED_BYTES, MaskPlan, commit, mask_sum,
                                     neighbourhoods, self_seed)

SHARE_CT_BYTES = shamir.SHARE_BYTES + 16     # AES-GCM tag


class RoundAbandoned(RuntimeError):
    """The round cannot be unmasked; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class _Bundle:
    own_commit: bytes
    entries: dict[str, tuple[bytes, bytes]]     # holder -> (share ciphertext, pair-seed commitment)


class RoundRecovery:
    """One round's recovery. ``members``: the clients whose key adverts the server accepted for
    the run (:func:`~carbonfed.privacy.mask_adverts.read_adverts`, once per run); ``seen_commits``:
    the run's self-mask commitments so far (shared by the rounds, to refuse a replayed seed)."""

    def __init__(self, plan: MaskPlan, run: str, rnd: int, roster: list[str], public_keys: dict[str, str],
                 members, modulus: int, seen_commits: set[bytes] | None = None):
        self.plan, self.run, self.rnd = plan, run, int(rnd)
        self.modulus = int(modulus)
        self.public_keys = public_keys
        self.graph = neighbourhoods(roster, plan, run)
        self._xs = {c: i + 1 for i, c in enumerate(sorted(roster))}
        self.rejections: list[Rejection] = []
        self.members = set(members) & set(self.graph)
        self.seen_commits = seen_commits if seen_commits is not None else set()
        self.bundles: dict[str, _Bundle] = {}
        self._summed: set[str] | None = None
        self._seeds: dict[tuple[str, str], bytes] = {}
        self._shares: dict[str, dict[int, np.ndarray]] = {}
        self._key_replies: set[str] = set()
        self._keys_asked: set[str] | None = None    # None: every holder is asked (no pick_holders)
        self._confirmed: set[str] = set()
        self._phase, self._liveness = "bundles", True
        self._abandoned: str | None = None
        self._unmasking: tuple[dict, dict] | None = None

    def _reject(self, client: str, step: str, reason: str) -> None:
        self.rejections.append(Rejection(client, step, reason))

    def _open(self, data: bytes, kind: str, sender: str | None, answers: str = ""):
        try:
            return open_message(data, kind, self.run, self.rnd, self.public_keys, sender, answers)
        except MaskRejection as exc:
            self.rejections.append(exc.rejection)
            return None

    def _holders(self, dealer: str) -> list[str]:
        return [h for h in self.graph[dealer] if h in self.members]

    # -- step 1 -----------------------------------------------------------------------------------

    def add_bundle(self, data: bytes, sender: str | None = None) -> bool:
        if self._phase != "bundles":
            self._reject(sender or "?", "bundle", "arrived after the clients were told who shared")
            return False
        msg = self._open(data, "bundle", sender)
        if msg is None:
            return False
        who, holders = msg.client, self._holders(msg.client)
        if who not in self.members or who in self.bundles:
            self._reject(who, "bundle", "no accepted key advert" if who not in self.members else "a second bundle")
            return False
        entry, n_map = SHARE_CT_BYTES + COMMIT_BYTES, (len(self.graph[who]) + 7) // 8
        body = msg.payload
        if len(body) != COMMIT_BYTES + n_map + entry * len(holders):
            self._reject(who, "bundle", f"payload of {len(body)} bytes, expected shares for {len(holders)} holders")
            return False
        flags = from_bitmap(body[COMMIT_BYTES:COMMIT_BYTES + n_map], len(self.graph[who]))
        if flags != [h in self.members for h in self.graph[who]]:
            self._reject(who, "bundle", "deals to other holders than the accepted adverts allow")
            return False
        own = body[:COMMIT_BYTES]
        if own in self.seen_commits:
            self._reject(who, "bundle", "replays a self-mask seed committed in an earlier round")
            return False
        at = COMMIT_BYTES + n_map
        entries = {h: (body[at + i * entry:at + i * entry + SHARE_CT_BYTES],
                       body[at + i * entry + SHARE_CT_BYTES:at + (i + 1) * entry]) for i, h in enumerate(holders)}
        self.seen_commits.add(own)
        self.bundles[who] = _Bundle(own, entries)
        return True

    def shared(self) -> list[str]:
        return sorted(self.bundles)

    # -- step 2 and the seeds step -----------------------------------------------------------------

    def summed(self) -> list[str]:
        return sorted(self._summed or ())

    def dropped(self) -> list[str]:
        return sorted(set(self.bundles) - (self._summed or set()))

    def start_recovery(self, uploaded, liveness: bool = True) -> None:
        """``S``: the clients that shared and whose ciphertexts arrived. ``liveness=False``: the
        seeds step goes only to summed clients with a dropped neighbour (they have seeds to
        reveal); with nobody dropped the keys step follows at once, and a client that uploaded and
        then vanished stays summed (its self mask comes from its holders' keys)."""
        if self._phase != "bundles":
            raise RuntimeError("recovery already started")
        self._phase, self._liveness = "seeds", liveness
        self._summed = set(self.bundles) & set(uploaded)
        for c in sorted(set(uploaded) - set(self.bundles)):
            self._reject(c, "upload", "uploaded without an accepted bundle: its ciphertext must not be summed")
        self._check_viable()

    def _check_viable(self) -> None:
        s, t = self._summed, self.plan.threshold
        out = sorted(set(self.graph) - s)
        short = [j for j in sorted(s) if len([h for h in self._holders(j) if h in s]) < t]
        if short or len(s) < 2:
            reason = (f"{len(out)} of {len(self.graph)} clients are not summed ({', '.join(out)}); the round "
                      f"survives at most {self.plan.max_dropped} (threshold {t} of {self.plan.degree} neighbours)")
            if short:
                reason += f"; {len(short)} summed clients keep fewer than {t} summed neighbours"
            self._abandon(reason)

    def _abandon(self, reason: str) -> None:
        self._abandoned, self._phase = reason, "abandoned"
        raise RoundAbandoned(reason)

    def seeds_due(self) -> list[str]:
        """Summed clients that have not answered the seeds step for the current ``summed()``: each
        reveals its pair seeds with dropped neighbours (none if nobody dropped) and so shows it
        is still up; a client that does not answer is :meth:`drop`-ped."""
        if self._phase != "seeds":
            return []
        out = set(self.dropped())
        return [j for j in self.summed() if j not in self._confirmed
                and (self._liveness or any(l in out for l in self.graph[j]))]

    def drop(self, client: str, reason: str = "did not answer") -> None:
        """Move a summed client to the dropped ones (its ciphertext must leave the sum)."""
        if self._phase not in ("seeds",) or client not in self._summed:
            raise RuntimeError(f"{client} cannot be dropped now")
        self._reject(client, "seeds", reason + "; its update leaves the sum")
        self._summed.discard(client)
        self._confirmed = set()             # the summed list changed: everyone answers again
        self._seeds = {k: v for k, v in self._seeds.items() if k[0] in self._summed}
        self._check_viable()

    def add_seeds(self, data: bytes, sender: str | None = None) -> bool:
        msg = self._open(data, "seeds", sender, names_digest(self.summed()))
        if msg is None or self._phase != "seeds":
            return False
        j = msg.client
        if j not in self._summed:
            self._reject(j, "seeds", "is not summed")
            return False
        dropped = set(self.dropped())
        asked = [l for l in self.graph[j] if l in dropped]
        n_map = (len(asked) + 7) // 8
        try:
            flags = from_bitmap(msg.payload[:n_map], len(asked))
        except ValueError as exc:
            self.drop(j, f"malformed seeds reply: {exc}")
            return False
        seeds = msg.payload[n_map:]
        given = [l for l, f in zip(asked, flags) if f]
        if flags != [l in self.members for l in asked] or len(seeds) != SEED_BYTES * len(given):
            self.drop(j, "seeds reply does not cover its dropped neighbours")
            return False
        for i, l in enumerate(given):
            seed = seeds[i * SEED_BYTES:(i + 1) * SEED_BYTES]
            if commit(b"pair", seed) != self.bundles[l].entries[j][1]:
                self.drop(j, f"its pair seed with {l} does not match {l}'s commitment (a wrong or replayed seed)")
                return False
        self._seeds.update({(j, l): seeds[i * SEED_BYTES:(i + 1) * SEED_BYTES] for i, l in enumerate(given)})
        self._confirmed.add(j)
        return True

    # -- the keys step ------------------------------------------------------------------------------

    def start_keys(self) -> None:
        if self._phase != "seeds" or self.seeds_due():
            raise RuntimeError(f"seeds still due from {', '.join(self.seeds_due()) or 'nobody'}; phase {self._phase}")
        self._phase = "keys"

    def pick_holders(self, order: list[str]) -> list[str]:
        """Holders not asked yet, taken greedily in ``order``, whose share keys bring every summed
        client's self mask to ``T`` shares (counting those already opened); each is recorded as
        asked. Empty when no summed client is short, or no holder left can help one."""
        if self._phase != "keys":
            return []
        asked = self._keys_asked = self._keys_asked or set()
        need = {j: self.plan.threshold - len(self._shares.get(j, {})) for j in self.summed()}
        need = {j: n for j, n in need.items() if n > 0}
        out = []
        for h in order:
            if not need:
                break
            helps = [j for j in need if h in self.bundles[j].entries] if h not in asked else []
            if helps:
                out.append(h)
                for j in helps:
                    need[j] -= 1
                    if not need[j]:
                        del need[j]
        asked |= set(out)
        return out

    def keys_asked(self) -> list[str]:
        """The holders :meth:`pick_holders` named so far (everyone, for a caller that asks all)."""
        return sorted(self._keys_asked) if self._keys_asked is not None else sorted(self.members)

    def add_keys(self, data: bytes, sender: str | None = None) -> int:
        """Take one holder's share keys; returns how many shares they opened."""
        msg = self._open(data, "keys", sender, names_digest(self.summed()))
        if msg is None or self._phase != "keys":
            return 0
        h = msg.client
        if h in self._key_replies or h not in self.members:
            self._reject(h, "keys", "a second keys reply" if h in self._key_replies else "not a holder")
            return 0
        self._key_replies.add(h)
        dealers = [j for j in self.graph[h] if j in self._summed]
        n_map = (len(dealers) + 7) // 8
        try:
            flags = from_bitmap(msg.payload[:n_map], len(dealers))
        except ValueError as exc:
            self._reject(h, "keys", f"malformed keys reply: {exc}")
            return 0
        given = [j for j, f in zip(dealers, flags) if f]
        keys = msg.payload[n_map:]
        if len(keys) != KEY_BYTES * len(given):
            self._reject(h, "keys", "keys reply of the wrong length")
            return 0
        plain: dict[str, bytes] = {}
        for i, j in enumerate(given):
            ct = self.bundles[j].entries[h][0]
            try:
                plain[j] = AESGCM(keys[i * KEY_BYTES:(i + 1) * KEY_BYTES]).decrypt(
                    NONCE, ct, share_aad(self.run, self.rnd, j, h))
            except (InvalidTag, ValueError):
                self._reject(h, "keys", f"its key for {j}'s share does not open that share (bad or replayed)")
        rows = shamir.shares_from_bytes(list(plain.values()))      # all at once; None: a limb outside the field
        for j, row in zip(plain, rows):
            if row is None:
                self._reject(h, "keys", f"its key for {j}'s share does not open that share (bad or replayed)")
            else:
                self._shares.setdefault(j, {})[self._xs[h]] = row
        return sum(row is not None for row in rows)

    def correction(self, length: int, purpose: int = 0) -> np.ndarray:
        """What to subtract from the encrypted sum of the summed clients' ``length``-slot vectors
        of this ``purpose`` (:meth:`~carbonfed.privacy.mask_client.MaskingClient.mask`)."""
        if self._phase != "keys":
            raise RuntimeError(self._abandoned or f"correction asked in phase {self._phase}")
        if self._unmasking is None:
            asked = self._keys_asked
            if asked is None:
                asked = {h for j in self.summed() for h in self._holders(j)}
            for h in sorted(asked - self._key_replies):
                self._reject(h, "keys", "no reply: its shares of its summed neighbours' self masks are missing")
            own = {j: self._rebuilt_seed(j) for j in self.summed()}
            pairs: dict[str, dict[str, bytes]] = {j: {} for j in own}
            for (j, l), seed in self._seeds.items():
                pairs[j][l] = seed
            self._unmasking = own, pairs
        own, pairs = self._unmasking
        total = np.zeros(length, dtype=np.int64)
        for j in self.summed():
            total = (total + mask_sum(length, self.modulus, own[j], pairs[j], j, purpose)) % self.modulus
        return total

    def _rebuilt_seed(self, j: str) -> bytes:
        have = self._shares.get(j, {})
        t = self.plan.threshold
        if len(have) < t:
            self._abandon(f"{j}'s self mask: {len(have)} valid shares, {t} needed")
        xs = sorted(have)[:t]
        seed = self_seed(shamir.secret_bytes(shamir.combine(xs, np.array([have[x] for x in xs]))))
        if commit(b"self", seed) != self.bundles[j].own_commit:
            self._abandon(f"{j} dealt shares that do not rebuild its committed self-mask seed")
        return seed

    def blocker(self) -> str | None:
        """Why this round cannot be unmasked (``None`` while it can)."""
        return self._abandoned

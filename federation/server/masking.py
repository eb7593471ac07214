"""The server's part of the mask protocol (issue 22) over Flower messages.

The clients mask their packed updates with pairwise and self masks
(:mod:`carbonfed.privacy.masks`); this drives :class:`~carbonfed.privacy.mask_recovery.RoundRecovery`
through ``query.masks`` requests (:mod:`carbonfed.federation.client.masking` answers them):

* :meth:`ServerMasks.begin` (after the setup, or a resume): the training clients' signed X25519
  adverts, then, carrying the accepted ones, their bundles of the next round;
* :meth:`ServerMasks.shared` (the training request of round r): ``U_r``, the clients whose bundles
  were accepted; only they are asked to train (the others get a ``masks`` line and rejoin next round);
* :meth:`ServerMasks.unmask` (after the uploads): the seeds step if anyone who shared is not summed,
  then one ``unmask`` exchange with every training client that carries the share keys of round r and
  the bundles of round r+1; the correction is subtracted from the encrypted sum under the public context.

Guarantees
----------
* The aggregate a masked round keeps is exactly the sum of its summed clients' vectors (their
  ciphertexts summed, minus the correction): a client that fails the seeds step leaves the sum
  (its ciphertext is taken out) before anything is released.
* A round that cannot be unmasked (:class:`~carbonfed.privacy.mask_recovery.RoundAbandoned`) keeps
  no aggregate: :meth:`unmask` returns an empty sum, so the strategy keeps the previous model; the
  round's ``masks`` block (:attr:`ServerMasks.last`) says why.
* Every refused message or client (a forged identity, a replay, a bad share key, a missing reply)
  is a ``masks`` ledger line with its step and reason, and the round goes on if it can.
"""

from __future__ import annotations

import json
import logging

from flwr.app import ConfigRecord, Message, RecordDict

from carbonfed.federation.wire import MASKS, mask_plan, mask_roster
from carbonfed.privacy.mask_client import read_adverts
from carbonfed.privacy.mask_recovery import RoundAbandoned, RoundRecovery
from carbonfed.privacy.mask_wire import Rejection
from carbonfed.privacy.masks import unmask_sum
from carbonfed.privacy.secure_sum import SecureSum

log = logging.getLogger("carbonfed")


class ServerMasks:
    """The run's mask protocol on the server (one per run; see the module docstring)."""

    def __init__(self, fedavg, recorder, grid, courier):
        charter = fedavg.charter
        self.fedavg, self.recorder, self.grid, self.courier = fedavg, recorder, grid, courier
        self.run, self.roster = charter.sha256, mask_roster(charter)
        self.plan = mask_plan(fedavg.cfg, charter)
        self.keys = charter.keys
        self.modulus = fedavg.cipher_for("update").plain_modulus
        self.members: set[str] = set()
        self.adverts: dict[str, bytes] = {}
        self.seen: set[bytes] = set()
        self.recovery: RoundRecovery | None = None     # the round whose bundles were collected
        self.last: dict | None = None                  # the last round's ``masks`` block (ledger)
        self.bytes = 0                                 # mask messages' bytes received since the last round
        self.setup_bytes = 0

    @classmethod
    def for_run(cls, fedavg, recorder, grid, courier) -> "ServerMasks | None":
        """The run's masks, or None: masks off, no HE, or no charter (then a warning)."""
        if not fedavg.cfg.masked:
            return None
        if fedavg.charter is None:
            log.warning("masks are on but the run has no charter: uploads are not masked")
            return None
        return cls(fedavg, recorder, grid, courier)

    def describe(self) -> dict:
        """The plan (threshold, neighbours, tolerated dropouts) and the clients in it."""
        return {**self.plan.describe(), "members": len(self.members)}

    # -- transport ---------------------------------------------------------------------------------
    def _country_nodes(self) -> dict[str, int]:
        return {c: n for n, (r, c) in self.fedavg.state.roles.items() if r == "train"}

    def _ask(self, countries, rnd: int, step: str, **config) -> dict[str, dict]:
        """One ``query.masks`` ``step`` per country; ``{country: reply metadata}`` of the answers."""
        nodes = self._country_nodes()
        msgs = [Message(content=RecordDict({"config": ConfigRecord({"server-round": rnd, "mask-step": step,
                                                                       **config})}),
                        message_type=MASKS, dst_node_id=nodes[c]) for c in sorted(countries) if c in nodes]
        out = {}
        missing = lambda node, reason: self.note(Rejection(self.recorder.country(node), step, reason), rnd)
        for msg in self.courier.stream(self.grid, msgs, missing):
            country = self.recorder.country(self.courier.node_of(msg))
            if msg.has_error():
                self.note(Rejection(country, step, f"client error: {msg.error.reason}"), rnd)
                continue
            meta = dict(msg.content.config_records.get("meta", ConfigRecord()))
            self.bytes += sum(len(v) for v in meta.values() if isinstance(v, bytes))
            if "mask-refused" in meta:
                self.note(Rejection(country, step, f"refused: {meta['mask-refused']}"), rnd)
            out[country] = meta
        return out

    def note(self, rejection: Rejection, rnd: int) -> None:
        """A ``masks`` ledger line for a refused message or client."""
        node = self._country_nodes().get(rejection.client, -1)
        self.recorder.reject(self.recorder.line("masks", rnd, node, country=rejection.client,
                                                extra={"step": rejection.step}), rejection.reason)

    def _notes(self, rec: RoundRecovery, since: int) -> int:
        for r in rec.rejections[since:]:
            self.note(r, rec.rnd)
        return len(rec.rejections)

    # -- the run -------------------------------------------------------------------------------------
    def begin(self, rnd: int) -> None:
        """Adverts (once per run, again after a resume), then the bundles of round ``rnd``."""
        train = sorted(self._country_nodes())
        got = self._ask(train, 0, "advert")
        adverts = {c: m["mask-advert"] for c, m in got.items() if isinstance(m.get("mask-advert"), bytes)}
        keys, rejected = read_adverts(adverts, self.run, self.keys)
        for r in rejected:
            self.note(r, 0)
        self.members, self.adverts = set(keys), {c: adverts[c] for c in keys}
        names = sorted(self.adverts)
        self._collect(rnd, self._ask(train, 0, "share", **{"mask-round": rnd, "mask-senders": json.dumps(names),
                                                          "mask-adverts": [self.adverts[c] for c in names]}))
        self.setup_bytes, self.bytes = self.bytes, 0     # once per run: adverts and the first bundles

    def _collect(self, rnd: int, replies: dict[str, dict]) -> None:
        """A new round's recovery with the bundles in ``replies``."""
        rec = RoundRecovery(self.plan, self.run, rnd, self.roster, self.keys, self.members, self.modulus, self.seen)
        for country, meta in sorted(replies.items()):
            if isinstance(meta.get("mask-bundle"), bytes):
                rec.add_bundle(meta["mask-bundle"], sender=country)
        self._notes(rec, 0)
        self.recovery = rec

    def shared(self, rnd: int) -> list[str]:
        """``U_rnd``: the clients asked to train in round ``rnd`` (a ``masks`` line for the others)."""
        rec = self.recovery
        if rec is None or rec.rnd != rnd:
            self._collect(rnd, {})
            rec = self.recovery
        out = rec.shared()
        for c in sorted(set(self._country_nodes()) - set(out)):
            self.note(Rejection(c, "bundle", f"no accepted mask bundle for round {rnd}: not asked to train"), rnd)
        return out

    # -- a round's recovery ---------------------------------------------------------------------------
    def _seeds(self, rec: RoundRecovery, seen: int) -> int:
        """The seeds step, until every summed client with a dropped neighbour has answered."""
        while due := rec.seeds_due():
            got = self._ask(due, rec.rnd, "seeds", **{"mask-round": rec.rnd, "mask-summed": json.dumps(rec.summed())})
            for c in due:
                if c not in rec.summed():
                    continue
                data = got.get(c, {}).get("mask-seeds")
                if not isinstance(data, bytes):
                    rec.drop(c, "no seeds reply")
                elif not rec.add_seeds(data, sender=c) and c in rec.summed():
                    rec.drop(c, "its seeds reply was refused")
            seen = self._notes(rec, seen)
        return seen

    def unmask(self, rnd: int, total: SecureSum, kept: dict[str, bytes]) -> tuple[SecureSum, list[str]]:
        """The unmasked sum of round ``rnd``'s summed clients and who they are (an empty sum if the
        round cannot be unmasked); ``kept``: every accepted upload's ciphertext, by country."""
        rec, seen, why, correction = self.recovery, 0, None, None
        try:
            if rec is None or rec.rnd != rnd:
                raise RoundAbandoned(f"no mask bundles were collected for round {rnd}")
            rec.start_recovery(kept, liveness=False)
            seen = self._seeds(rec, seen)
            rec.start_keys()
        except RoundAbandoned as exc:
            why = exc.reason
        nxt = rnd + 1 if rnd < self.fedavg.cfg.rounds else 0
        config = {"mask-round": rnd, "mask-next": nxt, **({} if why else {"mask-summed": json.dumps(rec.summed())})}
        replies = self._ask(sorted(self._country_nodes()), rnd, "unmask", **config)
        if why is None:
            for c, meta in sorted(replies.items()):
                if isinstance(meta.get("mask-keys"), bytes):
                    rec.add_keys(meta["mask-keys"], sender=c)
            try:
                correction = rec.correction(total.cipher.length)
            except RoundAbandoned as exc:
                why = exc.reason
        if rec is not None:
            self._notes(rec, seen)
        if nxt:
            self._collect(nxt, replies)
        return self._result(rnd, rec, total, kept, correction, why)

    def _result(self, rnd, rec, total, kept, correction, why) -> tuple[SecureSum, list[str]]:
        cipher = total.cipher
        self.last = {"round": rnd, "shared": len(rec.shared()) if rec else 0, "uploaded": len(kept),
                     "rejections": len(rec.rejections) if rec else 0,
                     # what the mask messages added to the uploads (seeds, keys, the next round's bundles)
                     "bytes_per_client": self.bytes / max(1, len(self._country_nodes()))}
        self.bytes = 0
        if why is not None:
            log.warning("round %d: not unmasked: %s", rnd, why)
            self.last.update(status="abandoned", reason=why, summed=0)
            return SecureSum(cipher), []
        summed = rec.summed()
        if set(summed) != set(kept):           # a client that failed the seeds step leaves the sum
            total = SecureSum(cipher)
            for c in summed:
                total.add(kept[c])
        out = SecureSum(cipher)
        out.add(unmask_sum(cipher, total.serialize(), correction), len(summed))
        self.last.update(status="unmasked", reason="", summed=len(summed), dropped=rec.dropped())
        return out, summed

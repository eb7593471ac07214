"""The server's part of the mask protocol (issue 22) over Flower messages.

The clients mask their packed updates with pairwise and self masks
(:mod:`carbonfed.privacy.masks`); this drives :class:`~carbonfed.privacy.mask_recovery.RoundRecovery`
through ``query.masks`` requests (:mod:`carbonfed.federation.client.masking` answers them):

* :meth:`ServerMasks.begin` (after the setup, or a resume): the training clients' signed X25519
  adverts, then, carrying the accepted ones, their bundles of the next round;
* :meth:`ServerMasks.restrict` (the training request of round r): ``U_r``, the clients whose bundles
  were accepted; only they are asked to train (the others get a ``masks`` line and rejoin next round);
  the request asks for the bundle of round r+1 too (``mask-next``), and each reply's bundle is taken by
  :meth:`ServerMasks.offer`;
* :meth:`ServerMasks.unmask` (after the uploads): the seeds step if anyone who shared is not summed,
  then one ``unmask`` exchange with the share-key holders it needs
  (:meth:`~carbonfed.privacy.mask_recovery.RoundRecovery.pick_holders`: ``T + 1`` clients of a complete
  graph, starting at a place that moves with the round) and the clients whose round-r+1 bundle did
  not come with an upload; more holders only if some failed. The correction is subtracted from the
  encrypted sum under the public context.

One object per stream (:mod:`carbonfed.privacy.mask_streams`): ``update`` (the loop's, as above),
``metrics`` (the held-out clients' evaluation counts, round by round, the same steps:
:meth:`ServerMasks.restrict` arms a request) and ``stats`` (the statistics stages at the setup,
:mod:`~carbonfed.federation.server.setup`; before the setup knows the roles, :attr:`ServerMasks.nodes`
names the training clients' nodes).

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
from collections.abc import Callable
from functools import partial

from flwr.app import ConfigRecord, Message, RecordDict

from carbonfed.federation.wire import MASKS
from carbonfed.privacy.mask_adverts import read_adverts
from carbonfed.privacy.mask_recovery import RoundAbandoned, RoundRecovery
from carbonfed.privacy.mask_streams import stream_plan, stream_role, stream_roster, stream_run
from carbonfed.privacy.mask_wire import Rejection
from carbonfed.privacy.masks import unmask_sum
from carbonfed.privacy.secure_sum import SecureSum

log = logging.getLogger("carbonfed")


_ASKED = {"update": "train", "stats": "release its statistics", "metrics": "evaluate"}


class ServerMasks:
    """One mask stream of the run on the server (:mod:`carbonfed.privacy.mask_streams`: ``update``,
    ``stats`` or ``metrics``; one object per stream and run; see the module docstring)."""

    def __init__(self, fedavg, recorder, grid, courier, stream: str = "update"):
        charter, cfg = fedavg.charter, fedavg.cfg
        self.fedavg, self.recorder, self.grid, self.courier = fedavg, recorder, grid, courier
        self.stream, self.role = stream, stream_role(stream)
        self.run, self.roster = stream_run(charter.sha256, stream), stream_roster(charter, stream)
        self.plan = stream_plan(cfg, charter, stream)
        self.last_round = cfg.stats_releases if stream == "stats" else cfg.rounds
        self.nodes: dict[str, int] | None = None       # {country: node} before the setup knows the roles
        self.keys = charter.keys
        self.modulus = fedavg.cipher_for(stream).plain_modulus      # the cipher of the stream's (first) uploads
        self.members: set[str] = set()
        self.adverts: dict[str, bytes] = {}
        self.seen: set[bytes] = set()
        self.recovery: RoundRecovery | None = None     # the round whose bundles were collected
        self.last: dict | None = None                  # the last round's ``masks`` block (ledger)
        self.ahead: dict[str, bytes] = {}              # the next round's bundles that came with the uploads
        self.bytes = 0                                 # mask messages' bytes received since the last round
        self.setup_bytes = 0
        self.alongside: Callable[[], None] | None = None   # called once, after the next request is pushed

    @classmethod
    def for_run(cls, fedavg, recorder, grid, courier, stream: str = "update") -> "ServerMasks | None":
        """The run's masks of ``stream``, or None: masks off, no HE, no charter (then a warning),
        or a stream of one client (nothing to mask its upload among: the clients agree)."""
        if not fedavg.cfg.masked:
            return None
        if fedavg.charter is None:
            log.warning("masks are on but the run has no charter: uploads are not masked")
            return None
        if stream_plan(fedavg.cfg, fedavg.charter, stream) is None:
            log.warning("masks: the %s stream has fewer than two clients: its upload is the sum, not masked", stream)
            return None
        return cls(fedavg, recorder, grid, courier, stream)

    def describe(self) -> dict:
        """The plan (threshold, neighbours, tolerated dropouts) and the clients in it."""
        return {**self.plan.describe(), "members": len(self.members)}

    # -- transport ---------------------------------------------------------------------------------
    def _country_nodes(self) -> dict[str, int]:
        if self.nodes is not None:
            return dict(self.nodes)
        return {c: n for n, (r, c) in self.fedavg.state.roles.items() if r == self.role}

    def _next(self, rnd: int) -> int:
        """The stream's round after ``rnd`` (0: none)."""
        return rnd + 1 if rnd < self.last_round else 0

    def restrict(self, rnd: int, config, nodes: list[int]) -> list[int]:
        """The nodes of an upload request of round ``rnd`` that may be sent it: those whose bundles
        were accepted (:meth:`shared`, which ``config`` gets as ``mask-shared``); the request asks for
        the next round's bundle (``mask-next``; not at the setup, whose replies have no room for it)."""
        shared = self.shared(rnd)
        config["mask-shared"] = json.dumps(shared)
        if self.stream != "stats" and self._next(rnd):
            config["mask-next"] = self._next(rnd)
        names = {n: c for c, n in self._country_nodes().items()}
        return [n for n in nodes if names.get(n) in shared]

    def offer(self, country: str, msg: Message) -> None:
        """Take the next round's bundle an upload reply carries (checked when that round's recovery starts)."""
        meta = {} if msg.has_error() else msg.content.config_records.get("meta", ConfigRecord())
        if isinstance(meta.get("mask-bundle"), bytes):
            self.ahead[country] = meta["mask-bundle"]
            self.bytes += len(meta["mask-bundle"])

    def _ask(self, countries, rnd: int, step: str, each: dict[str, dict] | None = None,
             on_reply: Callable[[str, dict], None] | None = None, **config) -> dict[str, dict]:
        """One ``query.masks`` ``step`` per country (``each``: more config per country);
        ``{country: reply metadata}`` of the answers (each also to ``on_reply`` as it arrives)."""
        nodes = self._country_nodes()
        names = {n: c for c, n in nodes.items()}
        config = {"server-round": self._flower_round(rnd), "mask-step": step, "mask-stream": self.stream, **config}
        msgs = [Message(content=RecordDict({"config": ConfigRecord({**config, **(each or {}).get(c, {})})}),
                        message_type=MASKS, dst_node_id=nodes[c]) for c in sorted(countries) if c in nodes]
        out = {}
        missing = lambda node, reason: self.note(Rejection(names.get(node, f"node-{node}"), step, reason), rnd)
        replies = self.courier.stream(self.grid, msgs, missing)         # pushed
        if self.alongside is not None:          # (the loop's next training request: its clients are others)
            alongside, self.alongside = self.alongside, None
            alongside()
        for msg in replies:
            country = names.get(self.courier.node_of(msg), f"node-{self.courier.node_of(msg)}")
            if msg.has_error():
                self.note(Rejection(country, step, f"client error: {msg.error.reason}"), rnd)
                continue
            meta = dict(msg.content.config_records.get("meta", ConfigRecord()))
            self.bytes += sum(len(v) for v in meta.values() if isinstance(v, bytes))
            if "mask-refused" in meta:
                self.note(Rejection(country, step, f"refused: {meta['mask-refused']}"), rnd)
            out[country] = meta
            if on_reply is not None:
                on_reply(country, meta)
        return out

    def _flower_round(self, rnd: int) -> int:
        """The run's round of this stream's round ``rnd``: the statistics stages are all round 0."""
        return 0 if self.stream == "stats" else rnd

    def note(self, rejection: Rejection, rnd: int) -> None:
        """A ``masks`` ledger line for a refused message or client (``stage``: a statistics stage's)."""
        node = self._country_nodes().get(rejection.client, -1)
        extra = {"stream": self.stream, "step": rejection.step, **({"stage": rnd} if self.stream == "stats" else {})}
        self.recorder.reject(self.recorder.line("masks", self._flower_round(rnd), node, country=rejection.client,
                                                extra=extra), rejection.reason)

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
        self._collect(rnd, _bundles(self._ask(train, 0, "share", **{
            "mask-round": rnd, "mask-senders": json.dumps(names), "mask-adverts": [self.adverts[c] for c in names]})))
        self.setup_bytes, self.bytes = self.bytes, 0     # once per run: adverts and the first bundles

    def _collect(self, rnd: int, bundles: dict[str, bytes]) -> None:
        """A new round's recovery with ``bundles`` (by sender)."""
        rec = RoundRecovery(self.plan, self.run, rnd, self.roster, self.keys, self.members, self.modulus, self.seen)
        for country, bundle in sorted(bundles.items()):
            rec.add_bundle(bundle, sender=country)
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
            self.note(Rejection(c, "bundle", f"no accepted mask bundle for round {rnd}: not asked to {_ASKED[self.stream]}"),
                      rnd)
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
        nxt, ahead, self.ahead = self._next(rnd), self.ahead, {}
        need = sorted(set(self._country_nodes()) - set(ahead)) if nxt else []   # no bundle came with an upload
        each = {c: {"mask-next": nxt} for c in need}
        if why is None:
            summed = {"mask-summed": json.dumps(rec.summed())}
            for c in rec.pick_holders(self._order(rec, rnd, need)):
                each.setdefault(c, {}).update(summed)
        keys = partial(_keys, rec) if why is None else None       # share keys opened as they come
        replies = self._ask(each, rnd, "unmask", each, keys, **{"mask-round": rnd}) if each else {}
        if why is None:
            while more := rec.pick_holders(self._order(rec, rnd, [])):    # a holder failed: others instead
                self._ask(more, rnd, "unmask", on_reply=keys, **{"mask-round": rnd, **summed})
            try:
                correction = rec.correction(total.cipher.length)
            except RoundAbandoned as exc:
                why = exc.reason
        if rec is not None:
            self._notes(rec, seen)
        if nxt:
            self._collect(nxt, {**ahead, **_bundles(replies)})
        return self._result(rnd, rec, total, kept, correction, why)

    def _order(self, rec: RoundRecovery, rnd: int, first: list[str]) -> list[str]:
        """Share-key holders to ask, in order: summed clients asked anyway (``first``), the other
        summed ones from a place that moves with the round (the work spreads), then the rest."""
        summed, early = rec.summed(), set(first)
        in_sum = set(summed)
        s = [c for c in summed if c not in early]
        k = rnd * (self.plan.threshold + 1) % max(1, len(s))
        return [c for c in first if c in in_sum] + s[k:] + s[:k] + sorted(self.members - in_sum)

    def _result(self, rnd, rec, total, kept, correction, why) -> tuple[SecureSum, list[str]]:
        cipher = total.cipher
        self.last = {"stream": self.stream, "round": rnd, "shared": len(rec.shared()) if rec else 0, "uploaded": len(kept),
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
        self.last.update(status="unmasked", reason="", summed=len(summed), dropped=rec.dropped(),
                         key_holders=len(rec.keys_asked()))      # asked for share keys (T + 1 when all answer)
        return out, summed


def _keys(rec: RoundRecovery, country: str, meta: dict) -> None:
    """A share-key holder's reply: its keys open its shares of the summed clients' self masks."""
    if isinstance(meta.get("mask-keys"), bytes):
        rec.add_keys(meta["mask-keys"], sender=country)


def _bundles(replies: dict[str, dict]) -> dict[str, bytes]:
    """The bundles among mask replies, by sender."""
    return {c: m["mask-bundle"] for c, m in replies.items() if isinstance(m.get("mask-bundle"), bytes)}

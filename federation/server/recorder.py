"""LedgerRecorder: the privacy ledger of a run, kept by a wrapper around :class:`EncryptedFedAvg`.

As Flower's ``DifferentialPrivacyServerSideFixedClipping`` wraps an inner strategy to add noise,
this wraps one to write down what happens: the inner strategy decides what each reply is worth
(:class:`~carbonfed.federation.server.strategy.Verdict`), the recorder writes the line.

Guarantees
----------
* Every reply gets one ledger line, written (hash-chained, fsynced) as soon as its verdict is
  made: ``accepted`` (with its size in bytes), ``rejected`` or ``refused`` with the reason.
  Nothing recorded is lost if the server stops.
* A line carries the server's own fields (kind, stage, round, node, country, status, reason,
  bytes, δ) and, from a reply that is not an error, the client's signed statement verbatim
  (``signed``) with a readable copy of its facts (:mod:`carbonfed.federation.server.statements`):
  a client cannot overwrite the server's fields, and a statement that does not verify under the
  run's charter, or that states another client, kind, round, stage or status than the line, is
  not recorded (and its reply is not added: :attr:`EncryptedFedAvg.screen`).
* Clients that did not answer before the round's timeout, or that Flower reported gone, get a
  ``missing`` line once the wait is over (an absence: no data, no budget spent on the server's side).
* After every round one ``round`` line sums up its lines, with the rounds the evaluated model
  averages (``model_rounds``) and the SHA-256 of each aggregate file the round wrote
  (``aggregates``); with ``ddp+he`` also its contributors and noise (``ddp``:
  :func:`carbonfed.federation.server.ddp.round_record`); in a masked run its ``masks`` block
  (:mod:`carbonfed.federation.server.masking`) and, for the held-out clients' evaluation counts,
  its ``metrics_masks`` block, and a ``masks`` line per refused mask message or client. After the last round every client's closing statement is a ``close`` line.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from carbonfed.federation.server.strategy import EncryptedFedAvg, Verdict
from carbonfed.federation.server.strategy_utils import StrategyWrapper, refuse_start
from carbonfed.federation.server.statements import line_fields, screen
from carbonfed.privacy.ledger import Ledger
from carbonfed.privacy.secure_sum import SecureSum

log = logging.getLogger("carbonfed")


def sender(reply: Message) -> int:
    """The node a reply comes from, as its metadata says."""
    return reply.metadata.src_node_id


class LedgerRecorder(StrategyWrapper):
    """Writes the ledger of an inner :class:`EncryptedFedAvg` (it becomes its verdict listener)."""

    def __init__(self, strategy: EncryptedFedAvg, ledger: Ledger, node_of: Callable[[Message], int] = sender):
        """``node_of(reply)``: the node a reply answers for (the courier's, which knows whom it
        addressed; an error reply made by the SuperLink carries the SuperLink's id)."""
        super().__init__(strategy)
        self.ledger = ledger
        self.node_of = node_of
        self._round_lines: list[dict] = []            # ledger lines of the round under way
        self._context: tuple[str, int, dict] | None = None   # kind, round, extra fields of the replies read
        self._held: list[dict] | None = None            # lines recorded while holding (the next round's)
        self._pending_lines: list[dict] = []            # held lines, appended when the next round begins
        strategy.on_verdict = self._record_verdict
        strategy.screen = self._screen

    def start(self, grid: Grid, *args, **kwargs) -> Result:
        """Refused, as the inner strategy's (:func:`~carbonfed.federation.server.strategy_utils.refuse_start`)."""
        refuse_start(self)

    # -- lines ---------------------------------------------------------------------------------
    def country(self, node: int) -> str:
        """The country the setup learned for ``node``, or ``node-<id>``."""
        return self.strategy.state.roles.get(node, ("?", f"node-{node}"))[1]

    def line(self, kind: str, rnd: int, node: int, country: str | None = None, extra: dict | None = None) -> dict:
        """The server's own fields of a line about ``node``."""
        return {"kind": kind, **(extra or {}), "round": rnd, "node_id": node,
                "country": self.country(node) if country is None else country}

    def with_facts(self, base: dict, meta: dict, status: str) -> dict:
        """``base`` (a line of ``status``) with the client's signed statement and its facts, if
        it may stand in that line (:func:`~carbonfed.federation.server.statements.screen`), and the
        run's δ (None without DP)."""
        if screen(self.strategy.charter, meta, base, status) is None:
            base.update(line_fields(meta))
        base["delta"] = self.strategy.cfg.delta if self.strategy.cfg.dp else None
        return base

    def screen_reply(self, meta: dict, base: dict) -> str | None:
        """Why a reply for line ``base`` may not be added (its statement); None if it may."""
        return screen(self.strategy.charter, meta, base, "accepted")

    def _screen(self, msg: Message, meta: dict) -> str | None:
        if self._context is None:
            return None
        kind, rnd, extra = self._context
        return self.screen_reply(meta, self.line(kind, rnd, self.node_of(msg), extra=extra))

    def record(self, line: dict) -> dict:
        """Append a line of the round under way (inside :meth:`holding`: of the next round, appended
        when it begins)."""
        if self._held is not None:
            self._held.append(line)
            return line
        rec = self.ledger.append(line)
        self._round_lines.append(rec)
        return rec

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Lines recorded inside belong to the next round: they are appended when it begins
        (:meth:`begin_round`), after the ``round`` line of the round under way."""
        self._held = []
        try:
            yield
        finally:
            self._pending_lines, self._held = [*self._pending_lines, *self._held], None

    def accept(self, base: dict, size: int) -> None:
        """The reply was added: its size in bytes."""
        self.record({**base, "status": "accepted", "reason": "", "bytes": size})

    def reject(self, base: dict, reason: str, status: str = "rejected") -> None:
        """The reply was not added (``rejected``, ``refused``) or never came (``missing``)."""
        self.record({**base, "status": status, "reason": reason})
        log.warning("round %s: %s %s: %s", base.get("round"), status, base.get("country"), reason)

    def missing(self, kind: str, rnd: int, node: int, reason: str) -> None:
        """``node`` did not answer a ``kind`` request of round ``rnd``."""
        self.reject(self.line(kind, rnd, node), reason, status="missing")

    # -- the inner strategy's verdicts ------------------------------------------------------------
    @contextmanager
    def _judging(self, kind: str, rnd: int, extra: dict | None = None) -> Iterator[None]:
        """Verdicts made inside are lines of ``kind`` in round ``rnd`` (with ``extra`` fields)."""
        self._context = (kind, rnd, extra or {})
        try:
            yield
        finally:
            self._context = None

    def _record_verdict(self, msg: Message, verdict: Verdict) -> None:
        """One line for one reply of the requests under way."""
        if self._context is None:
            raise RuntimeError("a verdict outside a request the recorder knows of")
        kind, rnd, extra = self._context
        base = self.line(kind, rnd, self.node_of(msg), extra=extra)
        if not msg.has_error():
            self.with_facts(base, dict(msg.content.config_records.get("meta", ConfigRecord())), verdict.status)
        if verdict.status == "accepted":
            self.accept(base, verdict.bytes)
        else:
            self.reject(base, verdict.reason, verdict.status)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The inner aggregate; a ``train`` line per reply."""
        with self._judging("train", server_round):
            return self.strategy.aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The inner aggregate; an ``evaluate`` line per reply."""
        with self._judging("evaluate", server_round):
            return self.strategy.aggregate_evaluate(server_round, replies)

    def accumulate_stage(self, stage: int, key: str, replies: Iterable[Message], contributors: list[str],
                         kept: dict[str, bytes] | None = None) -> SecureSum:
        """The inner sum of statistics stage ``stage`` (2 or 3, round 0); a ``stats`` line per reply
        (``kept``: each added reply's ciphertext, by country, for the masks)."""
        with self._judging("stats", 0, {"stage": stage}):
            return self.strategy.accumulate(replies, key, contributors, kept)

    def record_close(self, rnd: int, msg: Message) -> None:
        """A client's closing statement (``query.close`` after round ``rnd``): a ``close`` line."""
        base = self.line("close", rnd, self.node_of(msg))
        if msg.has_error():
            self.reject(base, f"client error: {msg.error.reason}")
            return
        meta = dict(msg.content.config_records.get("meta", ConfigRecord()))
        why = self.screen_reply(meta, base)
        if why:
            self.reject(base, f"signed statement: {why}")
            return
        self.record({**self.with_facts(base, meta, "accepted"), "status": "accepted", "reason": ""})

    # -- rounds --------------------------------------------------------------------------------
    def begin_round(self) -> None:
        """The lines recorded from now on make the next round's summary (first the lines held for it)."""
        self._round_lines = []
        held, self._pending_lines = self._pending_lines, []
        for line in held:
            self.record(line)

    def close_round(self, rnd: int, seconds: float) -> dict:
        """Append and return the ``round`` line of round ``rnd`` (which took ``seconds``)."""
        lines, state = self._round_lines, self.strategy.state
        accepted = [r for r in lines if r.get("kind") == "train" and r["status"] == "accepted"]
        eps = [r["epsilon"] for r in lines if r.get("kind") == "train" and r.get("epsilon") is not None]
        summary = {"kind": "round", "round": rnd, "seconds": seconds,
                   "accepted": len(accepted),
                   "rejected": sum(1 for r in lines if r.get("kind") == "train" and r["status"] != "accepted"),
                   "evaluated": sum(1 for r in lines if r.get("kind") == "evaluate" and r["status"] == "accepted"),
                   "epsilon_max": max(eps) if eps else None,
                   "upload_bytes_per_client": (sum(r["bytes"] for r in accepted) / len(accepted)) if accepted else None,
                   "model_terms": state.model_terms,
                   # the rounds whose global models the evaluated model averages (average-last)
                   "model_rounds": state.tail_rounds(), "aggregates": self._manifest(rnd)}
        if self.strategy.cfg.ddp:   # the round's contributors and the noise its sum carries
            summary["ddp"], self.strategy.ddp_round = self.strategy.ddp_round, None
        for key, masks in (("masks", self.strategy.masks), ("metrics_masks", self.strategy.metric_masks)):
            if masks is not None:  # who shared, who was summed, and whether the sum was unmasked (or why not)
                summary[key], masks.last = masks.last, None
        self.ledger.append(summary)
        return summary

    def _manifest(self, rnd: int) -> dict[str, str]:
        """SHA-256 of each aggregate file as round ``rnd`` leaves it (a description: the clients'
        signed inputs and the check slots bind the files; this binds them against third parties)."""
        folder = self.strategy.out / "aggregates"
        names = (f"model_round_{rnd:03d}.bin", "model.bin", f"metrics_round_{rnd:03d}.bin")
        return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names if (folder / n).is_file()}

"""EncryptedFedAvg: sample-weighted FedAvg computed on ciphertexts by a server without the key.

The algorithm only: what each round sends, which replies it adds and what it keeps. The ledger
(:class:`~carbonfed.federation.server.recorder.LedgerRecorder`), the setup round 0
(:mod:`~carbonfed.federation.server.setup`) and the round loop with checkpoints and resume
(:class:`~carbonfed.federation.server.loop.ResumableRun`) wrap it.

Guarantees
----------
* The server holds a public context only (no secret key): it adds ciphertexts and forwards the
  encrypted sum; it never sees a model, a sample count or a metric in the clear (HE on).
* Aggregation streams: each reply is added into one running sum as it arrives
  (:class:`~carbonfed.privacy.secure_sum.SecureSum`) and then dropped; memory does not grow with clients.
* Every reply gets one :class:`Verdict`, handed to :attr:`EncryptedFedAvg.on_verdict` as soon as
  it is made. A reply that is an error, a refusal, made under a different key or context,
  beyond the encoding's headroom (more than ``max-clients-per-round``), malformed or of the
  wrong length is rejected *for that client alone* and the round goes on with the rest. A
  round with fewer than ``min_train_clients`` accepted updates (``ddp+he``: fewer than
  ``min-noise-clients``, :meth:`EncryptedFedAvg.release_floor`) keeps the previous global model:
  its aggregate is sent to no key holder. With ``ddp+he`` every round's contributors and noise
  are kept in :attr:`EncryptedFedAvg.ddp_round` for the ledger (:mod:`carbonfed.federation.server.ddp`).
* With masks (``masks``, HE modes; :mod:`~carbonfed.federation.server.masking`) only the clients
  whose mask bundles were accepted are asked to train, each upload is masked, and the round's
  sum is kept only once unmasked (the accepted ciphertexts are kept until then, to take out a
  client that fails the seeds step); a round that cannot be unmasked keeps the previous model.
  One term of the headroom is the correction's: at most ``max-clients-per-round - 1`` updates.
  The held-out clients' evaluation counts are masked the same way (:attr:`EncryptedFedAvg.metric_masks`).
* The run's model is the sample-weighted mean of the global models of the last
  ``average-last`` rounds (1: the final round's): the server adds those rounds' aggregates as
  ciphertexts (post-processing of what the clients released), the held-out clients evaluate it
  every round, and it is what ``aggregates/model.bin`` holds. The clients train on the latest
  global model.
* Each round's aggregates are on disk when its aggregation returns (written atomically; each
  round's global model as ``aggregates/model_round_NNN.bin``).
* Every request names, beside each aggregate it carries, the clients whose contributions it
  sums (``model-parts``, ``stats-parts``): the clients check that the aggregate's check slots carry
  exactly their tags (:mod:`carbonfed.privacy.binding`). A reply is added only if :attr:`screen`
  (the recorder's check of its signed statement) finds nothing wrong with it; a reply of status
  ``error`` (a client that failed after it was charged, and signed so) is rejected.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from carbonfed.federation.config import RunConfig
from carbonfed.federation.durable import atomic_write
from carbonfed.federation.server import ddp
from carbonfed.federation.server.checkpoint import ServerState
from carbonfed.federation.server.strategy_utils import add_reply, refuse_start
from carbonfed.federation.wire import bytes_record, record_bytes, stage_key
from carbonfed.privacy.he import CiphertextError
from carbonfed.privacy.secure_sum import SecureSum

log = logging.getLogger("carbonfed")


@dataclass(frozen=True)
class Verdict:
    """What the server made of one reply: ``accepted`` (with its size), ``rejected`` or ``refused``."""

    status: str
    reason: str = ""
    bytes: int | None = None


def log_verdict(msg: Message, verdict: Verdict) -> None:
    """The verdict listener of a strategy that nobody records: a warning for each reply not accepted."""
    if verdict.status != "accepted":
        log.warning("node %s: %s: %s", msg.metadata.src_node_id, verdict.status, verdict.reason)


class EncryptedFedAvg(Strategy):
    """FedAvg on ciphertexts; the state it keeps between rounds is :attr:`state`."""

    def __init__(self, cfg: RunConfig, cipher_for: Callable[[str], object], fingerprint: str,
                 out_dir: str | os.PathLike):
        """``cipher_for(kind)`` gives the server-side cipher (public context) for "update",
        "metrics" or statistics-stage vectors; ``fingerprint`` is the public-key hash clients must match."""
        self.cfg = cfg
        self.cipher_for = cipher_for
        self.fingerprint = fingerprint
        self.out = Path(out_dir)
        (self.out / "aggregates").mkdir(parents=True, exist_ok=True)
        self.state = ServerState()
        self.on_verdict: Callable[[Message, Verdict], None] = log_verdict   # a recorder replaces it
        self.charter = None       # the run's charter (carbonfed.privacy.charter.Charter), if it has one
        # why a reply that would be added must not be (its signed statement); the recorder sets it
        self.screen: Callable[[Message, dict], str | None] = lambda msg, meta: None
        self.ddp_round: dict | None = None   # ddp+he: the last round's contributors and noise (ledger)
        self.masks = None    # the run's masks (carbonfed.federation.server.masking.ServerMasks); the loop sets it
        self.metric_masks = None    # the same for the held-out clients' evaluation counts (the metrics stream)

    def summary(self) -> None:
        """Log the settings that shape the aggregation."""
        log.info("EncryptedFedAvg: privacy=%s rounds=%d min_train_clients=%d", self.cfg.privacy,
                 self.cfg.rounds, self.cfg.min_train_clients)

    def start(self, grid: Grid, *args, **kwargs) -> Result:
        """Refused: the clients' statistics (setup round 0) must come first; the run that makes them
        is :class:`~carbonfed.federation.server.loop.ResumableRun`, which wraps this strategy."""
        refuse_start(self)

    # -- what a request carries -------------------------------------------------------------
    def stats_content(self, upto: int | None = None) -> tuple[dict, dict]:
        """The statistics aggregates of stages 1..``upto`` (default all) as records, and as config
        entries their term counts (``stats-terms``, ``stats2-terms``, ...) and contributors (``stats-parts``)."""
        records, terms = {}, {"stats-parts": json.dumps(self.state.stats_parts(upto))}
        for k, (data, n) in enumerate(self.state.stages[:upto], 1):
            records[stage_key(k)] = bytes_record(data, self.cipher_for(stage_key(k)).stype)
            terms[f"{stage_key(k)}-terms"] = n
        return records, terms

    def output_model(self) -> tuple[bytes | None, int]:
        """The run's model as it stands, encrypted, and its number of terms: the sum of the
        aggregates of the last ``average-last`` global models (each a sum of sample-weighted
        updates carrying its sample count), added as ciphertexts; unpacked by a key holder it is
        their sample-weighted mean. Before round 1: (None, 0)."""
        if len(self.state.tail) <= 1:
            return self.state.model, self.state.model_terms
        total = SecureSum(self.cipher_for("update"))
        for _, data, terms in self.state.tail:
            total.add(data, terms)
        return total.serialize(), total.terms

    def _payload(self, server_round: int, config: ConfigRecord, average: bool = False) -> RecordDict:
        """A request: the statistics aggregates and the latest global model (``average``: the
        run's model, :meth:`output_model`), each with the clients whose contributions it sums."""
        data, model_terms = self.output_model() if average else (self.state.model, self.state.model_terms)
        records, terms = self.stats_content()
        cfg = ConfigRecord({**dict(config), "server-round": server_round, "model-terms": model_terms, **terms})
        content = {"config": cfg, **records}
        if data is not None:
            content["model"] = bytes_record(data, self.cipher_for("update").stype)
            cfg["model-parts"] = json.dumps(self.state.model_parts(average))
        return RecordDict(content)

    def release_floor(self) -> int:
        """The fewest accepted updates a round's aggregate needs to be sent on (config ``release_floor``)."""
        return self.cfg.release_floor(len(self.nodes("train")))

    def nodes(self, role: str) -> list[int]:
        """The node ids of the clients of ``role`` ("train" or "test"), in order."""
        return sorted(n for n, (r, _) in self.state.roles.items() if r == role)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """One training request per training client: the latest global model and the statistics."""
        content = self._payload(server_round, config)
        nodes = self.nodes("train")
        if self.masks is not None:      # only the clients whose mask bundles were accepted, told who they are
            nodes = self.masks.restrict(server_round, content["config"], nodes)
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """One evaluation request per held-out client: the run's model (:meth:`output_model`)."""
        content = self._payload(server_round, config, average=True)
        nodes = self.nodes("test")
        if self.metric_masks is not None:   # masked counts: the clients whose bundles were accepted, told who
            nodes = self.metric_masks.restrict(server_round, content["config"], nodes)
        return [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes]

    # -- what the replies make ---------------------------------------------------------------
    def accumulate(self, replies: Iterable[Message], key: str, contributors: list[str] | None = None,
                   kept: dict[str, bytes] | None = None) -> SecureSum:
        """Add every acceptable reply's ``key`` vector into one running sum (the country of each
        added reply is appended to ``contributors``, its ciphertext kept in ``kept``); each reply's
        :class:`Verdict` goes to :attr:`on_verdict` before the next reply is read."""
        total = SecureSum(self.cipher_for(key))
        masks = {"update": self.masks, "metrics": self.metric_masks}.get(key)
        for msg in replies:
            verdict = self._judge(msg, total, key)
            country = self.state.roles.get(msg.metadata.src_node_id, ("?", "?"))[1]
            if masks is not None and country != "?":      # the next round's mask bundle, if it carries one
                masks.offer(country, msg)
            if verdict.status == "accepted" and contributors is not None:
                contributors.append(country)
            if verdict.status == "accepted" and kept is not None:
                kept[country] = record_bytes(msg.content.array_records[key], total.cipher.stype)
            self.on_verdict(msg, verdict)
        return total

    def _judge(self, msg: Message, total: SecureSum, key: str) -> Verdict:
        """Add ``msg``'s vector into ``total`` if it is acceptable; what was made of it."""
        if msg.has_error():
            return Verdict("rejected", f"client error: {msg.error.reason}")
        meta = dict(msg.content.config_records.get("meta", ConfigRecord()))
        if meta.get("status") == "refused":
            return Verdict("refused", meta.get("reason", "refused"))
        if meta.get("status") == "error":
            return Verdict("rejected", f"client error: {meta.get('reason', 'unknown')}")
        if meta.get("fingerprint") != self.fingerprint:
            return Verdict("rejected", "key fingerprint differs from the server's public context "
                                       "(client holds a different key or HE setting)")
        why = self.screen(msg, meta)
        if why:
            return Verdict("rejected", f"signed statement: {why}")
        if total.terms >= self.cfg.max_clients_per_round - (self.masks is not None):   # masks: + the correction
            return Verdict("rejected", f"more than max-clients-per-round={self.cfg.max_clients_per_round} replies: "
                                       "the fixed-point headroom would be exceeded")
        try:
            size = add_reply(total, msg, key)
        except (CiphertextError, KeyError) as exc:
            return Verdict("rejected", f"malformed {key}: {exc}")
        return Verdict("accepted", bytes=size)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global model (None: too few accepted updates, the previous one is kept), and
        the number of accepted updates; writes ``model_round_NNN.bin`` and ``model.bin``."""
        contributors: list[str] = []
        kept = {} if self.masks is not None else None
        total = self.accumulate(replies, "update", contributors, kept)
        if self.masks is not None:      # unmasked (or, abandoned, empty: the previous model is kept)
            total, summed = self.masks.unmask(server_round, total, kept)
            contributors = [c for c in contributors if c in summed]
        metrics = MetricRecord({"accepted": total.terms})
        if self.cfg.ddp:
            self.ddp_round = ddp.round_record(self.cfg, len(self.nodes("train")), total.terms)
        if total.terms < self.release_floor():
            log.warning("round %d: %d accepted updates < %d (min-train-clients%s); keeping the previous model",
                        server_round, total.terms, self.release_floor(), ", min-noise-clients" if self.cfg.ddp else "")
            return None, metrics
        self.state.model, self.state.model_terms = total.serialize(), total.terms
        self.state.tail = [*self.state.tail, (server_round, self.state.model, total.terms)][-self.cfg.average_last:]
        kept = {f"update-r{r:03d}" for r in self.state.tail_rounds()}
        self.state.contributors = {k: v for k, v in self.state.contributors.items()
                                   if not k.startswith("update-") or k in kept}
        self.state.contributors[f"update-r{server_round:03d}"] = contributors
        atomic_write(self.out / "aggregates" / f"model_round_{server_round:03d}.bin", self.state.model)
        atomic_write(self.out / "aggregates" / "model.bin", self.output_model()[0])
        return bytes_record(self.state.model, total.cipher.stype), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The encrypted sum of the confusion matrices, written to ``metrics_round_NNN.bin``."""
        kept = {} if self.metric_masks is not None else None
        total = self.accumulate(replies, "metrics", kept=kept)
        if self.metric_masks is not None:   # unmasked (or, abandoned, empty: no metrics this round)
            total, _ = self.metric_masks.unmask(server_round, total, kept)
        if total.terms == 0:
            return None
        atomic_write(self.out / "aggregates" / f"metrics_round_{server_round:03d}.bin", total.serialize())
        return MetricRecord({"terms": total.terms})

    def keep_stage(self, total: SecureSum, contributors: list[str]) -> None:
        """Keep the aggregate of the next statistics stage (summing the uploads of ``contributors``),
        and write it to ``aggregates/``."""
        data = total.serialize()
        self.state.stages.append((data, total.terms))
        self.state.contributors[stage_key(len(self.state.stages))] = list(contributors)
        atomic_write(self.out / "aggregates" / f"{stage_key(len(self.state.stages))}.bin", data)

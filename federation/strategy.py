"""EncryptedFedAvg: sample-weighted FedAvg computed on ciphertexts by a server without the key.

Guarantees
----------
* The server holds a public context only (no secret key): it adds ciphertexts and forwards the
  encrypted sum; it never sees a model, a sample count or a metric in the clear (HE on).
* Aggregation streams: each reply is added into one running sum as it arrives
  (:class:`~privacy.secure_sum.SecureSum`) and then dropped; memory does not grow with clients.
* A reply that is an error, malformed, made under a different key or context, of the wrong
  length, a refusal, or beyond the encoding's headroom is rejected *for that client alone*,
  recorded in the ledger with the reason, and the round goes on with the rest. A round with
  fewer than ``min_train_clients`` accepted updates keeps the previous global model.
* Clients that did not answer before the round's timeout are recorded as ``missing``.
* After every round the ledger has one line per addressed client and one ``round`` line, and
  the encrypted aggregates are on disk (written atomically): nothing recorded is lost if the
  server stops.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from federation.config import RunConfig
from privacy.he import CiphertextError
from privacy.ledger import Ledger
from privacy.secure_sum import SecureSum

log = logging.getLogger("carbonfed")

SETUP = "query.setup"


def bytes_record(data: bytes, stype: str) -> ArrayRecord:
    """Carry opaque bytes (a ciphertext) in an ArrayRecord, which Flower chunks in transit."""
    return ArrayRecord({"payload": Array(dtype="bytes", shape=(len(data),), stype=stype, data=data)})


def record_bytes(record: ArrayRecord, stype: str) -> bytes:
    if list(record.keys()) != ["payload"]:
        raise CiphertextError(f"expected one array 'payload', got {list(record.keys())}")
    arr = record["payload"]
    if arr.stype != stype:
        raise CiphertextError(f"payload is of type {arr.stype!r}, expected {stype!r} (HE on one side only?)")
    return bytes(arr.data)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class ServerState:
    """What the server knows between rounds: encrypted aggregates and who is who."""

    roles: dict[int, tuple[str, str]] = field(default_factory=dict)   # node id -> (role, country)
    stats: bytes | None = None
    stats_terms: int = 0
    model: bytes | None = None
    model_terms: int = 0
    round: int = 0


class EncryptedFedAvg(Strategy):
    def __init__(self, cfg: RunConfig, cipher_for: Callable[[str], object], fingerprint: str,
                 out_dir: str | os.PathLike, on_round: Callable[[dict], None] | None = None):
        """``cipher_for(kind)`` gives the server-side cipher (public context) for "update",
        "stats" or "metrics" vectors; ``fingerprint`` is the public-key hash clients must match."""
        self.cfg = cfg
        self.cipher_for = cipher_for
        self.fingerprint = fingerprint
        self.out = Path(out_dir)
        (self.out / "aggregates").mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.out / "ledger.jsonl")
        self.state = ServerState()
        self.on_round = on_round
        self._round_lines: list[dict] = []   # ledger lines of the round under way

    # -- Strategy API -----------------------------------------------------------------------
    def summary(self) -> None:
        log.info("EncryptedFedAvg: privacy=%s rounds=%d min_train_clients=%d", self.cfg.privacy,
                 self.cfg.rounds, self.cfg.min_train_clients)

    def _payload(self, server_round: int, config: ConfigRecord) -> RecordDict:
        cfg = ConfigRecord({**dict(config), "server-round": server_round, "model-terms": self.state.model_terms,
                            "stats-terms": self.state.stats_terms})
        content = {"config": cfg, "stats": bytes_record(self.state.stats, self.cipher_for("stats").stype)}
        if self.state.model is not None:
            content["model"] = bytes_record(self.state.model, self.cipher_for("update").stype)
        return RecordDict(content)

    def _nodes(self, role: str) -> list[int]:
        return sorted(n for n, (r, _) in self.state.roles.items() if r == role)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        content = self._payload(server_round, config)
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in self._nodes("train")]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        content = self._payload(server_round, config)
        return [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in self._nodes("test")]

    def _record(self, line: dict) -> None:
        self._round_lines.append(self.ledger.append(line))

    def _reject(self, base: dict, reason: str, status: str = "rejected") -> None:
        self._record({**base, "status": status, "reason": reason})
        log.warning("round %s: %s %s: %s", base.get("round"), status, base.get("country"), reason)

    def _accumulate(self, kind: str, server_round: int, replies: Iterable[Message], key: str) -> SecureSum:
        """Add every acceptable reply's ``key`` vector into one running sum; ledger every reply."""
        total = SecureSum(self.cipher_for(key))
        for msg in replies:
            node = msg.metadata.src_node_id
            role, country = self.state.roles.get(node, ("?", f"node-{node}"))
            base = {"kind": kind, "round": server_round, "node_id": node, "country": country}
            if msg.has_error():
                self._reject(base, f"client error: {msg.error.reason}")
                continue
            meta = dict(msg.content.config_records.get("meta", ConfigRecord()))
            base.update(_facts(meta, base))
            base["delta"] = self.cfg.delta if self.cfg.dp else None
            if meta.get("status") == "refused":
                self._reject(base, meta.get("reason", "refused"), status="refused")
                continue
            if meta.get("fingerprint") != self.fingerprint:
                self._reject(base, "key fingerprint differs from the server's public context "
                                   "(client holds a different key or HE setting)")
                continue
            if total.terms >= self.cfg.max_clients_per_round:
                self._reject(base, f"more than max-clients-per-round={self.cfg.max_clients_per_round} replies: "
                                   "the fixed-point headroom would be exceeded")
                continue
            try:
                data = record_bytes(msg.content.array_records[key], total.cipher.stype)
                total.add(data)
            except (CiphertextError, KeyError) as exc:
                self._reject(base, f"malformed {key}: {exc}")
                continue
            self._record({**base, "status": "accepted", "reason": "", "bytes": len(data)})
        return total

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        total = self._accumulate("train", server_round, replies, "update")
        metrics = MetricRecord({"accepted": total.terms})
        if total.terms < self.cfg.min_train_clients:
            log.warning("round %d: %d accepted updates < min-train-clients=%d; keeping the previous model",
                        server_round, total.terms, self.cfg.min_train_clients)
            return None, metrics
        self.state.model, self.state.model_terms = total.serialize(), total.terms
        _atomic_write(self.out / "aggregates" / "model.bin", self.state.model)
        return bytes_record(self.state.model, total.cipher.stype), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        total = self._accumulate("evaluate", server_round, replies, "metrics")
        if total.terms == 0:
            return None
        _atomic_write(self.out / "aggregates" / f"metrics_round_{server_round:03d}.bin", total.serialize())
        return MetricRecord({"terms": total.terms})

    # -- the run -----------------------------------------------------------------------------
    def _stream(self, grid: Grid, messages: list[Message], kind: str, server_round: int) -> Iterator[Message]:
        """Push, then yield replies as they arrive; ledger the ones missing at the timeout."""
        ids = list(grid.push_messages(messages))
        pending = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages) if mid}
        deadline = time.monotonic() + self.cfg.round_timeout
        while pending and time.monotonic() < deadline:
            got = list(grid.pull_messages(list(pending)))
            for msg in got:
                pending.pop(msg.metadata.reply_to_message_id, None)
                yield msg
            if not got:
                time.sleep(0.05)
        for node in pending.values():
            role, country = self.state.roles.get(node, ("?", f"node-{node}"))
            self._reject({"kind": kind, "round": server_round, "node_id": node, "country": country},
                         f"no reply within round-timeout={self.cfg.round_timeout}s", status="missing")

    def setup(self, grid: Grid) -> None:
        """Round 0: learn each node's role and country, and sum the training clients' statistics."""
        nodes = sorted(grid.get_node_ids())
        msgs = [Message(content=RecordDict({"config": ConfigRecord({"server-round": 0})}), message_type=SETUP,
                        dst_node_id=n) for n in nodes]
        total = SecureSum(self.cipher_for("stats"))
        for msg in self._stream(grid, msgs, "setup", 0):
            node = msg.metadata.src_node_id
            base = {"kind": "stats", "round": 0, "node_id": node, "country": f"node-{node}"}
            if msg.has_error():
                self._reject(base, f"client error: {msg.error.reason}")
                continue
            meta = dict(msg.content.config_records["meta"])
            base["country"] = meta.get("country", base["country"])
            if meta.get("fingerprint") != self.fingerprint:
                self._reject(base, "key fingerprint differs from the server's public context")
                continue
            self.state.roles[node] = (meta["role"], base["country"])
            if meta["role"] != "train":
                continue
            base.update(_facts(meta, base))
            base["delta"] = self.cfg.delta if self.cfg.dp else None
            try:
                data = record_bytes(msg.content.array_records["stats"], total.cipher.stype)
                total.add(data)
            except (CiphertextError, KeyError) as exc:
                self._reject(base, f"malformed statistics: {exc}")
                self.state.roles[node] = ("excluded", base["country"])
                continue
            self._record({**base, "status": "accepted", "reason": "", "bytes": len(data)})
        if total.terms < self.cfg.min_train_clients:
            raise RuntimeError(f"only {total.terms} training clients answered the setup "
                               f"(min-train-clients={self.cfg.min_train_clients})")
        self.state.stats, self.state.stats_terms = total.serialize(), total.terms
        _atomic_write(self.out / "aggregates" / "stats.bin", self.state.stats)
        log.info("setup: %d training and %d evaluation clients", len(self._nodes("train")), len(self._nodes("test")))

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None) -> Result:
        num_rounds = num_rounds or self.cfg.rounds
        self.summary()
        self.setup(grid)
        result = Result()
        for rnd in range(self.state.round + 1, num_rounds + 1):
            t0 = time.monotonic()
            self._round_lines = []
            train_msgs = list(self.configure_train(rnd, ArrayRecord(), train_config or ConfigRecord(), grid))
            arrays, tmetrics = self.aggregate_train(rnd, self._stream(grid, train_msgs, "train", rnd))
            if arrays is not None:
                result.arrays = arrays
            result.train_metrics_clientapp[rnd] = tmetrics
            eval_msgs = list(self.configure_evaluate(rnd, ArrayRecord(), evaluate_config or ConfigRecord(), grid))
            emetrics = self.aggregate_evaluate(rnd, self._stream(grid, eval_msgs, "evaluate", rnd))
            if emetrics is not None:
                result.evaluate_metrics_clientapp[rnd] = emetrics
            self.state.round = rnd
            summary = self._round_summary(rnd, time.monotonic() - t0)
            self.ledger.append(summary)
            if self.on_round:
                self.on_round(summary)
        return result

    def _round_summary(self, rnd: int, seconds: float) -> dict:
        lines = self._round_lines
        accepted = [r for r in lines if r.get("kind") == "train" and r["status"] == "accepted"]
        eps = [r["epsilon"] for r in lines if r.get("kind") == "train" and r.get("epsilon") is not None]
        return {"kind": "round", "round": rnd, "seconds": seconds,
                "accepted": len(accepted),
                "rejected": sum(1 for r in lines if r.get("kind") == "train" and r["status"] != "accepted"),
                "evaluated": sum(1 for r in lines if r.get("kind") == "evaluate" and r["status"] == "accepted"),
                "epsilon_max": max(eps) if eps else None,
                "upload_bytes_per_client": (sum(r["bytes"] for r in accepted) / len(accepted)) if accepted else None,
                "model_terms": self.state.model_terms}


LEDGER_FACTS = ("epsilon", "epsilon_before", "noise_multiplier", "sample_rate", "steps", "total_steps",
                "history", "clipped_params")


def _facts(meta: dict, base: dict) -> dict:
    """The privacy facts a client reports, restricted to known keys (a client cannot overwrite
    the server's own fields such as kind, round or status)."""
    try:
        facts = json.loads(meta.get("facts", "{}"))
    except (TypeError, ValueError):
        return {}
    return {k: facts[k] for k in LEDGER_FACTS if k in facts and k not in base} if isinstance(facts, dict) else {}

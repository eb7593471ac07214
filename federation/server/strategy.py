"""EncryptedFedAvg: sample-weighted FedAvg computed on ciphertexts by a server without the key.

Guarantees
----------
* The server holds a public context only (no secret key): it adds ciphertexts and forwards the
  encrypted sum; it never sees a model, a sample count or a metric in the clear (HE on).
* Aggregation streams: each reply is added into one running sum as it arrives
  (:class:`~carbonfed.privacy.secure_sum.SecureSum`) and then dropped; memory does not grow with clients.
* A reply that is an error, malformed, made under a different key or context, of the wrong
  length, a refusal, or beyond the encoding's headroom is rejected *for that client alone*,
  recorded in the ledger with the reason, and the round goes on with the rest. A round with
  fewer than ``min_train_clients`` accepted updates keeps the previous global model.
* Clients that did not answer before the round's timeout are recorded as ``missing``; so are
  clients Flower reports gone (no heartbeat within its patience, error ``NODE_UNAVAILABLE``),
  as soon as Flower says so: the round does not wait for a dead node until its timeout.
* The run's model is the sample-weighted mean of the global models of the last
  ``average-last`` rounds (1: the final round's): the server adds those rounds' aggregates as
  ciphertexts (post-processing of what the clients released), the held-out clients evaluate it
  every round, and it is what ``aggregates/model.bin`` holds. The clients train on the latest
  global model.
* After every round the ledger has one line per addressed client and one ``round`` line (with
  the rounds the evaluated model averages), and the encrypted aggregates are on disk (written
  atomically; each round's global model as ``model_round_NNN.bin``): nothing recorded is lost
  if the server stops.
* After the setup and after every round the server writes a checkpoint (``checkpoint.json``,
  atomically, last): the encrypted global model and statistics aggregates (stage 1 and, in
  DP runs of more stages, stages 2 and 3 from ``query.refine``; with their SHA-256), the
  SHA-256 of the averaged rounds' ``model_round_NNN.bin``, the term counts, the roles of the nodes, the round number and the ledger position. A server
  started again on the same out-dir with the same config and key resumes after the last
  complete round: no second statistics release, rounds 1..R each summarised once, the ledger
  chain continued (a ``resume`` line says from where, and how many lines of the interrupted
  round precede it). A checkpoint of another config or key, or a ledger that no longer
  contains the checkpoint's last line, is refused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from carbonfed.federation.config import RunConfig
from carbonfed.federation.durable import atomic_write
from carbonfed.federation.client.participant import stage_key
from carbonfed.privacy.attest import FIELD as ATTESTATION
from carbonfed.privacy.attest import reported_facts
from carbonfed.privacy.he import CiphertextError
from carbonfed.privacy.ledger import Ledger, read_ledger
from carbonfed.privacy.secure_sum import SecureSum

log = logging.getLogger("carbonfed")

SETUP = "query.setup"
REFINE = "query.refine"
ROLE = "query.role"
CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_FORMAT = 1
POLL_MIN_S, POLL_MAX_S = 0.05, 0.5     # pause between polls for replies


class CheckpointError(RuntimeError):
    """The out-dir's checkpoint cannot be resumed (other config or key, damaged, ledger cut)."""


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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gone(msg: Message) -> bool:
    """An error reply made by the SuperLink because the node is gone (no heartbeat)."""
    return msg.has_error() and msg.error.code == ErrorCode.NODE_UNAVAILABLE


@dataclass
class ServerState:
    """What the server knows between rounds: encrypted aggregates and who is who."""

    roles: dict[int, tuple[str, str]] = field(default_factory=dict)   # node id -> (role, country)
    stages: list[tuple[bytes, int]] = field(default_factory=list)     # statistics aggregates, terms: stage 1, 2, 3
    model: bytes | None = None
    model_terms: int = 0
    round: int = 0
    tail: list[tuple[int, bytes, int]] = field(default_factory=list)  # (round, global model, terms), the last average-last

    def tail_rounds(self) -> list[int]:
        """The rounds whose global models the run's model averages (``average-last``)."""
        return [r for r, _, _ in self.tail]

    def stage_terms(self) -> dict[str, int]:
        """``{"stats_terms": n1, "stats2_terms": n2, ...}`` (server.json, checkpoints)."""
        return {f"{stage_key(k)}_terms": terms for k, (_, terms) in enumerate(self.stages, 1)}


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
        self._addressee: dict[str, int] = {}  # message id -> node it was sent to (current request)
        self.resumed_from: list[int] = []    # rounds this server resumed after (from checkpoints)
        self.elapsed_before = 0.0            # seconds spent by earlier servers of this run
        self._t0 = time.monotonic()

    # -- Strategy API -----------------------------------------------------------------------
    def summary(self) -> None:
        log.info("EncryptedFedAvg: privacy=%s rounds=%d min_train_clients=%d", self.cfg.privacy,
                 self.cfg.rounds, self.cfg.min_train_clients)

    def _stats_content(self, upto: int | None = None) -> tuple[dict, dict]:
        """The statistics aggregates of stages 1..``upto`` (default all) as records, and their
        term counts as config entries ``stats-terms``, ``stats2-terms``, ..."""
        records, terms = {}, {}
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

    def _payload(self, server_round: int, config: ConfigRecord, model: tuple[bytes | None, int] | None = None) -> RecordDict:
        """A request: the statistics aggregates and ``model`` (default: the latest global model)."""
        data, model_terms = model or (self.state.model, self.state.model_terms)
        records, terms = self._stats_content()
        cfg = ConfigRecord({**dict(config), "server-round": server_round, "model-terms": model_terms, **terms})
        content = {"config": cfg, **records}
        if data is not None:
            content["model"] = bytes_record(data, self.cipher_for("update").stype)
        return RecordDict(content)

    def _nodes(self, role: str) -> list[int]:
        return sorted(n for n, (r, _) in self.state.roles.items() if r == role)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        content = self._payload(server_round, config)
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in self._nodes("train")]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        content = self._payload(server_round, config, self.output_model())
        return [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in self._nodes("test")]

    def _record(self, line: dict) -> None:
        self._round_lines.append(self.ledger.append(line))

    def _reject(self, base: dict, reason: str, status: str = "rejected") -> None:
        self._record({**base, "status": status, "reason": reason})
        log.warning("round %s: %s %s: %s", base.get("round"), status, base.get("country"), reason)

    def _accumulate(self, kind: str, server_round: int, replies: Iterable[Message], key: str,
                    extra: dict | None = None) -> SecureSum:
        """Add every acceptable reply's ``key`` vector into one running sum; ledger every reply
        (its line carries ``extra`` too)."""
        total = SecureSum(self.cipher_for(key))
        for msg in replies:
            node = self._node_of(msg)
            role, country = self.state.roles.get(node, ("?", f"node-{node}"))
            base = {"kind": kind, **(extra or {}), "round": server_round, "node_id": node, "country": country}
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
            self._add(total, msg, key, base, key)
        return total

    def _add(self, total: SecureSum, msg: Message, key: str, base: dict, what: str) -> bool:
        """Add the reply's ``key`` vector into ``total`` and ledger it as accepted; a malformed or
        foreign one is rejected for this client alone."""
        try:
            data = record_bytes(msg.content.array_records[key], total.cipher.stype)
            total.add(data)
        except (CiphertextError, KeyError) as exc:
            self._reject(base, f"malformed {what}: {exc}")
            return False
        self._record({**base, "status": "accepted", "reason": "", "bytes": len(data)})
        return True

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        total = self._accumulate("train", server_round, replies, "update")
        metrics = MetricRecord({"accepted": total.terms})
        if total.terms < self.cfg.min_train_clients:
            log.warning("round %d: %d accepted updates < min-train-clients=%d; keeping the previous model",
                        server_round, total.terms, self.cfg.min_train_clients)
            return None, metrics
        self.state.model, self.state.model_terms = total.serialize(), total.terms
        self.state.tail = [*self.state.tail, (server_round, self.state.model, total.terms)][-self.cfg.average_last:]
        atomic_write(self.out / "aggregates" / f"model_round_{server_round:03d}.bin", self.state.model)
        atomic_write(self.out / "aggregates" / "model.bin", self.output_model()[0])
        return bytes_record(self.state.model, total.cipher.stype), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        total = self._accumulate("evaluate", server_round, replies, "metrics")
        if total.terms == 0:
            return None
        atomic_write(self.out / "aggregates" / f"metrics_round_{server_round:03d}.bin", total.serialize())
        return MetricRecord({"terms": total.terms})

    # -- the run -----------------------------------------------------------------------------
    def _node_of(self, reply: Message) -> int:
        """The node a reply answers for: the addressee of the message it replies to (an error
        reply made by the SuperLink for a node that is gone carries the SuperLink's id)."""
        return self._addressee.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _stream(self, grid: Grid, messages: list[Message], kind: str, server_round: int,
                record_missing: bool = True) -> Iterator[Message]:
        """Push, then yield replies as they arrive; at the end, ledger as ``missing`` the nodes
        that did not answer before the timeout and those Flower reported gone.

        A node whose heartbeats stopped gets an error reply from the SuperLink
        (``NODE_UNAVAILABLE``, after Flower's heartbeat patience): the wait for it ends then,
        not at the timeout. ``missing`` lines record an absence (no data, no budget spent on
        the server's side), so they are written once the wait is over."""
        ids = list(grid.push_messages(messages))
        pending = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages) if mid}
        self._addressee = dict(pending)
        offline: list[tuple[int, str]] = []
        deadline = time.monotonic() + self.cfg.round_timeout
        pause = POLL_MIN_S
        while pending and time.monotonic() < deadline:
            got = list(grid.pull_messages(list(pending)))
            for msg in got:
                node = pending.pop(msg.metadata.reply_to_message_id, None)
                if gone(msg) and node is not None:
                    offline.append((node, f"node offline (no heartbeat within Flower's patience): {msg.error.reason}"))
                    continue
                yield msg
            # poll fast while replies come, back off while none do (each poll of a deployed
            # SuperLink is an HTTPS request)
            pause = POLL_MIN_S if got else min(2 * pause, POLL_MAX_S)
            if not got:
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        if not record_missing:
            return
        late = [(node, f"no reply within round-timeout={self.cfg.round_timeout}s") for node in pending.values()]
        for node, reason in sorted(offline + late):
            role, country = self.state.roles.get(node, ("?", f"node-{node}"))
            self._reject({"kind": kind, "round": server_round, "node_id": node, "country": country},
                         reason, status="missing")

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        """SuperNodes connect over time: wait for ``min-nodes`` of them (0: until their number has
        not changed for a few seconds), at most ``round-timeout``."""
        want, settle = self.cfg.min_nodes, 5.0
        deadline = time.monotonic() + self.cfg.round_timeout
        last, since = -1, time.monotonic()
        while True:
            nodes = sorted(grid.get_node_ids())
            now = time.monotonic()
            if len(nodes) != last:
                last, since = len(nodes), now
            if (want and len(nodes) >= want) or (not want and nodes and now - since >= settle):
                return nodes
            if now > deadline:
                raise RuntimeError(f"{len(nodes)} SuperNodes connected within round-timeout="
                                   f"{self.cfg.round_timeout}s; min-nodes={want}")
            time.sleep(0.2)

    def setup(self, grid: Grid) -> None:
        """Round 0: learn each node's role and country, and sum the training clients' statistics
        (then, in two-stage DP runs, their second-stage statistics: :meth:`_refine`)."""
        nodes = self._wait_for_nodes(grid)
        msgs = [Message(content=RecordDict({"config": ConfigRecord({"server-round": 0})}), message_type=SETUP,
                        dst_node_id=n) for n in nodes]
        total = SecureSum(self.cipher_for("stats"))
        for msg in self._stream(grid, msgs, "setup", 0):
            node = self._node_of(msg)
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
            if not self._add(total, msg, "stats", base, "statistics"):
                self.state.roles[node] = ("excluded", base["country"])
        if total.terms < self.cfg.min_train_clients:
            raise RuntimeError(f"only {total.terms} training clients answered the setup "
                               f"(min-train-clients={self.cfg.min_train_clients})")
        self._keep_stage(total)
        for stage in range(2, self.cfg.stats_releases + 1):
            self._refine(grid, stage)
        log.info("setup: %d training and %d evaluation clients", len(self._nodes("train")), len(self._nodes("test")))

    def _keep_stage(self, total: SecureSum) -> None:
        """Keep the aggregate of the next statistics stage, and write it to ``aggregates/``."""
        data = total.serialize()
        self.state.stages.append((data, total.terms))
        atomic_write(self.out / "aggregates" / f"{stage_key(len(self.state.stages))}.bin", data)

    def _refine(self, grid: Grid, stage: int) -> None:
        """Round 0, statistics stage ``stage`` (2 or 3): the training clients whose statistics were
        summed release it, measured with the scaler of the aggregates of the earlier stages they receive."""
        records, terms = self._stats_content(stage - 1)
        content = RecordDict({"config": ConfigRecord({"server-round": 0, **terms}), **records})
        msgs = [Message(content=content, message_type=REFINE, dst_node_id=n) for n in self._nodes("train")]
        total = self._accumulate("stats", 0, self._stream(grid, msgs, "stats", 0), stage_key(stage),
                                 extra={"stage": stage})
        if total.terms < self.cfg.min_train_clients:
            raise RuntimeError(f"only {total.terms} training clients answered statistics stage {stage} "
                               f"(min-train-clients={self.cfg.min_train_clients})")
        self._keep_stage(total)

    # -- checkpoints ---------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds this run has taken so far, over every server that worked on it."""
        return self.elapsed_before + (time.monotonic() - self._t0)

    def checkpoint(self) -> Path:
        """Write the state after the setup (round 0) or a complete round; ``checkpoint.json`` is
        replaced last and atomically, so a crash leaves the previous checkpoint intact."""
        d = self.out / "checkpoint"
        d.mkdir(exist_ok=True)
        rnd = self.state.round
        files = {}
        blobs = [("model", self.state.model)] + [(stage_key(k), data) for k, (data, _) in enumerate(self.state.stages, 1)]
        for name, data in blobs:
            if data is not None:
                f = d / f"{name}-{rnd:04d}.bin"
                atomic_write(f, data)
                files[name] = {"file": f"checkpoint/{f.name}", "sha256": _sha256(data)}
        # the averaged global models: their round aggregates are already on disk (written
        # atomically, never rewritten for a checkpointed round), so only their hashes are recorded
        for r, data, _ in self.state.tail:
            files[f"tail-r{r:03d}"] = {"file": f"aggregates/model_round_{r:03d}.bin", "sha256": _sha256(data)}
        doc = {"format": CHECKPOINT_FORMAT, "round": rnd, "config_sha256": self.cfg.digest(),
               "fingerprint": self.fingerprint, "rounds": self.cfg.rounds,
               "roles": {str(n): [r, c] for n, (r, c) in sorted(self.state.roles.items())},
               "model_terms": self.state.model_terms, **self.state.stage_terms(), "files": files,
               "tail": [[r, terms] for r, _, terms in self.state.tail],
               "ledger": {"lines": self.ledger._seq, "last_hash": self.ledger._prev},
               "elapsed_s": self.elapsed(), "resumed_from": self.resumed_from}
        path = self.out / CHECKPOINT_FILE
        atomic_write(path, json.dumps(doc, indent=1, sort_keys=True).encode())
        keep = {Path(v["file"]).name for v in files.values()}
        for old in d.glob("*.bin"):
            if old.name not in keep:
                old.unlink(missing_ok=True)
        return path

    def load_checkpoint(self) -> dict | None:
        """Restore the state from ``checkpoint.json``; None if there is none. Raises
        :class:`CheckpointError` if it belongs to another job or does not match the ledger."""
        path = self.out / CHECKPOINT_FILE
        if not path.exists():
            return None
        try:
            ck = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is unreadable: {exc}") from exc
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: unknown checkpoint format {ck.get('format')!r}")
        if ck["config_sha256"] != self.cfg.digest():
            raise CheckpointError(f"{path} was written by a run with another config "
                                  f"(sha256 {ck['config_sha256'][:12]}…, this run {self.cfg.digest()[:12]}…): "
                                  "use another out-dir, or the same config to resume")
        if ck["fingerprint"] != self.fingerprint:
            raise CheckpointError(f"{path} was written under another public key or HE setting")
        records = read_ledger(self.ledger.path) if self.ledger.path.exists() else []
        n, last = ck["ledger"]["lines"], ck["ledger"]["last_hash"]
        if len(records) < n or (n and records[n - 1].get("hash") != last):
            raise CheckpointError(f"{self.ledger.path} does not contain the checkpoint's ledger line {n}: "
                                  "the ledger was cut or replaced since the checkpoint")
        data = {}
        for name, meta in ck["files"].items():
            blob = (self.out / meta["file"]).read_bytes()
            if _sha256(blob) != meta["sha256"]:
                raise CheckpointError(f"{meta['file']} does not match its SHA-256 in {path}")
            data[name] = blob
        self.state = ServerState(roles={int(k): (v[0], v[1]) for k, v in ck["roles"].items()},
                                 stages=[(data[stage_key(k)], ck[f"{stage_key(k)}_terms"])
                                         for k in itertools.takewhile(lambda k: stage_key(k) in data, itertools.count(1))],
                                 model=data.get("model"), model_terms=ck["model_terms"], round=ck["round"],
                                 tail=[(r, data[f"tail-r{r:03d}"], terms) for r, terms in ck.get("tail", [])])
        self.elapsed_before = float(ck.get("elapsed_s", 0.0))
        self.resumed_from = [*ck.get("resumed_from", []), ck["round"]]
        self._t0 = time.monotonic()
        self.ledger.append({"kind": "resume", "round": ck["round"], "checkpoint_lines": n,
                            "interrupted_lines": len(records) - n,
                            "reason": f"server restarted; resuming after round {ck['round']} from its checkpoint"
                                      + (f"; lines {n + 1}..{len(records)} belong to the interrupted round "
                                         f"{ck['round'] + 1} and are superseded by the lines that follow"
                                         if len(records) > n else "")})
        log.warning("resuming after round %d from %s", ck["round"], path)
        return ck

    def rebind(self, grid: Grid) -> None:
        """After a resume: ask nodes unknown to the checkpoint who they are (``query.role``) and
        give a known country's role to its new node id. Unknown countries take no part."""
        online = set(grid.get_node_ids())
        unknown = sorted(online - set(self.state.roles))
        if not unknown:
            return
        by_country = {c: (n, r) for n, (r, c) in self.state.roles.items()}
        msgs = [Message(content=RecordDict({"config": ConfigRecord({"server-round": self.state.round})}),
                        message_type=ROLE, dst_node_id=n) for n in unknown]
        for msg in self._stream(grid, msgs, "role", self.state.round, record_missing=False):
            node = self._node_of(msg)
            if msg.has_error():
                log.warning("node %d did not say who it is: %s", node, msg.error.reason)
                continue
            meta = dict(msg.content.config_records["meta"])
            country, role = meta.get("country"), meta.get("role")
            if country not in by_country or by_country[country][1] != role or meta.get("fingerprint") != self.fingerprint:
                log.warning("node %d (%s) is not a %s client of this run's setup; it takes no part", node, country, role)
                continue
            old, _ = by_country[country]
            self.state.roles.pop(old, None)
            self.state.roles[node] = (role, country)
            log.warning("%s is now node %d (was %d)", country, node, old)

    # -- the run ---------------------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None) -> Result:
        num_rounds = num_rounds or self.cfg.rounds
        self.summary()
        self._t0 = time.monotonic()
        if self.load_checkpoint() is not None:
            self.rebind(grid)
        else:
            self.setup(grid)
            self.checkpoint()
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
            self.checkpoint()
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
                "model_terms": self.state.model_terms,
                # the rounds whose global models the evaluated model averages (average-last)
                "model_rounds": self.state.tail_rounds()}


def _facts(meta: dict, base: dict) -> dict:
    """The privacy facts a client reports, restricted to known keys (a client cannot overwrite
    the server's own fields such as kind, round or status), with the client's attestation of
    them (:mod:`carbonfed.privacy.attest`) when it sent one."""
    try:
        facts = json.loads(meta.get("facts", "{}"))
    except (TypeError, ValueError):
        return {}
    if not isinstance(facts, dict):
        return {}
    out = {k: v for k, v in reported_facts(facts).items() if k not in base}
    if isinstance(meta.get(ATTESTATION), str):
        out[ATTESTATION] = meta[ATTESTATION]
    return out

"""Round 0: who is who, and the federated statistics release; after a resume, who is who again.

Guarantees
----------
* The setup waits for ``min-nodes`` SuperNodes (0: until their number has not changed for a few
  seconds), at most the round timeout, then asks each one its role, country and key fingerprint
  (``query.setup``). A node under another key or HE setting takes no part.
* The training clients' stage-1 statistics are summed as ciphertexts; in DP runs of more stages,
  stages 2 and 3 follow (``query.refine``), each measured with the scaler of the aggregates of
  the stages before it. Each reply gets one ``stats`` ledger line (missing nodes: one ``setup``
  or ``stats`` line). A training client whose statistics are malformed is excluded from the run.
* A stage with fewer than ``min-train-clients`` accepted releases stops the run (RuntimeError):
  no aggregate that could expose single clients is ever kept.
* :func:`rebind` (after a resume) asks the nodes unknown to the checkpoint who they are
  (``query.role``: no data, no budget) and gives a known country's role to its new node id;
  unknown countries take no part.
* Masked runs (``masks``, HE; issue 22): the statistics are the ``stats`` mask stream
  (:class:`~carbonfed.federation.server.masking.ServerMasks`). The setup first asks every node who it
  is (``query.role``: no data), collects the training clients' adverts and stage-1 bundles, then
  sends the setup with ``mask-shared``; each stage's sum is kept only once unmasked (its unmask
  exchange collects the next stage's bundles), and a ``stats-masks`` line says who was summed, or
  why the stage was not unmasked (then, below ``min-train-clients``, the run stops). A training
  client whose bundle was not accepted cannot release masked statistics: it takes no part.
* A node that refused the setup, answered under another key, claimed a role its charter does
  not give it, or whose statistics were malformed or not signed as they must be, is ``excluded``:
  it gets no further request but :func:`close`, which asks every node of the setup (excluded or
  not) for its closing statement, so that each client's signed history ends in the ledger.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from carbonfed.federation.server.courier import Courier
from carbonfed.federation.server.masking import ServerMasks
from carbonfed.federation.server.recorder import LedgerRecorder
from carbonfed.federation.server.strategy import EncryptedFedAvg
from carbonfed.federation.server.strategy_utils import add_reply
from carbonfed.federation.wire import CLOSE, REFINE, ROLE, SETUP, record_bytes, stage_key
from carbonfed.privacy.he import CiphertextError
from carbonfed.privacy.secure_sum import SecureSum

log = logging.getLogger("carbonfed")

SETTLE_S = 5.0   # with min-nodes 0: the node count must stay the same this long


def wait_for_nodes(grid: Grid, want: int, timeout: float) -> list[int]:
    """The SuperNodes connected once ``want`` of them are (0: once their number has not changed
    for ``SETTLE_S`` seconds); RuntimeError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        now = time.monotonic()
        if len(nodes) != last:
            last, since = len(nodes), now
        if (want and len(nodes) >= want) or (not want and nodes and now - since >= SETTLE_S):
            return nodes
        if now > deadline:
            raise RuntimeError(f"{len(nodes)} SuperNodes connected within round-timeout="
                               f"{timeout}s; min-nodes={want}")
        time.sleep(0.2)


def _request(kind: str, rnd: int, nodes: list[int], **config) -> list[Message]:
    """One ``kind`` query of round ``rnd`` per node, with ``config`` beside the round number."""
    return [Message(content=RecordDict({"config": ConfigRecord({"server-round": rnd, **config})}),
                    message_type=kind, dst_node_id=n) for n in nodes]


def _exclusion(recorder: LedgerRecorder, meta: dict, base: dict) -> tuple[str, str] | None:
    """(status, reason) if the node that answered the setup with ``meta`` takes no part."""
    fedavg, role = recorder.strategy, meta.get("role")
    charter_role = fedavg.charter.roles.get(base["country"]) if fedavg.charter is not None else role
    if meta.get("status") == "refused":
        return "refused", meta.get("reason", "refused")
    if meta.get("fingerprint") != fedavg.fingerprint:
        return "rejected", "key fingerprint differs from the server's public context"
    if role != charter_role:
        return "rejected", f"says it is a {role} client; the charter makes it a {charter_role} client"
    why = recorder.screen_reply(meta, base) if role == "train" else None
    return ("rejected", f"signed statement: {why}") if why else None


def _setup_reply(recorder: LedgerRecorder, total: SecureSum, contributors: list[str], msg: Message,
                 kept: dict[str, bytes] | None = None) -> None:
    """Learn the role and country of the node that sent ``msg``; add its statistics (a training
    client) into ``total`` (and keep its ciphertext in ``kept``); ledger what was made of it."""
    fedavg, node = recorder.strategy, recorder.node_of(msg)
    base = recorder.line("stats", 0, node, country=f"node-{node}")
    if msg.has_error():
        recorder.reject(base, f"client error: {msg.error.reason}")
        return
    meta = dict(msg.content.config_records["meta"])
    base["country"] = meta.get("country", base["country"])
    excluded = _exclusion(recorder, meta, base)
    if excluded:
        fedavg.state.roles[node] = ("excluded", base["country"])
        if meta.get("role") != "train":
            base["kind"] = "setup"          # a held-out client's setup carries no statement
        recorder.reject(recorder.with_facts(base, meta, excluded[0]), excluded[1], excluded[0])
        return
    fedavg.state.roles[node] = (meta["role"], base["country"])
    if meta["role"] != "train":
        return
    recorder.with_facts(base, meta, "accepted")
    try:
        recorder.accept(base, add_reply(total, msg, "stats"))
        contributors.append(base["country"])
        if kept is not None:
            kept[base["country"]] = record_bytes(msg.content.array_records["stats"], total.cipher.stype)
    except (CiphertextError, KeyError) as exc:
        recorder.reject(base, f"malformed statistics: {exc}")
        fedavg.state.roles[node] = ("excluded", base["country"])


def setup(grid: Grid, courier: Courier, recorder: LedgerRecorder) -> None:
    """Round 0: learn each node's role and country, and sum the training clients' statistics
    (then, in DP runs of more stages, their later stages: :func:`refine`)."""
    fedavg = recorder.strategy
    cfg = fedavg.cfg
    nodes = wait_for_nodes(grid, cfg.min_nodes, courier.timeout)
    masks, config = stats_masks(grid, courier, recorder, nodes), {}
    if masks is not None:
        config["mask-shared"] = json.dumps(masks.shared(1))
    total, contributors, kept = SecureSum(fedavg.cipher_for("stats")), [], None if masks is None else {}
    for msg in courier.stream(grid, _request(SETUP, 0, nodes, **config), partial(recorder.missing, "setup", 0)):
        _setup_reply(recorder, total, contributors, msg, kept)
    if masks is not None:
        total, contributors = unmask_stage(masks, recorder, 1, total, kept, contributors)
    if total.terms < max(1, cfg.min_train_clients):
        raise RuntimeError(f"only {total.terms} training clients answered the setup "
                           f"(min-train-clients={cfg.min_train_clients})")
    fedavg.keep_stage(total, contributors)
    for stage in range(2, cfg.stats_releases + 1):
        refine(grid, courier, recorder, stage, masks)
    log.info("setup: %d training and %d evaluation clients", len(fedavg.nodes("train")), len(fedavg.nodes("test")))


def refine(grid: Grid, courier: Courier, recorder: LedgerRecorder, stage: int, masks: ServerMasks | None = None) -> None:
    """Round 0, statistics stage ``stage`` (2 or 3): the training clients whose statistics were
    summed release it, measured with the scaler of the aggregates of the earlier stages they receive
    (``masks``: the ``stats`` stream; only the clients whose stage bundles were accepted are asked)."""
    fedavg = recorder.strategy
    records, terms = fedavg.stats_content(stage - 1)
    nodes = fedavg.nodes("train") if masks is None else masks.restrict(stage, terms, fedavg.nodes("train"))
    content = RecordDict({"config": ConfigRecord({"server-round": 0, **terms}), **records})
    msgs = [Message(content=content, message_type=REFINE, dst_node_id=n) for n in nodes]
    replies = courier.stream(grid, msgs, partial(recorder.missing, "stats", 0))
    contributors: list[str] = []
    kept = None if masks is None else {}
    total = recorder.accumulate_stage(stage, stage_key(stage), replies, contributors, kept)
    if masks is not None:
        total, contributors = unmask_stage(masks, recorder, stage, total, kept, contributors)
    if total.terms < max(1, fedavg.cfg.min_train_clients):
        raise RuntimeError(f"only {total.terms} training clients answered statistics stage {stage} "
                           f"(min-train-clients={fedavg.cfg.min_train_clients})")
    fedavg.keep_stage(total, contributors)


def stats_masks(grid: Grid, courier: Courier, recorder: LedgerRecorder, nodes: list[int]) -> ServerMasks | None:
    """The ``stats`` mask stream of a masked run (None otherwise), with the stage-1 bundles: the
    nodes say who they are first (``query.role``: no data, no budget), so that the training
    clients' adverts and bundles can be asked before their statistics."""
    fedavg = recorder.strategy
    masks = ServerMasks.for_run(fedavg, recorder, grid, courier, "stats")
    if masks is None:
        return None
    train = {}
    for node, country, role in identities(grid, courier, 0, nodes, fedavg.fingerprint):
        if role == "train" and fedavg.charter.roles.get(country) == "train" and country not in train:
            train[country] = node
    masks.nodes = train
    masks.begin(1)
    return masks


def unmask_stage(masks: ServerMasks, recorder: LedgerRecorder, stage: int, total: SecureSum, kept: dict[str, bytes],
                 contributors: list[str]) -> tuple[SecureSum, list[str]]:
    """Statistics stage ``stage``'s sum unmasked (empty if it cannot be) and its contributors; a
    ``stats-masks`` line with the stage's masks block."""
    total, summed = masks.unmask(stage, total, kept)
    block, masks.last = masks.last, None
    recorder.record({"kind": "stats-masks", **block, "round": 0, "stage": stage})
    return total, [c for c in contributors if c in summed]


def identities(grid: Grid, courier: Courier, rnd: int, nodes: list[int], fingerprint: str):
    """``(node, country, role)`` of each of ``nodes`` that says who it is (``query.role``: no data,
    no budget) under the run's key ``fingerprint``; the others are logged and skipped."""
    for msg in courier.stream(grid, _request(ROLE, rnd, nodes)):
        node = courier.node_of(msg)
        if msg.has_error():
            log.warning("node %d did not say who it is: %s", node, msg.error.reason)
            continue
        meta = dict(msg.content.config_records["meta"])
        if meta.get("fingerprint") != fingerprint:
            log.warning("node %d (%s) answers under another key; it takes no part", node, meta.get("country"))
            continue
        yield node, meta.get("country"), meta.get("role")


def rebind(grid: Grid, courier: Courier, fedavg: EncryptedFedAvg) -> None:
    """After a resume: ask nodes unknown to the checkpoint who they are (``query.role``) and
    give a known country's role to its new node id. Unknown countries take no part."""
    roles = fedavg.state.roles
    unknown = sorted(set(grid.get_node_ids()) - set(roles))
    if not unknown:
        return
    by_country = {c: (n, r) for n, (r, c) in roles.items()}
    for node, country, role in identities(grid, courier, fedavg.state.round, unknown, fedavg.fingerprint):
        if country not in by_country or by_country[country][1] != role:
            log.warning("node %d (%s) is not a %s client of this run's setup; it takes no part", node, country, role)
            continue
        old, _ = by_country[country]
        roles.pop(old, None)
        roles[node] = (role, country)
        log.warning("%s is now node %d (was %d)", country, node, old)


def close(grid: Grid, courier: Courier, recorder: LedgerRecorder) -> None:
    """After the last round: every node of the setup (``query.close``) signs its final history; a
    ``close`` line per reply, a ``missing`` one per node that did not answer."""
    fedavg = recorder.strategy
    rnd = fedavg.state.round
    nodes = sorted(fedavg.state.roles)
    for msg in courier.stream(grid, _request(CLOSE, rnd, nodes), partial(recorder.missing, "close", rnd)):
        recorder.record_close(rnd, msg)

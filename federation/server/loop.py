"""ResumableRun: the server's run of :class:`EncryptedFedAvg`, round by round, resumable.

Flower's ``Strategy.start`` sends each round with ``send_and_receive``; this run replaces it
because it must make the setup round 0 first, stream replies (:class:`Courier`), write the
ledger (:class:`LedgerRecorder`) and checkpoint after every round. It wraps the recorder, which
wraps the algorithm: ``ResumableRun(EncryptedFedAvg(...)).start(grid)``.

Guarantees
----------
* After the setup and after every round a checkpoint is written
  (:mod:`~carbonfed.federation.server.checkpoint`), after the round's ``round`` ledger line, so
  nothing recorded is lost if the server stops.
* A server started again on the same out-dir with the same config and key resumes after the last
  complete round: no second statistics release, rounds 1..R each summarised once, the ledger
  chain continued (a ``resume`` line says from where, and how many lines of the interrupted round
  precede it); the nodes that reconnected under new ids are bound to their countries again. A
  checkpoint of another config or key, or a ledger that no longer contains the checkpoint's last
  line, is refused (:class:`~carbonfed.federation.server.checkpoint.CheckpointError`), and so is
  a checkpoint written under another charter.
* After the last round every client of the setup is asked for its closing statement
  (:func:`~carbonfed.federation.server.setup.close`): its signed history then ends in the ledger,
  whatever the server wrote before.
* In a masked run (:mod:`~carbonfed.federation.server.masking`) the training clients' mask adverts
  and the first round's bundles are collected after the setup (again after a resume), and so are
  the held-out clients' (the ``metrics`` stream); each round's uploads carry the next round's
  bundles (a client whose bundle did not come is asked for it in the round's unmask exchange).
  (The statistics' ``stats`` stream is the setup's: :mod:`.setup`.)
* :meth:`ResumableRun.start` honours ``num_rounds`` (default: the config's rounds), ``timeout``
  (default: the config's round timeout; it bounds every wait for replies and for the nodes) and
  the train and evaluate configs (sent beside the server's own entries); it refuses
  (ValueError) an ``initial_arrays`` or an ``evaluate_fn``, which a server without the key
  cannot use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from carbonfed.federation.server.checkpoint import CHECKPOINT_FILE, CheckpointError, read_checkpoint, write_checkpoint
from carbonfed.federation.server.courier import Courier, Pushed
from carbonfed.federation.server.masking import ServerMasks
from carbonfed.federation.server.recorder import LedgerRecorder
from carbonfed.federation.server.setup import close, rebind, setup
from carbonfed.federation.server.strategy import EncryptedFedAvg
from carbonfed.federation.server.strategy_utils import StrategyWrapper
from carbonfed.privacy.ledger import Ledger

log = logging.getLogger("carbonfed")


def check_start(initial_arrays: ArrayRecord | None, timeout: float | None,
                evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None) -> None:
    """Refuse (ValueError) the arguments of Flower's ``Strategy.start`` that this run cannot honour."""
    if initial_arrays is not None and len(initial_arrays):
        raise ValueError("initial_arrays must be None: each client builds the initial model from the run's seed "
                         "and the released class frequencies, and the server holds ciphertexts only")
    if evaluate_fn is not None:
        raise ValueError("evaluate_fn must be None: the server holds no key, so it cannot evaluate the model "
                         "centrally; the held-out clients evaluate it every round")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")


class ResumableRun(StrategyWrapper):
    """Setup or resume, then rounds of train and evaluate, each recorded and checkpointed."""

    def __init__(self, fedavg: EncryptedFedAvg, on_round: Callable[[dict], None] | None = None):
        """``on_round`` receives each round's summary line (progress display)."""
        self.fedavg = fedavg
        self.courier = Courier(fedavg.cfg.round_timeout)
        self.recorder = LedgerRecorder(fedavg, Ledger(fedavg.out / "ledger.jsonl"), self.courier.node_of)
        super().__init__(self.recorder)
        self.on_round = on_round
        self.resumed_from: list[int] = []    # rounds this server resumed after (from checkpoints)
        self.elapsed_before = 0.0            # seconds spent by earlier servers of this run
        self._pushed: dict[int, Pushed] = {}   # a round's training request pushed early (masks)
        self._t0 = time.monotonic()

    def elapsed(self) -> float:
        """Seconds this run has taken so far, over every server that worked on it."""
        return self.elapsed_before + (time.monotonic() - self._t0)

    def checkpoint(self) -> Path:
        """Write the checkpoint of the state as it stands (after the setup or a complete round)."""
        fedavg = self.fedavg
        return write_checkpoint(fedavg.out, fedavg.state, fedavg.cfg, fedavg.fingerprint, self.recorder.ledger,
                                self.elapsed(), self.resumed_from)

    def resume(self) -> bool:
        """Restore the state from the out-dir's checkpoint and ledger that this server resumes;
        False if there is none. Raises CheckpointError if it cannot be resumed."""
        fedavg = self.fedavg
        res = read_checkpoint(fedavg.out, fedavg.cfg, fedavg.fingerprint, self.recorder.ledger.path)
        if res is None:
            return False
        if res.state.charter != self.charter_sha256():
            raise CheckpointError(f"{fedavg.out / CHECKPOINT_FILE} was written under another charter "
                                  f"({res.state.charter[:12] or 'none'}…, this run {self.charter_sha256()[:12] or 'none'}…)")
        fedavg.state = res.state
        self.elapsed_before, self.resumed_from = res.elapsed_s, res.resumed_from
        self._t0 = time.monotonic()
        self.recorder.ledger.append(res.line)
        log.warning("resuming after round %d from %s", res.state.round, fedavg.out / CHECKPOINT_FILE)
        return True

    def charter_sha256(self) -> str:
        """The SHA-256 of the run's charter ("" without one)."""
        return self.fedavg.charter.sha256 if self.fedavg.charter is not None else ""

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Run (or resume) the federation up to round ``num_rounds``; the aggregates per round."""
        check_start(initial_arrays, timeout, evaluate_fn)
        if timeout is not None:
            self.courier.timeout = timeout
        num_rounds = num_rounds or self.fedavg.cfg.rounds
        self.summary()
        self._t0 = time.monotonic()
        if self.resume():
            rebind(grid, self.courier, self.fedavg)
        else:
            self.fedavg.state.charter = self.charter_sha256()
            setup(grid, self.courier, self.recorder)
            self.checkpoint()
        self.fedavg.masks = ServerMasks.for_run(self.fedavg, self.recorder, grid, self.courier)
        self.fedavg.metric_masks = ServerMasks.for_run(self.fedavg, self.recorder, grid, self.courier, "metrics")
        for masks in (self.fedavg.masks, self.fedavg.metric_masks):
            if masks is not None and self.fedavg.state.round < num_rounds:
                masks.begin(self.fedavg.state.round + 1)    # adverts, then the next round's bundles
        result = Result()
        for rnd in range(self.fedavg.state.round + 1, num_rounds + 1):
            self._round(grid, rnd, result, train_config or ConfigRecord(), evaluate_config or ConfigRecord(),
                        last=rnd == num_rounds)
        close(grid, self.courier, self.recorder)
        self.checkpoint()                    # its ledger position: the closing lines
        return result

    def _round(self, grid: Grid, rnd: int, result: Result, train_config: ConfigRecord,
               evaluate_config: ConfigRecord, last: bool = False) -> None:
        """Round ``rnd``: train, evaluate, the ``round`` line, the checkpoint, then ``on_round``.
        In a masked run the next round's training request is pushed while the evaluation counts'
        masks are removed (their last exchange; the request needs only the round's model): its
        replies are read once this round is closed, and the lines its making records (the masks'
        refusals of round ``rnd + 1``) are held until then."""
        t0 = time.monotonic()
        self.recorder.begin_round()
        pushed = self._pushed.pop(rnd, None)
        if pushed is None:
            pushed = self.courier.push(grid, list(self.configure_train(rnd, ArrayRecord(), train_config, grid)))
        replies = self.courier.collect(grid, pushed, partial(self.recorder.missing, "train", rnd))
        arrays, train_metrics = self.aggregate_train(rnd, replies)
        if arrays is not None:
            result.arrays = arrays
        result.train_metrics_clientapp[rnd] = train_metrics
        eval_msgs = list(self.configure_evaluate(rnd, ArrayRecord(), evaluate_config, grid))
        replies = self.courier.stream(grid, eval_msgs, partial(self.recorder.missing, "evaluate", rnd))
        masks = self.fedavg.metric_masks
        if masks is not None and not last:
            masks.alongside = partial(self._push_train, grid, rnd + 1, train_config)
        try:
            eval_metrics = self.aggregate_evaluate(rnd, replies)
        finally:
            if masks is not None:
                masks.alongside = None
        if eval_metrics is not None:
            result.evaluate_metrics_clientapp[rnd] = eval_metrics
        self.fedavg.state.round = rnd
        summary = self.recorder.close_round(rnd, time.monotonic() - t0)
        self.checkpoint()
        if self.on_round:
            self.on_round(summary)

    def _push_train(self, grid: Grid, rnd: int, train_config: ConfigRecord) -> None:
        """Push round ``rnd``'s training request now (:meth:`_round` reads its replies)."""
        with self.recorder.holding():
            msgs = list(self.configure_train(rnd, ArrayRecord(), train_config, grid))
        self._pushed[rnd] = self.courier.push(grid, msgs)

"""Helpers of the server's strategies (as Flower keeps its own in ``strategy_utils``).

Guarantees
----------
* :class:`StrategyWrapper` hands every Strategy call to the inner strategy unchanged: a wrapper
  (the ledger recorder, the resumable run) overrides only the calls it adds something to, the
  way Flower's ``DifferentialPrivacyServerSideFixedClipping`` wraps an inner strategy.
* :func:`add_reply` adds one reply's vector into a running sum, or raises and leaves the sum as
  it was: a malformed or foreign ciphertext never reaches the aggregate.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NoReturn

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from carbonfed.federation.wire import record_bytes
from carbonfed.privacy.secure_sum import SecureSum


class StrategyWrapper(Strategy):
    """A strategy that adds a concern around an inner ``strategy`` and otherwise is it."""

    def __init__(self, strategy: Strategy):
        """Wrap ``strategy`` (kept as :attr:`strategy`)."""
        self.strategy = strategy

    def summary(self) -> None:
        """The inner strategy's summary."""
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The inner strategy's training requests."""
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The inner strategy's evaluation requests."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The inner strategy's aggregate of the training replies."""
        return self.strategy.aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The inner strategy's aggregate of the evaluation replies."""
        return self.strategy.aggregate_evaluate(server_round, replies)


def refuse_start(strategy: Strategy) -> NoReturn:
    """Flower's own loop (``Strategy.start``) cannot run carbonfed's strategies: the setup round 0
    must come before the first training round. Raises TypeError naming the run that does."""
    raise TypeError(f"{type(strategy).__name__} runs inside carbonfed.federation.server.loop.ResumableRun, "
                    "which makes the setup round before the first training round; start that instead")


def add_reply(total: SecureSum, msg: Message, key: str) -> int:
    """Add the reply's ``key`` vector into ``total``; its size in bytes. Raises KeyError (no such
    record) or CiphertextError (malformed, foreign, wrong length or type), ``total`` unchanged."""
    data = record_bytes(msg.content.array_records[key], total.cipher.stype)
    total.add(data)
    return len(data)

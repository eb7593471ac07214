"""The Courier: pushes one request to its nodes and yields the replies as they arrive.

Flower's ``Grid.send_and_receive`` waits for every reply (or the timeout) before it returns; the
server here streams instead, so that each reply is added and dropped as it comes, and so that a
node Flower reports gone ends the wait for it at once.

Guarantees
----------
* :meth:`Courier.stream` yields each reply at most once, as soon as a poll returns it, and stops
  when every addressed node has answered or ``timeout`` seconds have passed.
* A node whose heartbeats stopped gets an error reply from the SuperLink (``NODE_UNAVAILABLE``,
  after Flower's heartbeat patience): the wait for it ends then, not at the timeout; that reply
  is not yielded.
* Once the wait is over, ``on_missing(node, reason)`` is called, in node order, for every node
  Flower reported gone and every node that did not answer in time.
* :meth:`Courier.node_of` names the node a reply answers for, even for an error reply made by
  the SuperLink (which carries the SuperLink's id), for every request pushed and not yet collected.
* :meth:`Courier.push` then :meth:`Courier.collect` is :meth:`Courier.stream` in two steps: a
  request pushed early (the next round's training, while the masks' last exchange of a round is
  under way) keeps its replies in the SuperLink until collected; the timeout counts from the
  collection.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid

from carbonfed.federation.wire import gone

# Pause between polls for replies: POLL_MIN_S while replies come or came within IDLE_S, then backing
# off to POLL_MAX_S (each poll of a deployed SuperLink is an HTTPS request; each poll of the simulation's
# scans every stored message, on the clients' cores). 0.03 s rather than the 0.1 s of Flower's own
# in-memory Grid: a round has 2 to 4 exchanges, and each ended on average half a pause after its last
# reply (bench/mask_cost.py, idle: 2.04 / 3.48 s per unmasked / masked round against 2.14-2.26 / 3.64-3.80).
POLL_MIN_S, POLL_MAX_S, IDLE_S = 0.03, 0.5, 1.0


Pushed = dict[str, int]     # a request pushed and not yet collected: {message id: addressed node}


class Courier:
    """Streams requests through a Flower Grid; ``timeout`` (seconds) bounds each wait."""

    def __init__(self, timeout: float):
        """No request under way; every wait lasts at most ``timeout`` seconds."""
        self.timeout = timeout
        self._addressee: dict[str, int] = {}   # message id -> node it was sent to (requests not collected)

    def node_of(self, reply: Message) -> int:
        """The node a reply answers for: the addressee of the message it replies to (an error
        reply made by the SuperLink for a node that is gone carries the SuperLink's id)."""
        return self._addressee.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def stream(self, grid: Grid, messages: list[Message],
               on_missing: Callable[[int, str], None] | None = None) -> Iterator[Message]:
        """Push ``messages``, then yield replies as they arrive; at the end, report the absent
        nodes to ``on_missing``."""
        return self.collect(grid, self.push(grid, messages), on_missing)

    def push(self, grid: Grid, messages: list[Message]) -> Pushed:
        """Push ``messages`` now; :meth:`collect` their replies later."""
        ids = list(grid.push_messages(messages))
        pushed = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages) if mid}
        self._addressee.update(pushed)
        return pushed

    def collect(self, grid: Grid, pushed: Pushed,
                on_missing: Callable[[int, str], None] | None = None) -> Iterator[Message]:
        """Yield the replies to a pushed request as they arrive; at the end, report the absent
        nodes to ``on_missing``."""
        try:
            yield from self._collect(grid, dict(pushed), on_missing)
        finally:
            for mid in pushed:
                self._addressee.pop(mid, None)

    def _collect(self, grid: Grid, pending: dict[str, int],
                 on_missing: Callable[[int, str], None] | None) -> Iterator[Message]:
        offline: list[tuple[int, str]] = []
        deadline = time.monotonic() + self.timeout
        pause, next_poll, last_reply = POLL_MIN_S, time.monotonic(), time.monotonic()
        while pending and time.monotonic() < deadline:
            wait = min(next_poll, deadline) - time.monotonic()
            if wait > 0:
                time.sleep(wait)     # never poll again at once: replies that come meanwhile arrive together
            polled = time.monotonic()
            got = list(grid.pull_messages(list(pending)))
            for msg in got:
                node = pending.pop(msg.metadata.reply_to_message_id, None)
                if gone(msg) and node is not None:
                    offline.append((node, f"node offline (no heartbeat within Flower's patience): {msg.error.reason}"))
                    continue
                yield msg
            last_reply = polled if got else last_reply
            pause = POLL_MIN_S if polled - last_reply < IDLE_S else min(2 * pause, POLL_MAX_S)
            next_poll = polled + pause
        if on_missing is None:
            return
        late = [(node, f"no reply within round-timeout={self.timeout}s") for node in pending.values()]
        for node, reason in sorted(offline + late):
            on_missing(node, reason)

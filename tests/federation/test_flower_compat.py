"""The simulation's message lookup (:func:`carbonfed.federation.flower_compat._next_messages`) against
Flower 1.42.0's own ``InMemoryLinkState.get_message_ins``, its dispatcher woken by a push
(:func:`~carbonfed.federation.flower_compat._extract_on_push`) against ``vce_api.add_messages_to_queue``,
and the backend drained before Ray stops (:class:`~carbonfed.federation.flower_compat._Drain`), on real
link states built as the simulation engine builds them (``flwr.simulation.run_simulation._run_simulation``)."""

import queue
import threading
import time

import pytest

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import RUN_ID_NUM_BYTES, TASK_ID_NUM_BYTES
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState, RunRecord
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid
from flwr.proto.task_pb2 import Task  # noqa: E402  (Flower internals, as the engine)
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes, add_messages_to_queue

from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

from carbonfed.federation.flower_compat import (_Drain, _extract_on_push, _next_messages, _waking,
                                                act_as_server_app)

ORIGINAL = InMemoryLinkState.get_message_ins


def _state_with_messages(plan: list[tuple[int, int]]):
    """A link state of 5 nodes and one run; ``plan``: (node index, ttl seconds) per message, pushed in order."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    nodes = sorted(_register_nodes(5, factory))
    act_as_server_app(run.run_id)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    msgs = [Message(RecordDict({"c": ConfigRecord({"k": k})}), dst_node_id=nodes[i], message_type="query", ttl=ttl)
            for k, (i, ttl) in enumerate(plan)]
    ids = list(grid.push_messages(msgs))
    assert all(ids)
    _state_with_messages.grid = grid             # (the last one made: a test that pushes more)
    return state, nodes


def test_one_pass_hands_each_node_what_flowers_lookup_does_node_by_node():
    """:func:`_next_messages` (one pass over the store) gives, sweep after sweep, the messages that
    Flower's own ``get_message_ins(node, limit=1)`` gives each node in turn, an expired one dropped."""
    plan = [(0, 1), (1, 60), (0, 60), (2, 60), (3, 1), (0, 60), (4, 60), (2, 60), (3, 60)]
    ours_state, nodes = _state_with_messages(plan)
    theirs_state, their_nodes = _state_with_messages(plan)
    time.sleep(1.1)
    for _ in range(4):
        ours = [m.content["c"]["k"] for m in _next_messages(ours_state, nodes)]
        theirs = [m.content["c"]["k"] for n in their_nodes for m in ORIGINAL(theirs_state, n, 1)]
        assert ours == theirs
    assert len(ours_state.message_ins_store) == len(theirs_state.message_ins_store) == len(plan) - 2
    assert all(m.metadata.delivered_at for m in ours_state.message_ins_store.values())


def _dispatched(extract, state, nodes, until: int, timeout: float = 10.0) -> tuple[list, threading.Event, queue.Queue]:
    """Run ``extract`` (a dispatcher: state, queue, nodes mapping, stop event) in a thread until ``until``
    messages are in its queue; their ``k``s in queue order, its stop event and its queue."""
    out, stop = queue.Queue(), threading.Event()
    threading.Thread(target=extract, args=(state, out, {n: i for i, n in enumerate(nodes)}, stop), daemon=True).start()
    got, end = [], time.monotonic() + timeout
    while len(got) < until and time.monotonic() < end:
        try:
            got.append(out.get(timeout=0.05).content["c"]["k"])
        except queue.Empty:
            pass
    return got, stop, out


def test_the_dispatcher_queues_what_flowers_does_and_a_push_wakes_it():
    """Each sweep queues each node's next message (one per node, in node order), as Flower's own
    dispatcher does; a message pushed while it waits is queued at once, not after its period, and
    one stored in the link state without a push waits for the period."""
    plan = [(0, 60), (1, 60), (0, 60), (2, 60), (3, 60), (0, 60), (4, 60), (2, 60)]
    state, nodes = _state_with_messages(plan)
    theirs, stop, _ = _dispatched(add_messages_to_queue, state, nodes, len(plan))
    stop.set()
    pushed = threading.Event()
    state, nodes = _state_with_messages(plan)
    grid = _state_with_messages.grid
    ours, stop, out = _dispatched(lambda *a: _extract_on_push(pushed, *a, period=60.0), state, nodes, 5)
    assert ours == theirs[:5] == [0, 1, 3, 4, 6]                 # the first sweep: one per node
    push = _waking(type(grid).push_messages, pushed)
    t0 = time.monotonic()
    push(grid, [Message(RecordDict({"c": ConfigRecord({"k": 99})}), dst_node_id=nodes[4], message_type="query",
                        ttl=60)])
    woken = [out.get(timeout=20).content["c"]["k"] for _ in range(3)]      # the next sweep, at once
    assert woken == [2, 7, 99] and time.monotonic() - t0 < 20               # (the period is 60 s)
    quiet = Message(RecordDict({"c": ConfigRecord({"k": 100})}), dst_node_id=nodes[1], message_type="query", ttl=60)
    type(grid).push_messages(grid, [quiet])                       # stored, but nobody woke the dispatcher
    with pytest.raises(queue.Empty):
        out.get(timeout=1.0)
    stop.set()
    pushed.set()


def test_a_stopping_backend_waits_for_the_calls_in_flight_and_starts_no_new_one():
    """Ray is shut down (``terminate``) only once the ClientApp call in flight has its result; a call
    that comes after the stop began is refused, not sent to a Ray about to go. The wrapped methods
    are Flower 1.42.0's ``RayBackend.process_message(message, context)`` and ``terminate()``."""
    import inspect

    assert list(inspect.signature(RayBackend.process_message).parameters) == ["self", "message", "context"]
    assert list(inspect.signature(RayBackend.terminate).parameters) == ["self"]
    drain, release, events = _Drain(timeout=30.0), threading.Event(), []

    def slow_call(backend, message, context):
        events.append("call started")
        release.wait(30)
        events.append("call ended")
        return message, context

    process, terminate = drain.counted(slow_call), drain.draining(lambda backend: events.append("ray shut down"))
    worker = threading.Thread(target=process, args=(None, "m", "c"))
    worker.start()
    while events != ["call started"]:
        time.sleep(0.01)
    stopper = threading.Thread(target=terminate, args=(None,))
    stopper.start()
    time.sleep(0.5)
    assert events == ["call started"] and stopper.is_alive()       # terminate waits for the call
    with pytest.raises(RuntimeError, match="stopping"):
        process(None, "late", "c")
    release.set()
    stopper.join(10)
    worker.join(10)
    assert events == ["call started", "call ended", "ray shut down"]

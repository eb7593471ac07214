"""The one place where carbonfed uses Flower internals (checked against Flower 1.42.0).

Everything else in carbonfed uses Flower's public API (``flwr.app``, ``flwr.serverapp``,
``flwr.clientapp``) or its command line (``flwr run``, ``flower-superlink``, ... in
:mod:`carbonfed.federation.deploy`). What the public API cannot do:

* **A simulation with a run config, from Python** (:func:`simulate`).
  ``flwr.simulation.run_simulation`` (public, deprecated in 1.42 in favour of ``flwr run``) gives
  the ServerApp an empty run config and the ClientApps ``get_fused_config(run)``, which is empty
  for a Run without a FAB. ``carbonfed run`` needs both to receive its
  :class:`~carbonfed.federation.config.RunConfig`, its own ServerApp object (with a progress
  callback) and the key holder in this process, so it calls the function ``run_simulation``
  wraps, ``flwr.simulation.run_simulation._run_simulation``, with an app folder whose
  ``pyproject.toml`` holds the run config (the ClientApps' contexts fuse it, as under
  ``flwr run``) and a ServerApp context that holds it. The Run is made as ``_run_simulation``
  makes it when given none (random run and task ids, the no-op federation, the legacy task
  identity), with the run config as its override config, so that the context's run id is the Run's.
* **The task identity of a ServerApp** (:func:`act_as_server_app`), under which ``flwr.app.Message``
  objects are made: the simulation sets it for its ServerApp thread; a test that builds messages
  in process needs it too.
* **"The node is gone"** (:func:`node_unavailable`): ``flwr.app`` exports no error codes; the
  SuperLink's reply for a node whose heartbeats stopped carries ``ErrorCode.NODE_UNAVAILABLE``
  from ``flwr.common.constant``.

* **The simulation's dispatcher, woken by a push** (:func:`_extract_on_push`, in place of
  ``vce_api.add_messages_to_queue``, and a push that wakes it, while :func:`simulate` runs). Flower
  1.42.0's engine hands each node its next message in sweeps 0.1 s apart, so every exchange began
  on average 50 ms after the ServerApp pushed it (a masked round has three exchanges one after the
  other). The replacement is the same sweep, also run as soon as the ServerApp's grid has stored a
  push (``InMemoryGrid.push_messages`` returns); messages, order and checks are the original's
  (``InMemoryLinkState.get_message_ins(node, limit=1)`` for each node in turn), taken in one pass
  over the stored messages (:func:`_next_messages`): Flower's lookup checks every stored message
  (expiry, federation) for each node it is asked about, 164 nodes × up to 274 stored messages a
  sweep, in the process and under the interpreter lock of the ServerApp.

* **The backend drained before Ray stops** (:class:`_Drain`, around ``RayBackend.process_message``
  and ``RayBackend.terminate`` while :func:`simulate` runs). When the engine stops early (a signal,
  an error), Flower 1.42.0's ``run_api`` calls ``terminate`` (``ray.shutdown``) while its worker
  threads may still wait on a ClientApp's result; Ray's core then ends the whole process with exit
  code 1 ("The core worker has already been shutdown"), before the run can say how to resume. The
  wrapped ``terminate`` lets the calls in flight finish first (at most ``_DRAIN_S`` seconds) and
  refuses new ones.

* **Ray started for Flower** (:func:`_start_ray`): the simulation engine starts Ray itself, which
  replaces the process's SIGTERM handling; starting it first, as the engine would, keeps the
  caller's handlers, so that a signal unwinds the run (see ``carbonfed.federation.run_guard``).

The simulation engine is imported only when :func:`simulate` runs (it takes seconds and is not
needed by a SuperNode's ClientApp), so that this module stays cheap to import.

Guarantees: Ray is shut down when :func:`simulate` returns or raises, and no process of the Ray it
started is left running (each carries a marker in its environment and is stopped by PID). If a Flower upgrade moves
or changes these internals, this module fails (at import or in the call), and nothing else in
carbonfed needs to change but this file.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import threading
import warnings
from functools import partial

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

# Flower 1.42.0 internals (here and in simulate() only):
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES, ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from .deploy.processes import marked_tree, stop_marked

FLOWER_VERSION_CHECKED = "1.42.0"
RAY_MARKER_ENV = "CARBONFED_RAY_MARKER"   # in the environment of every process of a Ray we started


def simulate(server_app: ServerApp, client_app: ClientApp, num_supernodes: int, run_config: dict,
             app_dir: str, backend_config: dict, verbose: bool) -> None:
    """Run ``server_app`` with ``num_supernodes`` simulated SuperNodes running ``client_app``, in
    Flower's simulation engine, until the ServerApp returns (re-raising its exception).

    ``app_dir`` must hold a ``pyproject.toml`` whose ``[tool.flwr.app.config]`` is ``run_config``:
    each ClientApp's ``context.run_config`` is read from it, as under ``flwr run``; the
    ServerApp's ``context.run_config`` is ``run_config``. As ``flwr.simulation.run_simulation``
    does, a fresh random run id is drawn and the exit telemetry event is the Python API's.
    """
    # Flower 1.42.0 internals; the engine is heavy to import, so only here.
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.telemetry import EventType

    # What _run_simulation does when given no Run, plus our run config in the Run and in the
    # ServerApp's context; the public run_simulation passes neither.
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(run_config)
    act_as_server_app(run.run_id)
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    original = (vce_api.add_messages_to_queue, InMemoryGrid.push_messages, RayBackend.process_message,
                RayBackend.terminate)
    pushed, drain = threading.Event(), _Drain()
    try:
        vce_api.add_messages_to_queue = partial(_extract_on_push, pushed)
        InMemoryGrid.push_messages = _waking(original[1], pushed)
        RayBackend.process_message, RayBackend.terminate = drain.counted(original[2]), drain.draining(original[3])
        _start_ray(backend_config.get("init_args") or {})
        _run_simulation(num_supernodes=num_supernodes, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                        client_app=client_app, server_app=server_app, backend_name="ray",
                        backend_config=backend_config, app_dir=app_dir, run=run, server_app_context=context,
                        verbose_logging=verbose, is_app=True)
    finally:
        vce_api.add_messages_to_queue, InMemoryGrid.push_messages, RayBackend.process_message, RayBackend.terminate = original
        _stop_ray()          # Flower shuts Ray down when its engine ends; an interruption may come first


def _undelivered(state, msg_id: str) -> Message | None:
    """The stored message ``msg_id`` if it is still to be delivered, checked as Flower 1.42.0 checks
    it (expired or out of the federation: deleted); the caller holds ``state.lock``."""
    state._check_stored_messages({msg_id})
    kept = state.message_ins_store.get(msg_id)
    return kept if kept and kept.metadata.delivered_at == "" else None


def _delivered(messages: list[Message]) -> list[Message]:
    """``messages``, marked delivered now (as Flower 1.42.0 marks what it hands out)."""
    from flwr.supercore.date import now

    delivered_at = now().isoformat()
    for msg in messages:
        msg.metadata.delivered_at = delivered_at
    return messages


def _extract_on_push(pushed: threading.Event, state, queue, nodes_mapping, f_stop: threading.Event,
                     period: float = 0.1) -> None:
    """Flower 1.42.0's ``vce_api.add_messages_to_queue`` (each node's next message, at most one per
    sweep, into the workers' queue, a sweep every 0.1 s until ``f_stop``), sweeping again as soon as
    ``pushed`` is set, not only ``period`` seconds after the last sweep."""
    while not f_stop.is_set():
        pushed.clear()                  # a push stored from here on wakes the wait below
        for msg in _next_messages(state, list(nodes_mapping.keys())):
            queue.put(msg)
        pushed.wait(period)


def _next_messages(state, node_ids: list[int]) -> list[Message]:
    """What ``state.get_message_ins(node_id=n, limit=1)`` hands out for each ``n`` of ``node_ids`` in
    turn (each node's first undelivered message, checked as Flower checks it, then marked
    delivered), in node order, from one pass over the stored messages instead of one per node."""
    wanted, first = set(node_ids), {}
    with state.lock:
        for msg_id, msg in list(state.message_ins_store.items()):
            node = msg.metadata.dst_node_id
            if node in wanted and node not in first and (kept := _undelivered(state, msg_id)):
                first[node] = kept
    return _delivered([first[n] for n in node_ids if n in first])


def _waking(push, pushed: threading.Event):
    """``push`` (``InMemoryGrid.push_messages``), then ``pushed`` is set: the whole push is stored."""
    def push_messages(grid, messages):
        try:
            return push(grid, messages)
        finally:
            pushed.set()
    return push_messages


_DRAIN_S = 60.0          # the longest a stopping engine waits for the ClientApp calls in flight


class _Drain:
    """Counts the backend's calls in flight; once :meth:`draining`'s function is called, no new
    call starts (it raises, and Flower's worker turns that into an error reply nobody reads) and
    the function waits up to ``timeout`` s for those in flight to end before it runs."""

    def __init__(self, timeout: float = _DRAIN_S):
        self.timeout, self.in_flight, self.closed = timeout, 0, False
        self.cond = threading.Condition()

    def counted(self, call):
        def process_message(backend, *args, **kwargs):
            with self.cond:
                if self.closed:
                    raise RuntimeError("the simulation engine is stopping")
                self.in_flight += 1
            try:
                return call(backend, *args, **kwargs)
            finally:
                with self.cond:
                    self.in_flight -= 1
                    self.cond.notify_all()
        return process_message

    def draining(self, stop):
        def terminate(backend):
            with self.cond:
                self.closed = True
                self.cond.wait_for(lambda: self.in_flight == 0, timeout=self.timeout)
            return stop(backend)
        return terminate


_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _start_ray(init_args: dict) -> None:
    """Start Ray as Flower 1.42.0's ``RayBackend.init_ray`` does (the backend then uses this Ray:
    it calls ``ray.init`` only if ``not ray.is_initialized()``), with two differences. The
    caller's Python signal handlers stay in place: ``ray.init`` replaces the SIGTERM handler (and
    Ray's core installs a C-level one that aborts the process), so a ``carbonfed run`` stopped by
    SIGTERM could not unwind (shut Ray down, remove its app folder, say how to resume). And Ray's
    FutureWarning about accelerator variables, printed by every ``ray.init`` with no GPU, is not
    shown (Ray 2.55; the behaviour it announces does not concern CPU-only actors)."""
    import ray

    if ray.is_initialized():
        return
    os.environ[RAY_MARKER_ENV] = f"ray-{os.getpid()}-{secrets.token_hex(4)}"   # inherited by all of Ray's processes
    handlers = {s: signal.getsignal(s) for s in _SIGNALS} if threading.current_thread() is threading.main_thread() else {}
    pythonpath = os.pathsep.join(sys.path)        # as Flower: the workers import what this driver imports
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*accelerator visible devices", category=FutureWarning)
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **{"include_dashboard": False, **init_args})
    for sig, handler in handlers.items():
        if callable(handler):        # a Python handler of the caller's (not the default action)
            signal.signal(sig, handler)


def _stop_ray() -> None:
    """Shut Ray down, also when an interruption came while ``ray.init`` was still starting it (Ray is
    not "initialized" yet, but its node processes run); then stop, by PID, every process that still
    carries this run's marker or descends from one that did (taken before the shutdown, since the
    shutdown orphans them): an agent the raylet was still starting when it was stopped does not
    notice that its raylet is gone (Ray 2.55 agents check their parent only once started)."""
    import ray
    import ray._private.worker as ray_worker

    marker = os.environ.get(RAY_MARKER_ENV)
    ours = marked_tree(marker, RAY_MARKER_ENV) if marker else {}
    try:
        if ray.is_initialized() or getattr(ray_worker, "_global_node", None) is not None:
            ray.shutdown()
    finally:
        os.environ.pop(RAY_MARKER_ENV, None)
        if marker:
            stop_marked(marker, RAY_MARKER_ENV, grace_s=5.0, known=ours)


def act_as_server_app(run_id: int) -> None:
    """Make the ``flwr.app.Message`` objects this process creates from now on the ServerApp's of
    ``run_id`` (task 1, the SuperLink's node id), as the simulation does for its ServerApp."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID


def node_unavailable(msg: Message) -> bool:
    """An error reply the SuperLink made because the node is gone (its heartbeats stopped)."""
    return msg.has_error() and msg.error.code == ErrorCode.NODE_UNAVAILABLE

"""The server side of ``carbonfed bench he``: aggregation in a freshly spawned process, replies
streamed from files, and its timing and memory.

Guarantees
----------
* :func:`aggregate` runs the server in a *spawned* child (nothing of the parent's memory is
  counted), with the BLAS/OpenMP thread pools limited to one thread, and restores the parent's
  environment before it returns; the child's failure is raised in the parent, never a hang.
* The child reads each reply just in time, adds it and drops it, so its memory stays flat in the
  number of clients; its CPU and wall times exclude reading the replies.
* The reported peak is ``VmHWM`` of the child's own image (not ``ru_maxrss``, which Linux carries
  across ``execve``); :func:`read_reply` returns exactly the parts :func:`write_reply` wrote.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import time

from carbonfed.federation.experiments.bench_he_schemes import SCHEMES

THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:  # pragma: no cover - no procfs
        pass
    return None


def rss_kb() -> int:
    return _status_kb("VmRSS") or 0


def maxrss_kb() -> int:
    """Peak resident size of this process's address space, in KiB.

    ``VmHWM`` rather than ``getrusage().ru_maxrss``: Linux carries ``ru_maxrss`` across ``execve``,
    so a spawned child would report the *parent's* peak at the time of the fork (hundreds of MB
    here, with the encrypted replies held by the parent); ``VmHWM`` belongs to the new image only.
    """
    hwm = _status_kb("VmHWM")
    return hwm if hwm is not None else int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def read_reply(path: str, lengths: list[int]) -> list[bytes]:
    with open(path, "rb") as fh:
        data = fh.read()
    if len(lengths) == 1:
        return [data]
    view, out, at = memoryview(data), [], 0
    for n in lengths:
        out.append(bytes(view[at:at + n]))
        at += n
    return out


def write_reply(path: str, parts: list[bytes]) -> list[int]:
    with open(path, "wb") as fh:
        for p in parts:
            fh.write(p)
    return [len(p) for p in parts]


def server_worker(scheme: str, public: bytes, n_params: int, n_clients: int, replies: list[tuple[str, list[int]]],
                   out_path: str, conn) -> None:
    """Child process (the server): for each of ``n_clients`` replies, read it just in time (as it
    would arrive from the network), add it into the running total and drop it; report timing and
    memory and write the serialised aggregate to ``out_path``."""
    try:
        server = SCHEMES[scheme][1](public, n_params, n_clients)
        del public
        rss_before = rss_kb()
        cpu = wall = 0.0
        for i in range(n_clients):
            parts = read_reply(*replies[i % len(replies)])
            c0, w0 = time.process_time(), time.perf_counter()
            server.add(parts)
            cpu, wall = cpu + time.process_time() - c0, wall + time.perf_counter() - w0
            del parts
            conn.send(("ack", i))
        c0, w0 = time.process_time(), time.perf_counter()
        out = server.finish()
        cpu, wall = cpu + time.process_time() - c0, wall + time.perf_counter() - w0
        maxrss = maxrss_kb()
        lengths = write_reply(out_path, out)
        conn.send(("done", {"cpu_seconds": cpu, "wall_seconds": wall, "rss_before_kb": rss_before,
                            "maxrss_kb": maxrss, "lengths": lengths}))
    except BaseException as exc:  # report, do not leave the parent waiting
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        finally:
            raise
    finally:
        conn.close()


def aggregate(scheme: str, public: bytes, replies: list[tuple[str, list[int]]], n_params: int, n_clients: int,
               out_path: str, progress, task, env: dict[str, str] | None = None) -> tuple[list[bytes], dict]:
    """Run the server in a freshly spawned child that adds ``replies`` round-robin, one at a time."""
    spawn = mp.get_context("spawn")
    parent, child = spawn.Pipe(duplex=True)
    env = {**{k: "1" for k in THREAD_ENV}, **(env or {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        proc = spawn.Process(target=server_worker, args=(scheme, public, n_params, n_clients, replies, out_path, child),
                             daemon=True, name=f"bench-he-server-{scheme}")
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    child.close()
    try:
        while True:
            try:
                kind, payload = parent.recv()
            except EOFError:
                proc.join(5)
                raise RuntimeError(f"benchmark server process for {scheme} died (exit code {proc.exitcode})") from None
            if kind == "error":
                raise RuntimeError(f"benchmark server process for {scheme} failed: {payload}")
            if kind == "done":
                break
            progress.advance(task)
        proc.join(60)
        return read_reply(out_path, payload["lengths"]), payload
    finally:
        parent.close()
        if proc.is_alive():
            proc.terminate()
            proc.join(5)

"""Benchmark: carbonfed's BFV secure sum against NVIDIA FLARE's default CKKS scheme.

``python -m carbonfed.federation.experiments.bench_he --params N --clients K [--json]`` (wired as ``carbonfed bench he``).

Four schemes (:data:`~carbonfed.federation.experiments.bench_he_schemes.SCHEMES`) run in one
process on the same random updates (uniform in ``[-1, 1]``, equal weights), one after the other:
``tenseal_public_key`` (the upload before seeded ciphertexts), ``carbonfed_default_ring`` (seeded,
default ring), ``carbonfed`` (seeded, the run's ring: what a run uploads) and ``baseline``. Each
reports the same figures:

``bytes_per_param``
    serialised upload of one client divided by ``n_params``.
``encrypt_params_per_s``
    client side, one core: encode + encrypt + serialise.
``aggregate_params_per_s``
    server side: ``n_params * n_clients`` over the seconds spent deserialising and adding the
    replies (for the baseline also its final plaintext multiplication by ``1/n_clients``).
``decrypt_params_per_s``
    key holder: deserialise + decrypt + decode the aggregate.
``peak_rss_mb``
    peak resident size (``VmHWM``) of the server process. The aggregation runs in a freshly
    *spawned* child (so nothing of this process is counted) that reads each reply just in time
    (from a file written once per distinct update), adds it and drops it;
    ``aggregate_rss_growth_mb`` is the peak minus the resident size just before the first reply.
    Both stay flat in ``n_clients`` when the server streams. The server runs twice: once with the
    default allocator for the timings (its peak is ``peak_rss_mb_default_malloc``, which varies
    from run to run with glibc's heap reuse), and once with glibc's mmap threshold pinned
    (``MALLOC_MMAP_THRESHOLD_``) so that freed buffers leave the resident set; ``peak_rss_mb`` comes
    from that second run and is reproducible.
``max_abs_error``
    decrypted mean against the float64 mean of the original (unencoded) updates.
``security_bits``
    the HomomorphicEncryption.org table level, computed for every parameter set the same way
    (:meth:`carbonfed.privacy.he.HEParams.security_bits`).
``exact_sum``
    (BFV schemes) the decrypted integers equal the integer sum of the encoded updates that were
    added; null for the approximate CKKS baseline.

``seeded_vs_tenseal`` compares ``carbonfed`` with ``tenseal_public_key`` measured in the same run
(upload bytes, encryption throughput).

To keep ``10**6`` parameters x 100 clients feasible, ``min(n_clients, 4)`` distinct updates are
generated and encrypted (each once; those encryptions are the encryption timing sample) and fed
to the server round-robin until ``n_clients`` replies were added. The reference mean uses the
same round-robin, so ``max_abs_error`` is exact for what was summed.

Everything is single-threaded: the contexts are created with ``n_threads=1`` and BLAS/OpenMP
pools are limited to one thread. Throughputs divide by the *CPU time* of the process doing the
work (``time.process_time``, all its threads), i.e. what one core costs, so other load on a shared
machine does not distort them; wall-clock seconds are reported next to them (``wall_seconds``)
and agree on an idle machine. The server's times exclude reading a reply from the file.

Parts: the two schemes (:mod:`~carbonfed.federation.experiments.bench_he_schemes`), the spawned
server (:mod:`~carbonfed.federation.experiments.bench_he_server`); this module drives them.

Guarantees
----------
* Every scheme gets the same updates (``seed``) and the same round-robin of replies; the server
  side only ever gets public context bytes.
* ``max_abs_error`` is against the float64 mean of exactly what was summed.
* With ``--json``, stdout holds exactly one JSON object (TenSEAL's C++ warnings are silenced, the
  progress display is on stderr).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext

import numpy as np

from carbonfed.federation.cli import Parser
from carbonfed.federation.experiments.bench_he_schemes import SCHEMES
from carbonfed.federation.experiments.bench_he_server import aggregate, write_reply

DISTINCT_UPDATES = 4
METRICS = ("bytes_per_param", "encrypt_params_per_s", "aggregate_params_per_s", "decrypt_params_per_s",
           "peak_rss_mb", "max_abs_error", "security_bits")
# glibc raises its mmap threshold dynamically, after which freed multi-MB buffers stay in the heap:
# the peak RSS then depends on allocation order (150-270 MB for the same 1M-param run). Pinning the
# threshold makes every buffer above it an mmap that is returned on free, so RSS tracks live memory.
_MEMORY_RUN_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

_libc = None


def _fflush_c() -> None:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None)
        _libc.fflush(None)
    except (OSError, AttributeError):  # pragma: no cover - non-glibc platforms
        pass


@contextmanager
def _quiet_stdout():
    """Silence C++ ``std::cout`` (TenSEAL prints a warning to it for every vector that spans more
    than one ciphertext), which would otherwise corrupt ``--json`` output on stdout."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # stdout replaced (e.g. captured): nothing to do
        yield
        return
    sys.stdout.flush()
    _fflush_c()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        _fflush_c()
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


@contextmanager
def _single_thread():
    try:
        from threadpoolctl import threadpool_limits
        limit = threadpool_limits(1)
    except Exception:  # pragma: no cover - threadpoolctl missing
        limit = nullcontext()
    torch = sys.modules.get("torch")
    old_torch = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(1)
    try:
        with limit:
            yield
    finally:
        if torch is not None:
            torch.set_num_threads(old_torch)


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass


def _progress(enabled: bool):
    if not enabled:
        return _NoProgress()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), transient=False)


# ---------------------------------------------------------------------------------------------
# one scheme, both schemes
# ---------------------------------------------------------------------------------------------

def _bench_scheme(scheme, updates: np.ndarray, n_clients: int, seed: int, progress, workdir: str) -> dict:
    """Every figure of one scheme: encrypt each distinct update once, aggregate twice (timing and
    memory run), decrypt, compare with the float64 mean of what was summed."""
    name = scheme.name
    n_params = updates.shape[1]
    k = updates.shape[0]
    rng = np.random.default_rng([seed, 1])

    task = progress.add_task(f"{name}: encrypt", total=k)
    replies, upload_bytes, enc_cpu, enc_wall = [], [], 0.0, 0.0
    with _quiet_stdout():
        for j, u in enumerate(updates):
            c0, w0 = time.process_time(), time.perf_counter()
            parts = scheme.encrypt(u, rng)
            enc_cpu, enc_wall = enc_cpu + time.process_time() - c0, enc_wall + time.perf_counter() - w0
            path = os.path.join(workdir, f"{name}-reply-{j}.bin")
            lengths = write_reply(path, parts)
            replies.append((path, lengths))
            upload_bytes.append(sum(lengths))
            del parts
            progress.advance(task)

    task = progress.add_task(f"{name}: aggregate (timing run)", total=n_clients)
    out, info = aggregate(name, scheme.public, replies, n_params, n_clients,
                           os.path.join(workdir, f"{name}-aggregate.bin"), progress, task)
    task = progress.add_task(f"{name}: aggregate (memory run)", total=n_clients)
    _, mem = aggregate(name, scheme.public, replies, n_params, n_clients,
                        os.path.join(workdir, f"{name}-aggregate-mem.bin"), progress, task, env=_MEMORY_RUN_ENV)

    task = progress.add_task(f"{name}: decrypt", total=1)
    c0, w0 = time.process_time(), time.perf_counter()
    mean = scheme.decrypt(out)
    dec_cpu, dec_wall = time.process_time() - c0, time.perf_counter() - w0
    progress.advance(task)

    counts = np.bincount(np.arange(n_clients) % k, minlength=k).astype(np.float64)
    expected = (counts @ updates) / n_clients
    peak = mem["maxrss_kb"] / 1024.0
    return {
        "scheme": scheme.describe(),
        "bytes_per_param": max(upload_bytes) / n_params,
        "encrypt_params_per_s": n_params * k / enc_cpu,
        "aggregate_params_per_s": n_params * n_clients / info["cpu_seconds"],
        "decrypt_params_per_s": n_params / dec_cpu,
        "peak_rss_mb": round(peak, 1),
        "aggregate_rss_growth_mb": round(peak - mem["rss_before_kb"] / 1024.0, 1),
        "peak_rss_mb_default_malloc": round(info["maxrss_kb"] / 1024.0, 1),
        "max_abs_error": float(np.max(np.abs(mean - expected))),
        "exact_sum": getattr(scheme, "exact", None),
        "security_bits": int(scheme.security_bits()),
        "upload_bytes_per_client": int(max(upload_bytes)),
        "aggregate_bytes": int(sum(len(p) for p in out)),
        "cpu_seconds": {"encrypt_per_client": enc_cpu / k, "aggregate": info["cpu_seconds"], "decrypt": dec_cpu},
        "wall_seconds": {"encrypt_per_client": enc_wall / k, "aggregate": info["wall_seconds"], "decrypt": dec_wall},
    }


def run_bench(n_params: int, n_clients: int, seed: int = 0, *, progress: bool = False) -> dict:
    """Benchmark every scheme on the same updates; see the module docstring for every figure."""
    n_params, n_clients = int(n_params), int(n_clients)
    if n_params < 1 or n_clients < 1:
        raise ValueError("n_params and n_clients must be >= 1")
    k = min(n_clients, DISTINCT_UPDATES)
    updates = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(k, n_params))
    result = {"n_params": n_params, "n_clients": n_clients, "seed": seed, "distinct_updates": k,
              "threads": 1, "weights": "equal", "throughput_clock": "process CPU time"}
    with _single_thread(), _progress(progress) as bar, tempfile.TemporaryDirectory(prefix="bench-he-") as workdir:
        for cls, _ in SCHEMES.values():
            scheme = cls(n_params, n_clients)
            result[scheme.name] = _bench_scheme(scheme, updates, n_clients, seed, bar, workdir)
            del scheme
    result["scheme"] = {name: result[name]["scheme"] for name in SCHEMES}
    ours, today = result["carbonfed"], result["tenseal_public_key"]
    result["seeded_vs_tenseal"] = {
        "bytes_per_param": [today["bytes_per_param"], ours["bytes_per_param"]],
        "upload_ratio": ours["bytes_per_param"] / today["bytes_per_param"],
        "encrypt_params_per_s": [today["encrypt_params_per_s"], ours["encrypt_params_per_s"]],
        "encrypt_speedup": ours["encrypt_params_per_s"] / today["encrypt_params_per_s"]}
    return result


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------

def _rate(x: float) -> str:
    return f"{x / 1e6:,.2f} M/s" if x >= 1e5 else f"{x:,.0f} /s"


_ROWS = (
    ("bytes_per_param", "upload bytes / param", lambda v: f"{v:.2f}", "lower"),
    ("encrypt_params_per_s", "encrypt (client, 1 core)", _rate, "higher"),
    ("aggregate_params_per_s", "aggregate (server)", _rate, "higher"),
    ("decrypt_params_per_s", "decrypt (key holder)", _rate, "higher"),
    ("peak_rss_mb", "server peak RSS", lambda v: f"{v:,.1f} MB", "lower"),
    ("aggregate_rss_growth_mb", "  of which aggregation", lambda v: f"{v:,.1f} MB", "lower"),
    ("max_abs_error", "max |mean error|", lambda v: f"{v:.2e}", "lower"),
    ("security_bits", "security (HE std table)", lambda v: f"{v} bits", "higher"),
)


def format_table(result: dict) -> str:
    """A plain-text comparison table of a :func:`run_bench` result: one column per scheme, then
    carbonfed (seeded, the run's ring) against the baseline."""
    names = [n for n in SCHEMES if n in result]
    ours, base = result["carbonfed"], result["baseline"]
    head = ("metric", *names, "carbonfed vs baseline")
    rows = []
    for key, label, fmt, better in _ROWS:
        if any(key not in result[n] for n in names):
            continue
        a, b = ours[key], base[key]
        if key in ("max_abs_error", "security_bits", "aggregate_rss_growth_mb") or not b or not a:
            ratio = ""
        elif better == "higher":
            ratio = f"{a / b:.2f}x"
        else:
            ratio = f"{b / a:.2f}x smaller"
        rows.append((label, *(fmt(result[n][key]) for n in names), ratio))
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    out = [f"HE aggregation benchmark: {result['n_params']:,} params x {result['n_clients']} clients "
           f"(seed {result.get('seed', 0)}, {result.get('distinct_updates', '?')} distinct updates fed round-robin, "
           f"one thread; throughput = params per CPU second)", "", line(head), line(tuple("-" * w for w in widths))]
    out += [line(r) for r in rows]
    cmp = result.get("seeded_vs_tenseal")
    if cmp:
        out += ["", f"carbonfed against tenseal_public_key (the upload before seeded ciphertexts), same run: "
                    f"{cmp['upload_ratio']:.2f}x the bytes, {cmp['encrypt_speedup']:.2f}x the encryption throughput; "
                    f"exact sums: " + ", ".join(f"{n} {result[n]['exact_sum']}" for n in names
                                                 if result[n].get("exact_sum") is not None)]
    out += [""] + [f"{n}: {result[n]['scheme']}" for n in names]
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--params", type=int, default=1_000_000, help="parameters per update (default 1,000,000)")
    parser.add_argument("--clients", type=int, default=100, help="clients per aggregation (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random updates (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table (default: a table)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress display on stderr (default: one, on stderr)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(Parser(
        prog="carbonfed bench he", description="Compare carbonfed's BFV secure sum (seeded ciphertexts under the "
        "run's ring; under the default ring; and TenSEAL's public-key upload of before) with NVIDIA FLARE's default "
        "CKKS aggregation (size, speed, server memory, error, security)."))
    args = parser.parse_args(argv)
    if args.params < 1 or args.clients < 1:
        parser.error("--params and --clients must be >= 1")
    result = run_bench(args.params, args.clients, args.seed, progress=not args.no_progress)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

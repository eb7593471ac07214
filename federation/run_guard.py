"""What a run leaves when it cannot go on: nothing it cannot use, and nothing it needs is lost.

:mod:`carbonfed.federation.run` calls these when a ``carbonfed run`` fails, is interrupted, is
resumed with other options, or has its results rebuilt after its keys are gone.

Guarantees
----------
* While :func:`stop_on_signals` is active, SIGTERM, SIGINT and SIGHUP raise :class:`Interrupted` in the
  main thread (once: a repeated signal is ignored while the run unwinds), so the simulation
  stops as after an error: Ray shut down, the app folder removed, the checkpoint kept.
* :func:`forget` removes a run that stopped before its first checkpoint (nothing to resume):
  its own keys, and everything in its folder (which was new or empty when the run started).
* :func:`stopped_message` is one line: what stopped the run, what was kept and how to go on;
  :func:`stopped` prints it and gives the exit code (128 + the signal for an interrupted run).
* :func:`resume_conflicts` names every option given with ``--resume`` whose value differs from
  the run's recorded config, so that none is silently ignored.
* :func:`check_results_keys` raises before anything is decrypted if an HE run's keys are not
  this run's, or are gone; for keys made for the run and deleted at its end, it says so and what
  can still be done, instead of advising ``keygen`` (new keys cannot decrypt old ciphertexts).
* :func:`existing_run` raises a one-line ``ValueError`` for a path that does not exist, is not a
  folder, or holds no run (``report``, ``verify``, ``audit-attack`` on the wrong folder).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from carbonfed.federation.config import RunConfig
from carbonfed.privacy.key_match import KeysMissing, check_run_keys
from carbonfed.privacy.ledger import read_ledger

CHECKPOINT = "checkpoint.json"
RUN_MARKERS = ("server.json", "ledger.jsonl")         # a run folder holds at least one of them
PATH_SETTINGS = ("data_dir", "data", "keys_dir")      # compared as resolved paths


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached the run (a BaseException: no ``except Exception`` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_on_signals():
    """SIGTERM, SIGINT and SIGHUP raise :class:`Interrupted` (once) while active; nothing
    changes when called outside the main thread (only it can handle signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:                  # a second Ctrl+C must not break the unwinding of the first
            fired.append(signum)
            raise Interrupted(signum)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def has_checkpoint(folder: Path) -> bool:
    """The run wrote a checkpoint (after its setup or a round): ``--resume`` can continue it."""
    return (folder / CHECKPOINT).exists()


def checkpoint_round(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / CHECKPOINT).read_text())["round"])
    except (OSError, ValueError, KeyError):
        return None


def forget(folder: Path, keys_dir: str, own_keys: bool, made_folder: bool) -> None:
    """Delete the run's own keys (their private temporary folder) and everything in ``folder``
    (the folder too if the run made it). Only for a run that stopped before its first checkpoint:
    its folder was new or empty when it started (:meth:`RunFolder.check_new`), so all of it is the run's."""
    if own_keys and keys_dir:
        shutil.rmtree(Path(keys_dir).parent, ignore_errors=True)
    if made_folder:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for entry in folder.iterdir() if folder.is_dir() else ():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def rejection_hint(folder: Path) -> str:
    """The ledger's most common client rejection reason (its last line), for an error message."""
    try:
        reasons = [str(r.get("reason", "")) for r in read_ledger(folder / "ledger.jsonl") if r.get("status") == "rejected"]
    except (OSError, ValueError):
        return ""
    if not reasons:
        return ""
    last_lines = Counter(next((ln.strip(" '>") for ln in reversed(r.splitlines()) if ln.strip()), r) for r in reasons)
    reason, count = last_lines.most_common(1)[0]
    return f" ({len(reasons)} client repl{'y' if len(reasons) == 1 else 'ies'} rejected; {count} with: {reason[:300]})"


def stopped_message(what: str, folder: Path, kept: bool) -> str:
    """One line: ``what`` stopped the run, and either how to continue it or that nothing was kept."""
    if kept:
        rnd = checkpoint_round(folder)
        at = "its setup" if rnd == 0 else f"round {rnd}" if rnd else "its last checkpoint"
        return (f"{what}; the run is kept as of {at} (checkpoint and keys): continue it with "
                f"`carbonfed run --resume --out {folder}`")
    return f"{what}; it stopped before its first checkpoint, so nothing was kept (no keys, no {folder})"


def stopped(folder: Path, exc: BaseException) -> int:
    """One line on stderr for a run that did not finish (what stopped it, what was kept, how to
    go on) and its exit code: 128 + the signal if interrupted (also when the signal surfaced as
    another error raised while unwinding it), else 1. An interrupted run, or one whose engine left
    a thread behind (a ServerApp waiting for replies that will not come), then exits at once: Ray
    is already shut down and the folder settled, and Ray 2.55's core can crash in the
    interpreter's own finalization after a signal cut its start short."""
    signum = _signal_of(exc)
    if signum is not None:
        what, code = f"carbonfed run: interrupted ({signal.Signals(signum).name})", 128 + signum
    else:
        cause = exc
        while cause.__cause__ is not None:          # Flower wraps the engine's error in its own
            cause = cause.__cause__
        text = next((ln.strip() for ln in reversed(str(cause).splitlines()) if ln.strip()), type(cause).__name__)
        what, code = f"carbonfed run: error: the run failed: {text}{''.join(getattr(exc, '__notes__', []))}", 1
    print(stopped_message(what, folder, kept=has_checkpoint(folder)), file=sys.stderr, flush=True)
    if signum is not None or any(t.is_alive() and not t.daemon for t in threading.enumerate()
                                 if t is not threading.main_thread()):
        sys.stdout.flush()
        os._exit(code)
    return code


def _signal_of(exc: BaseException) -> int | None:
    """The signal behind ``exc``: it, or an exception it was raised from or while handling."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, Interrupted):
            return exc.signum
        if isinstance(exc, KeyboardInterrupt):
            return signal.SIGINT
        if isinstance(exc, SystemExit):
            return signal.SIGTERM
        exc = exc.__cause__ or exc.__context__
    return None


def _same(name: str, given, recorded) -> bool:
    if name in PATH_SETTINGS:
        return bool(given) == bool(recorded) and (not given or Path(given).resolve() == Path(recorded).resolve())
    try:
        return type(recorded)(given) == recorded
    except (TypeError, ValueError):
        return False


def resume_conflicts(cfg: RunConfig, given: dict) -> list[str]:
    """``--option value (the run's: recorded)`` for each setting in ``given`` (RunConfig keyword
    arguments the user gave with ``--resume``) whose value differs from ``cfg``, the recorded one."""
    return [f"--{name.replace('_', '-')} {value} (the run's: {getattr(cfg, name)!r})"
            for name, value in given.items() if not _same(name, value, getattr(cfg, name))]


def check_results_keys(run_dir: Path, keys: str | Path | None) -> None:
    """Raise :class:`carbonfed.privacy.key_match.RunKeysError` unless ``keys`` (default: the run
    config's keys-dir) are this HE run's keys; nothing to check without HE."""
    server = json.loads((run_dir / "server.json").read_text()) if (run_dir / "server.json").is_file() else {}
    configured = (server.get("config") or {}).get("keys-dir") or ""
    try:
        check_run_keys(run_dir, keys or configured)
    except KeysMissing as exc:
        other = bool(keys) and Path(keys).resolve() != Path(configured).resolve()   # not the run's own folder
        if other or not _were_temporary(run_dir, configured):
            raise
        report = run_dir / "report.json"
        left = (f"report.json, written at its end ({report}), holds its results"
                if report.is_file() else "it wrote no report.json (it did not finish)")
        raise KeysMissing(f"{run_dir}'s keys ({configured}) were temporary: made for the run and deleted at its "
                          "end, so its ciphertexts cannot be decrypted again (keys from `carbonfed keygen` are "
                          f"new keys and cannot either); {left}, and `carbonfed verify {run_dir}` checks its "
                          "ledger without keys") from exc


def _were_temporary(run_dir: Path, keys_dir: str) -> bool:
    """The run's keys were its own (``run.json``), or lived in a private temporary folder (of
    :func:`carbonfed.federation.run.new_private_keys` or of a local deployment)."""
    try:
        if json.loads((run_dir / "run.json").read_text()).get("own_keys"):
            return True
    except (OSError, ValueError):
        pass
    return bool(keys_dir) and Path(keys_dir).parent.name.startswith(("carbonfed-keys-", "carbonfed-deploy-"))


def existing_run(path: str | Path, needs: str | None = None) -> Path:
    """``path`` if it is a run folder (holding ``needs``, else one of :data:`RUN_MARKERS`);
    otherwise a one-line ``ValueError`` that says what was found instead."""
    folder = Path(path)
    if not folder.exists():
        raise ValueError(f"{folder}: no such folder (give the folder of a run, e.g. the --out of `carbonfed run`)")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a run folder")
    wanted = (needs,) if needs else RUN_MARKERS
    if not any((folder / name).is_file() for name in wanted):
        raise ValueError(f"{folder} holds no run ({' or '.join(wanted)} missing): give the folder of a run, "
                         "e.g. the --out of `carbonfed run`")
    return folder

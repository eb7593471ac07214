"""The server's state between rounds, and the checkpoint that lets a restarted server resume.

Guarantees
----------
* After the setup and after every round the server writes a checkpoint (``checkpoint.json``,
  atomically, last, so a crash leaves the previous one intact): the encrypted global model and
  statistics aggregates (stage 1 and, in DP runs of more stages, stages 2 and 3; with their
  SHA-256), the SHA-256 of the averaged rounds' ``aggregates/model_round_NNN.bin``, the term
  counts, the roles of the nodes, who contributed to each kept aggregate (the clients check its
  tags), the SHA-256 of the run's charter, the round number and the ledger position.
* :func:`read_checkpoint` restores exactly what :func:`write_checkpoint` saved, or refuses
  (:class:`CheckpointError`): a checkpoint of another config or key, of an unknown format, a file
  whose SHA-256 differs, or a ledger that no longer contains the checkpoint's last line.
* The resume ledger line says from which round the run goes on, and how many lines of the
  interrupted round precede it (they are superseded by the lines that follow).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from carbonfed.federation.config import RunConfig
from carbonfed.federation.durable import atomic_write
from carbonfed.federation.wire import stage_key
from carbonfed.privacy.ledger import Ledger, read_ledger

CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """The out-dir's checkpoint cannot be resumed (other config or key, damaged, ledger cut)."""


@dataclass
class ServerState:
    """What the server knows between rounds: encrypted aggregates and who is who."""

    roles: dict[int, tuple[str, str]] = field(default_factory=dict)   # node id -> (role, country)
    stages: list[tuple[bytes, int]] = field(default_factory=list)     # statistics aggregates, terms: stage 1, 2, 3
    model: bytes | None = None
    model_terms: int = 0
    round: int = 0
    tail: list[tuple[int, bytes, int]] = field(default_factory=list)  # (round, global model, terms), the last average-last
    # who each kept aggregate sums (stats, stats2, stats3, update-r001, ...): the clients check the tags
    contributors: dict[str, list[str]] = field(default_factory=dict)
    charter: str = ""                 # the SHA-256 of the charter the run's clients endorsed

    def tail_rounds(self) -> list[int]:
        """The rounds whose global models the run's model averages (``average-last``)."""
        return [r for r, _, _ in self.tail]

    def stats_parts(self, upto: int | None = None) -> list[list]:
        """``[[kind, 0, contributors], ...]`` of the statistics stages 1..``upto`` (default all)."""
        return [[stage_key(k), 0, self.contributors.get(stage_key(k), [])]
                for k in range(1, len(self.stages[:upto]) + 1)]

    def model_parts(self, average: bool) -> list[list]:
        """``[["update", r, contributors], ...]`` of the latest global model (``average``: of the
        run's model, every averaged round's)."""
        rounds = self.tail_rounds() if average else self.tail_rounds()[-1:]
        return [["update", r, self.contributors.get(f"update-r{r:03d}", [])] for r in rounds]

    def stage_terms(self) -> dict[str, int]:
        """``{"stats_terms": n1, "stats2_terms": n2, ...}`` (server.json, checkpoints)."""
        return {f"{stage_key(k)}_terms": terms for k, (_, terms) in enumerate(self.stages, 1)}


@dataclass
class Resume:
    """A checkpoint read back: the state, the time and restarts of the earlier servers, and the
    ledger line that records this resume."""

    state: ServerState
    elapsed_s: float
    resumed_from: list[int]
    line: dict


def _sha256(data: bytes) -> str:
    """The hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def ledger_position(ledger: Ledger) -> dict:
    """How many lines the ledger holds and the hash of its last one (the checkpoint's anchor)."""
    # Ledger keeps its position in private fields and offers no public accessor; read here only.
    return {"lines": ledger._seq, "last_hash": ledger._prev}


def _blobs(out: Path, state: ServerState) -> dict:
    """Write the state's aggregates into ``checkpoint/``; their names, files and SHA-256."""
    d = out / "checkpoint"
    d.mkdir(exist_ok=True)
    rnd, files = state.round, {}
    blobs = [("model", state.model)] + [(stage_key(k), data) for k, (data, _) in enumerate(state.stages, 1)]
    for name, data in blobs:
        if data is not None:
            f = d / f"{name}-{rnd:04d}.bin"
            atomic_write(f, data)
            files[name] = {"file": f"checkpoint/{f.name}", "sha256": _sha256(data)}
    # the averaged global models: their round aggregates are already on disk (written
    # atomically, never rewritten for a checkpointed round), so only their hashes are recorded
    for r, data, _ in state.tail:
        files[f"tail-r{r:03d}"] = {"file": f"aggregates/model_round_{r:03d}.bin", "sha256": _sha256(data)}
    return files


def write_checkpoint(out: Path, state: ServerState, cfg: RunConfig, fingerprint: str, ledger: Ledger,
                     elapsed_s: float, resumed_from: list[int]) -> Path:
    """Write the state after the setup (round 0) or a complete round; ``checkpoint.json`` is
    replaced last and atomically, and only then are older checkpoint files removed."""
    files = _blobs(out, state)
    doc = {"format": CHECKPOINT_FORMAT, "round": state.round, "config_sha256": cfg.digest(),
           "fingerprint": fingerprint, "rounds": cfg.rounds,
           "roles": {str(n): [r, c] for n, (r, c) in sorted(state.roles.items())},
           "model_terms": state.model_terms, **state.stage_terms(), "files": files,
           "tail": [[r, terms] for r, _, terms in state.tail], "contributors": state.contributors,
           "charter_sha256": state.charter,
           "ledger": ledger_position(ledger), "elapsed_s": elapsed_s, "resumed_from": resumed_from}
    path = out / CHECKPOINT_FILE
    atomic_write(path, json.dumps(doc, indent=1, sort_keys=True).encode())
    keep = {Path(v["file"]).name for v in files.values()}
    for old in (out / "checkpoint").glob("*.bin"):
        if old.name not in keep:
            old.unlink(missing_ok=True)
    return path


def _open(path: Path, cfg: RunConfig, fingerprint: str) -> dict:
    """The checkpoint document, if it is readable and was written by this config and key."""
    try:
        ck = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable: {exc}") from exc
    if ck.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {ck.get('format')!r}")
    if ck["config_sha256"] != cfg.digest():
        raise CheckpointError(f"{path} was written by a run with another config "
                              f"(sha256 {ck['config_sha256'][:12]}…, this run {cfg.digest()[:12]}…): "
                              "use another out-dir, or the same config to resume")
    if ck["fingerprint"] != fingerprint:
        raise CheckpointError(f"{path} was written under another public key or HE setting")
    return ck


def _state(out: Path, path: Path, ck: dict) -> ServerState:
    """The state the checkpoint describes, each file checked against its SHA-256."""
    data = {}
    for name, meta in ck["files"].items():
        blob = (out / meta["file"]).read_bytes()
        if _sha256(blob) != meta["sha256"]:
            raise CheckpointError(f"{meta['file']} does not match its SHA-256 in {path}")
        data[name] = blob
    stages = itertools.takewhile(lambda k: stage_key(k) in data, itertools.count(1))
    return ServerState(roles={int(k): (v[0], v[1]) for k, v in ck["roles"].items()},
                       stages=[(data[stage_key(k)], ck[f"{stage_key(k)}_terms"]) for k in stages],
                       model=data.get("model"), model_terms=ck["model_terms"], round=ck["round"],
                       tail=[(r, data[f"tail-r{r:03d}"], terms) for r, terms in ck.get("tail", [])],
                       contributors=ck.get("contributors", {}), charter=ck.get("charter_sha256", ""))


def _resume_line(ck: dict, n: int, total: int) -> dict:
    """The ledger line of a resume after round ``ck["round"]`` (checkpoint at line ``n`` of ``total``)."""
    return {"kind": "resume", "round": ck["round"], "checkpoint_lines": n, "interrupted_lines": total - n,
            "reason": f"server restarted; resuming after round {ck['round']} from its checkpoint"
                      + (f"; lines {n + 1}..{total} belong to the interrupted round "
                         f"{ck['round'] + 1} and are superseded by the lines that follow"
                         if total > n else "")}


def read_checkpoint(out: Path, cfg: RunConfig, fingerprint: str, ledger_path: Path) -> Resume | None:
    """The checkpoint of ``out``, or None if there is none; raises :class:`CheckpointError` if
    it belongs to another job or does not match the ledger at ``ledger_path``."""
    path = out / CHECKPOINT_FILE
    if not path.exists():
        return None
    ck = _open(path, cfg, fingerprint)
    records = read_ledger(ledger_path) if ledger_path.exists() else []
    n, last = ck["ledger"]["lines"], ck["ledger"]["last_hash"]
    if len(records) < n or (n and records[n - 1].get("hash") != last):
        raise CheckpointError(f"{ledger_path} does not contain the checkpoint's ledger line {n}: "
                              "the ledger was cut or replaced since the checkpoint")
    return Resume(state=_state(out, path, ck), elapsed_s=float(ck.get("elapsed_s", 0.0)),
                  resumed_from=[*ck.get("resumed_from", []), ck["round"]], line=_resume_line(ck, n, len(records)))

"""The stored aggregate files, checked without keys against what the clients signed they received.

Guarantees (each failure a problem naming the file)
--------------------------------------------------
* Every statistics aggregate the training clients signed (``inputs.stats``: one SHA-256 per
  stage, the same for every client) is ``aggregates/stats*.bin``, byte for byte.
* Every global model the training clients of round r signed (``inputs.model``) is the same for
  all of them and is ``aggregates/model_round_NNN.bin`` of the last round before r that made a
  model; the model the test clients of the last round evaluated is ``aggregates/model.bin``.
* Every aggregate file the ledger implies (:func:`carbonfed.privacy.binding.expected_aggregates`)
  exists: a deleted ``metrics_round_NNN.bin`` of a round with accepted evaluations is named.
* A round summary's ``aggregates`` manifest (SHA-256 per file, written by the server) matches
  the files: this binds them against anyone but the server (who could rewrite both).

Not checked here: the content of files no client received (the metrics aggregates, the last
round's model when average-last > 1). Those are bound in their check slots to run, kind, round
and contributors (:mod:`carbonfed.privacy.binding`), which only the key holders can read:
``carbonfed report`` checks them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from carbonfed.privacy.binding import expected_aggregates, stats_name
from carbonfed.privacy.charter import Charter
from carbonfed.privacy.audit.signed import Chain


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _one_hash(what: str, signed: dict[str, list[int]], problems: list[str]) -> str | None:
    """The one SHA-256 the clients signed for ``what``; several: a problem naming the lines."""
    if len(signed) > 1:
        detail = "; ".join(f"{h[:12]}… at line(s) {lines[:4]}" for h, lines in sorted(signed.items()))
        problems.append(f"{what}: the clients signed different aggregates ({detail}): the server sent "
                        "different clients different aggregates")
    return next(iter(signed)) if len(signed) == 1 else None


def _file_matches(agg: Path, name: str, want: str | None, why: str, problems: list[str]) -> bool:
    if want is None:
        return False
    got = _sha(agg / name)
    if got is None:
        problems.append(f"aggregates/{name} is missing, but {why}")
    elif got != want:
        problems.append(f"aggregates/{name}: its SHA-256 {got[:12]}… is not {want[:12]}…, the one {why}: "
                        "the file was swapped or edited")
    return got == want


def _signed_inputs(chains: dict[str, Chain]) -> tuple[dict, dict, dict]:
    """{stage: {sha: lines}}, {train round: {sha: lines}}, {evaluate round: {sha: lines}}."""
    stats, train, evaluate = {}, {}, {}
    for chain in chains.values():
        for n, st in chain:
            inp = st["inputs"]
            if not inp or st["status"] == "error":
                continue
            for k, (h, _) in enumerate(inp["stats"], 1):
                stats.setdefault(k, {}).setdefault(h, []).append(n)
            target = {"train": train, "evaluate": evaluate}.get(st["kind"])
            if target is not None and inp["model"] is not None:
                target.setdefault(st["round"], {}).setdefault(inp["model"], []).append(n)
    return stats, train, evaluate


def check_files(run_dir: Path, records: list[dict], chains: dict[str, Chain], charter: Charter,
                problems: list[str]) -> int:
    """Check the aggregate files against the signed inputs and the ledger; returns how many
    files were matched to a hash a client signed."""
    agg, matched = run_dir / "aggregates", 0
    stats, train, evaluate = _signed_inputs(chains)
    for k, signed in sorted(stats.items()):
        h = _one_hash(f"statistics stage {k}", signed, problems)
        matched += _file_matches(agg, f"{stats_name(k)}.bin", h, f"the clients signed for stage {k} "
                                 f"(line {min(signed.get(h, [0]))})", problems)
    expected = expected_aggregates(records, charter)
    model_rounds = sorted(int(e.name[12:15]) for e in expected if e.name.startswith("model_round_"))
    for rnd, signed in sorted(train.items()):
        h = _one_hash(f"round {rnd}'s global model", signed, problems)
        before = [r for r in model_rounds if r < rnd]
        if before and h is not None:
            matched += _file_matches(agg, f"model_round_{before[-1]:03d}.bin", h,
                                     f"the clients of round {rnd} signed they trained on (line {min(signed[h])})", problems)
    if evaluate:
        rnd, signed = max(evaluate.items())
        h = _one_hash(f"round {rnd}'s evaluated model", signed, problems)
        if model_rounds and rnd >= model_rounds[-1]:      # model.bin is still what they evaluated
            matched += _file_matches(agg, "model.bin", h, f"the test clients signed they evaluated in the last round "
                                     f"{rnd} (line {min(signed.get(h, [0]))})", problems)
    for e in expected:
        if not (agg / e.name).is_file():
            problems.append(f"aggregates/{e.name} is missing: the ledger accepted {e.label()} "
                            f"(line(s) {list(e.lines[:5])})")
    return matched


def check_manifests(run_dir: Path, records: list[dict], problems: list[str]) -> int:
    """The server's ``aggregates`` manifests in its round summaries against the files (the last
    manifest naming a file wins: ``model.bin`` is rewritten every round); returns files checked."""
    latest: dict[str, tuple[int, object, object]] = {}
    for n, rec in enumerate(records, 1):
        manifest = rec.get("aggregates") if rec.get("kind") == "round" else None
        for name, want in (manifest.items() if isinstance(manifest, dict) else ()):
            latest[Path(str(name)).name] = (n, rec.get("round"), want)
    for name, (n, rnd, want) in sorted(latest.items()):
        got = _sha(run_dir / "aggregates" / name)
        if got != want:
            problems.append(f"aggregates/{name}: " + ("missing" if got is None else
                            f"SHA-256 {got[:12]}… differs from {str(want)[:12]}…") +
                            f", as recorded in the round {rnd} summary (line {n}): swapped, edited or deleted after "
                            "it was written")
    return len(latest)

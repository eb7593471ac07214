"""What both canary audits of ``carbonfed audit-attack`` share: the claim they test, and the
re-run of the audited run's federation in a private temporary folder.

Guarantees
----------
* :func:`isolated_simulation` runs ``cfg`` (the audited run's own config) with everything the
  run would write or keep inside ``tmp``: its out-dir, fresh BFV keys when HE is on, the
  clients' signing keys and a freshly sealed charter, and no client state folder (``state-dir``
  empty: no replay cache and no accountant carried over from any earlier run). Nothing is
  written to the audited folder; the caller removes ``tmp`` (a ``TemporaryDirectory``).
* ``env`` is set for the simulation only (its workers inherit it) and restored afterwards,
  whatever happens.
* Progress: ``label`` (which canary run this is) goes to stderr first, then the run's own
  display (:func:`carbonfed.federation.run.round_progress`: a bar on a terminal, else one line per
  round), so every re-run of an audit shows what it is and how far it got.
* :func:`claimed_epsilon` is the ε max a run claims, from its report, else from its ledger.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from unittest import mock

from carbonfed.federation.config import RunConfig
from carbonfed.federation.keys import keygen_for
from carbonfed.federation.run import round_progress
from carbonfed.federation.simulation import run_simulation
from carbonfed.privacy.ledger import read_ledger


def claimed_epsilon(run_dir: Path, cfg) -> float | None:
    """ε max the run claims: report.json's ``privacy.epsilon_max``, else the ledger's; None without DP."""
    if not cfg.dp:
        return None
    report = Path(run_dir) / "report.json"
    if report.is_file():
        p = json.loads(report.read_text()).get("privacy") or {}
        if p.get("epsilon_max") is not None:
            return float(p["epsilon_max"])
    last = {}
    for line in read_ledger(Path(run_dir) / "ledger.jsonl"):
        if line.get("kind") in ("stats", "train") and line.get("epsilon") is not None:
            last[line["country"]] = float(line["epsilon"])
    return max(last.values()) if last else None


def isolated_config(cfg: RunConfig, tmp: Path) -> RunConfig:
    """``cfg`` writing to ``tmp/run``, with fresh keys in ``tmp/keys`` when HE is on, no state folder."""
    keys = ""
    if cfg.he:
        keys = str(tmp / "keys")
        keygen_for(cfg, keys)
    return replace(cfg, keys_dir=keys, out_dir=str(tmp / "run"), state_dir="", charter="")


def isolated_simulation(cfg: RunConfig, env: dict[str, str] | None = None, label: str = "") -> Path:
    """Run ``cfg`` (from :func:`isolated_config`) with a progress display and ``env``; returns its out-dir."""
    logging.getLogger("flwr").setLevel(logging.ERROR)
    if label:
        print(f"{label}: re-running the federation ({cfg.rounds} rounds, {cfg.privacy}) in a temporary folder",
              file=sys.stderr, flush=True)
    display, on_round = round_progress(cfg)      # a bar on a terminal, else one line per round
    with mock.patch.dict(os.environ, env or {}), display:    # set for the simulation only, then restored
        run_simulation(cfg, on_round=on_round)
    return Path(cfg.out_dir)

"""Empirical privacy audit of a run: ``carbonfed audit-attack DIR``.

Two attacks, both black-box on the *final* decrypted model (what every key holder gets):

1. **One-run canary audit** (Steinke, Nasr, Jagielski 2023, "Privacy auditing with one (1)
   training run", arXiv:2305.08846). ``m`` canary rows (random, out-of-distribution features, a
   random label, unique years ``5000 + i``) are assigned to random *training* countries; each is
   included independently with probability 1/2 by a secret coin (numpy ``Generator`` seeded from
   OS entropy). The run's own config is re-run through Flower's simulation on a copy of the seed
   CSV (or of a CSV run's own table) plus the included canaries (fresh BFV keys when HE is on),
   and the final model is decrypted. The attacker scores each canary by its negative
   cross-entropy under that model (after the run's standardiser), guesses "included" for the
   ``k`` highest and "excluded" for the ``k`` lowest scores and abstains on the rest, for ``k``
   in :data:`K_FRACTIONS` × m (Bonferroni over the 4 tests). With ``r`` guesses of which ``v``
   are right, the bound is the largest ε for which the test of the paper's Theorem 3.1
   (approximate DP, the run's δ) rejects "the run is (ε, δ)-DP" at the requested confidence:

       P[W ≥ v] ≤ P[Binomial(r, e^ε/(1+e^ε)) ≥ v] + 2·m·δ·α,
       α = max_{1≤i≤v} (1/i)·P[v > Binomial(r, e^ε/(1+e^ε)) ≥ v − i]

   (δ = 0 gives the pure-ε test; both are reported, the (ε, δ) one is ``epsilon_lower_bound`` and
   is the one compared with the claimed ε). The bound is a *lower* bound on the ε of this
   mechanism: it holds with probability ≥ ``confidence`` over the coins, so a bound above the
   accountant's ε means a bug in the accounting or in the implementation (or, with probability at
   most 1 − confidence, a false alarm). A bound far below the claim is expected and proves
   nothing about the claim being tight: this attacker sees only the last model, each canary is
   one row among ~9,500 averaged over 131 clients, and with 21 features the canaries' random
   directions overlap, so their collective effect on the model (interference) swamps each one's
   own. (Calibrating the loss by the original run's model, trained without canaries, was tried
   on a 30-round ``none`` run and separated included from excluded canaries worse than the raw
   loss, so it is not used.)

   Adjacency: including a canary adds one row to one client, exactly the unit the per-client
   accountant covers. Side effects that the accountant treats as public (the client's row count,
   which weights FedAvg) change too; the loss attack does not look at them.

2. **Loss-based membership inference** on the original run (``DIR/model.pt``): members are the rows
   of the training countries, non-members the rows of the held-out countries; score = −loss.
   Reports ROC AUC and the TPR at 1% and 0.1% FPR. Non-members are *other countries*, so this
   measures country-level generalisation as much as row membership (no country has held-out rows
   of its own); it is descriptive, not a DP bound.

Output: a dict (and ``DIR/audit.json``); ``--json`` prints exactly one JSON object on stdout.

The statistics live in :mod:`carbonfed.privacy.audit.empirical`, the canaries and the attacker's
loss in :mod:`carbonfed.federation.experiments.canaries`; this module re-runs the federation.

Guarantees
----------
* The original run is read, never changed, apart from ``DIR/audit.json`` and ``DIR/audit/``
  (the canary run; a previous one is replaced), and ``DIR/model.pt`` when it has to be rebuilt.
* The canary run uses the run's own config (``server.json``) on a temporary copy of the data plus
  exactly the included canaries (checked), fresh keys when HE is on; the coins come from OS
  entropy, so they are secret from both runs.
* ``DIR/audit.json`` is written whether the audit passes or fails; a bound above the claim of
  either run raises :class:`~carbonfed.privacy.audit.empirical.AuditFailure` (exit code 3).
* ``--json`` prints exactly one JSON object on stdout: whatever the run prints goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from carbonfed.data import resolve_data_dir, split_countries
from carbonfed.data.seed import SEED_FILENAME, SEED_LABEL_SOURCE
from carbonfed.federation.cli import Parser
from carbonfed.federation.config import RunConfig
from carbonfed.federation.experiments.canaries import (CANARY_RADIUS, load_final_model, losses, make_canaries,
                                                        write_canary_data)
from carbonfed.federation.keys import keygen_for
from carbonfed.federation.report.build import build_report
from carbonfed.federation.run import round_progress
from carbonfed.federation.run_data import CSV, load_run_data
from carbonfed.federation.run_guard import existing_run
from carbonfed.federation.simulation import run_simulation
from carbonfed.privacy.audit.empirical import AuditFailure, canary_bound, check_claim, mia_metrics
from carbonfed.privacy.ledger import read_ledger

LABEL = "empirical lower bound"
METHOD = ("one-run canary audit, Steinke-Nasr-Jagielski 2023 Thm 3.1 ((eps, delta) with the run's delta; "
          "pure-eps also reported), black-box loss attack on the final model, Bonferroni over k")


# -- the run -------------------------------------------------------------------------------------
def claimed_epsilon(run_dir: Path, cfg) -> float | None:
    """ε max the run claims: report.json's ``privacy.epsilon_max``, else the ledger's; None without DP."""
    if not cfg.dp:
        return None
    report = run_dir / "report.json"
    if report.is_file():
        p = json.loads(report.read_text()).get("privacy") or {}
        if p.get("epsilon_max") is not None:
            return float(p["epsilon_max"])
    last = {}
    for line in read_ledger(run_dir / "ledger.jsonl"):
        if line.get("kind") in ("stats", "train") and line.get("epsilon") is not None:
            last[line["country"]] = float(line["epsilon"])
    return max(last.values()) if last else None


def with_canaries(cfg: RunConfig, ds, canaries: dict, folder: Path) -> RunConfig:
    """``cfg`` reading a copy of its data in ``folder`` plus the included canaries: the seed CSV,
    or the run's own table (a CSV run: canaries in its party and label columns)."""
    if cfg.dataset == CSV:
        dst = write_canary_data(Path(cfg.data), folder, canaries, ds.features, cfg.label_col,
                                party_column=cfg.client_col, label_names=ds.classes)
        return replace(cfg, data=str(dst))
    src = resolve_data_dir(cfg.data_dir or None) / SEED_FILENAME
    write_canary_data(src, folder, canaries, ds.features, SEED_LABEL_SOURCE)
    return replace(cfg, data_dir=str(folder))


def _canary_run(run_dir: Path, cfg, m: int, rng: np.random.Generator) -> dict:
    """Run the federation again with the included canaries; returns canaries, their losses, the run's claim."""
    if cfg.dataset not in ("seed", CSV):
        raise ValueError(f"audit-attack supports the seed data set and CSV runs, this run used {cfg.dataset!r}")
    ds = load_run_data(cfg)
    part = split_countries(ds.countries(), cfg.holdout_offset)
    canaries = make_canaries(ds, part.train, m, rng)
    out = run_dir / "audit" / "run"
    if out.exists():
        shutil.rmtree(out)                      # a previous audit's canary run (audit/ is ours)
    with tempfile.TemporaryDirectory(prefix="carbonfed-audit-") as tmp:
        tmp = Path(tmp)
        audit_cfg = with_canaries(cfg, ds, canaries, tmp / "data")
        audit_ds = load_run_data(audit_cfg)
        if audit_ds.countries() != ds.countries() or len(audit_ds.frame) != len(ds.frame) + int(canaries["included"].sum()):
            raise RuntimeError("the canary data set does not hold exactly the original rows plus the included canaries")
        too_many = [c for c in part.train if len(audit_ds.client_arrays(c)[1]) > cfg.max_client_samples]
        if too_many:
            raise ValueError(f"canaries push {too_many[:3]} above max-client-samples; use fewer canaries")
        keys = ""
        if cfg.he:
            keys = str(tmp / "keys")
            keygen_for(cfg, keys)
        audit_cfg = replace(audit_cfg, keys_dir=keys, out_dir=str(out), state_dir="", charter="")
        logging.getLogger("flwr").setLevel(logging.ERROR)
        t0 = time.time()
        display, on_round = round_progress(audit_cfg)      # a bar on a terminal, else one line per round
        with display:
            run_simulation(audit_cfg, on_round=on_round)
        report = build_report(out, keys or None)
        seconds = time.time() - t0
        if not (out / "model.pt").is_file():
            raise RuntimeError(f"the canary run in {out} produced no final model")
        model, scaler = load_final_model(out / "model.pt")
        loss = losses(model, scaler, canaries["x"], canaries["label"])
    return {"canaries": canaries, "loss": loss, "seconds": seconds,
            "claimed": (report.get("privacy") or {}).get("epsilon_max"),
            "accuracy": report["metrics"]["accuracy"]}


def _open_run(run_dir, canaries: int, confidence: float) -> tuple[Path, RunConfig]:
    """(resolved run dir, its RunConfig from ``server.json``), after checking the audit's settings."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if canaries < 2:
        raise ValueError(f"need at least 2 canaries, got {canaries}")
    run = existing_run(run_dir, "server.json").resolve()
    return run, RunConfig.from_flower(json.loads((run / "server.json").read_text())["config"])


def membership_inference(run: Path, cfg: RunConfig, keys_dir=None) -> dict:
    """Loss attack on the run's final model: training countries' rows against held-out countries' rows."""
    if not (run / "model.pt").is_file():
        build_report(run, keys_dir)
    model, scaler = load_final_model(run / "model.pt")
    ds = load_run_data(cfg)
    part = split_countries(ds.countries(), cfg.holdout_offset)
    xm, ym = ds.all_arrays(part.train)
    xn, yn = ds.all_arrays(part.test)
    lm, ln = losses(model, scaler, xm, ym), losses(model, scaler, xn, yn)
    return {**mia_metrics(-lm, -ln), "members": len(ym), "nonmembers": len(yn),
            "member_mean_loss": float(lm.mean()), "nonmember_mean_loss": float(ln.mean()),
            "min_resolvable_fpr": 1.0 / len(yn),
            "note": "members = rows of training countries, non-members = rows of held-out countries"}


def _result(run: Path, cfg: RunConfig, confidence: float, claimed, canary: dict, bound: dict, mia: dict,
            t0: float) -> dict:
    """The audit's record (``audit.json``), status ``ok``."""
    c = canary["canaries"]
    scores = -canary["loss"]
    m = len(scores)
    both = 0 < c["included"].sum() < m
    canary_auc = mia_metrics(scores[c["included"]], scores[~c["included"]])["mia_auc"] if both else None
    return {
        "label": LABEL, "method": METHOD, "run_dir": str(run), "privacy_mode": cfg.privacy, "rounds": cfg.rounds,
        "epsilon_lower_bound": bound["epsilon_lower_bound"], "delta": cfg.delta,
        "epsilon_lower_bound_pure": bound["epsilon_lower_bound_pure"],
        "confidence": confidence, "claimed_epsilon": claimed,
        "claimed_epsilon_canary_run": canary["claimed"],
        "m": m, "guesses": bound["guesses"], "correct": bound["correct"],
        "score": bound["score"], "k_per_side": bound["k_per_side"], "tests": bound["tests"],
        "per_test_confidence": bound["per_test_confidence"], "sweep": bound["sweep"],
        "canary_auc": canary_auc,        # descriptive: ROC AUC of the canary score, included vs excluded
        "mia_auc": mia["mia_auc"], "tpr_at_1pct_fpr": mia["tpr_at_1pct_fpr"],
        "tpr_at_0_1pct_fpr": mia["tpr_at_0_1pct_fpr"], "mia": mia,
        "canary_run": {"dir": str(run / "audit" / "run"), "seconds": canary["seconds"],
                       "accuracy": canary["accuracy"], "included": int(c["included"].sum()),
                       "design": f"random direction in standardised feature space at {CANARY_RADIUS} std, "
                                 "uniform random label, years 5000+i, random training countries",
                       "inclusion": [int(b) for b in c["included"]],
                       "loss": [float(v) for v in canary["loss"]],
                       "countries": c["country"], "years": c["year"], "labels": [int(v) for v in c["label"]],
                       "features": [[float(v) for v in row] for row in c["x"]]},
        "seconds": time.time() - t0, "status": "ok",
    }


def audit_run(run_dir, *, canaries: int = 200, confidence: float = 0.95, keys_dir=None) -> dict:
    """Audit the run in ``run_dir``; writes ``run_dir/audit.json``; raises AuditFailure on a violated claim."""
    run, cfg = _open_run(run_dir, canaries, confidence)
    t0 = time.time()
    # 2. membership inference on the original run's final model.
    mia = membership_inference(run, cfg, keys_dir)
    # 1. one-run canary audit.
    rng = np.random.default_rng()               # OS entropy: the coins are secret from the run
    canary = _canary_run(run, cfg, canaries, rng)
    bound = canary_bound(-canary["loss"], canary["canaries"]["included"], confidence=confidence, delta=cfg.delta,
                         rng=rng)
    claimed = claimed_epsilon(run, cfg)
    result = _result(run, cfg, confidence, claimed, canary, bound, mia, t0)
    # The bound is about the canary run's mechanism; it must respect the claim of either run.
    claims = [e for e in (claimed, canary["claimed"]) if e is not None]
    try:
        check_claim(result["epsilon_lower_bound"], min(claims) if claims else None, confidence, result)
    except AuditFailure as exc:
        result.update(status="FAILED", error=str(exc))
        (run / "audit.json").write_text(json.dumps(result, indent=2))
        raise
    (run / "audit.json").write_text(json.dumps(result, indent=2))
    return result


# -- the command ---------------------------------------------------------------------------------
def _fmt(x) -> str:
    return "null" if x is None else f"{x:.4f}"


def summary_text(res: dict) -> str:
    return "\n".join([
        f"audit of {res['run_dir']} ({res['privacy_mode']}, {res['rounds']} rounds)",
        f"  canaries: ε ≥ {_fmt(res['epsilon_lower_bound'])} at δ={res['delta']:g} "
        f"(pure ε ≥ {_fmt(res['epsilon_lower_bound_pure'])}), {res['confidence']:.0%} confidence, "
        f"{res['correct']}/{res['guesses']} guesses correct ({res['score']} score), m={res['m']} [{res['label']}]",
        f"  claimed ε: {_fmt(res['claimed_epsilon'])}",
        f"  membership inference: AUC {res['mia_auc']:.4f}, TPR@1%FPR {res['tpr_at_1pct_fpr']:.4f}, "
        f"TPR@0.1%FPR {res['tpr_at_0_1pct_fpr']:.4f}",
        f"  written: {Path(res['run_dir']) / 'audit.json'}"])


@contextlib.contextmanager
def _stdout_to_stderr():
    """Keep stdout clean for the JSON object: anything the run prints (fd 1) goes to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv=None) -> int:
    ap = Parser(prog="carbonfed audit-attack",
                description="Empirical privacy audit of a run: one-run canary ε lower bound "
                            "(re-runs the federation with canaries) and loss-based membership inference.")
    ap.add_argument("run_dir", metavar="DIR", help="run directory (server.json, ledger.jsonl, model.pt)")
    ap.add_argument("--canaries", type=int, default=200, help="number of canaries m (default 200)")
    ap.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound (default 0.95)")
    ap.add_argument("--keys", default=None, help="secret context folder, only if DIR/model.pt must be rebuilt "
                                                 "(HE runs; default: the run config's keys-dir)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (default: a summary)")
    args = ap.parse_args(argv)
    failure = None
    try:
        with (_stdout_to_stderr() if args.json else contextlib.nullcontext()):
            try:
                res = audit_run(args.run_dir, canaries=args.canaries, confidence=args.confidence, keys_dir=args.keys)
            except AuditFailure as exc:
                failure, res = exc, exc.result
    except (ValueError, OSError) as exc:
        print(f"carbonfed audit-attack: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res))
    elif res is not None:
        print(summary_text(res))
    if failure is not None:
        print(str(failure), file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

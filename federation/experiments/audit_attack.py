"""Empirical privacy audit of a run: ``carbonfed audit-attack DIR``.

Three attacks; the first two re-run the run's own config with canaries and turn the guesses
about them into an ε lower bound (the one-run audit of Steinke, Nasr, Jagielski 2023, "Privacy
auditing with one (1) training run", arXiv:2305.08846, Theorem 3.1 at the run's δ; the maths in
:mod:`carbonfed.privacy.audit.empirical`):

1. **White-box, all-iterates canary audit** (the verdict's first line, every DP mode):
   ``dp``/``dp+he``: :mod:`carbonfed.federation.experiments.audit_whitebox`, gradient canaries in
   the clients' DP-SGD steps, scored from every client's decrypted upload of every round;
   ``ddp+he``: :mod:`carbonfed.federation.experiments.audit_ddp`, record canaries in the clients'
   clipped sums, scored from every round's decrypted aggregate. Each is what the key holders can
   see in that mode; each docstring says what the auditor observes and why.
2. **Black-box canary audit** (the second line, every mode). ``m`` canary rows (random,
   out-of-distribution features, a random label, unique years ``5000 + i``) are assigned to
   random *training* countries, each included by a secret fair coin; the run is re-run on a
   copy of its data plus the included canaries and the *final* model is decrypted; the attacker
   scores each canary by its negative cross-entropy under that model, guesses on the ``k``
   highest and lowest scores (Bonferroni over k). This attacker sees only the last model and
   each canary is one row among ~9,500 averaged over 131 clients: its bound is weak (often 0)
   and proves nothing about the claim being tight; it is kept as an independent second line.
3. **Loss-based membership inference** on the original run's final model (``DIR/model.pt``):
   members are the rows of the training countries, non-members those of the held-out countries;
   ROC AUC and TPR at 1% and 0.1% FPR. Descriptive (country-level generalisation as much as row
   membership), not a DP bound; skipped when the run has no ``model.pt`` (``carbonfed report
   DIR`` makes it), since the audit writes nothing else into the run.

Verdict: the claimed ε is the run's ``epsilon_max`` (its report, else its ledger) and that of the
canary runs; ``"claim refuted"`` when a lower bound exceeds the smallest of them (exit code 3,
:class:`~carbonfed.privacy.audit.empirical.AuditFailure`; a false alarm has probability at most
1 − confidence), ``"consistent"`` otherwise, ``"no claim"`` without DP. A lower bound far below the
claim is expected: it shows what this attack could prove, not that the claim is tight.

Guarantees
----------
* The audited folder is read, never changed, apart from ``DIR/audit.json``: each canary run, its
  fresh keys and client state live in a temporary folder removed when the audit ends or fails
  (:func:`~carbonfed.federation.experiments.audit_run.isolated_simulation`), so audits can be
  repeated on one folder and each finds it as the previous one left it.
* The canary runs use the run's own config (``server.json``) with exactly the included canaries
  (checked for the black-box line); the coins come from OS entropy, secret from both runs.
* ``DIR/audit.json`` is written whether the audit passes or fails.
* ``--json`` prints exactly one JSON object on stdout: whatever the run prints goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
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
from carbonfed.federation.experiments.audit_ddp import ddp_whitebox_audit
from carbonfed.federation.experiments.audit_run import claimed_epsilon, isolated_config, isolated_simulation
from carbonfed.federation.experiments.audit_whitebox import DEFAULT_CANARIES, whitebox_audit
from carbonfed.federation.experiments.canaries import (CANARY_RADIUS, load_final_model, losses, make_canaries,
                                                        write_canary_data)
from carbonfed.federation.report.build import build_report
from carbonfed.federation.run_data import CSV, load_run_data
from carbonfed.federation.run_guard import existing_run
from carbonfed.privacy.audit.empirical import AuditFailure, canary_bound, check_claim, mia_metrics

LABEL = "empirical lower bound"
METHOD = ("one-run canary audit, Steinke-Nasr-Jagielski 2023 Thm 3.1 ((eps, delta) with the run's delta; "
          "pure-eps also reported), black-box loss attack on the final model, Bonferroni over k")


# -- the black-box line ---------------------------------------------------------------------------
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


def _canary_data(cfg, ds, part, canaries: dict, tmp: Path) -> RunConfig:
    """The run's config on a copy of its data plus exactly the included canaries (checked)."""
    audit_cfg = with_canaries(cfg, ds, canaries, tmp / "data")
    audit_ds = load_run_data(audit_cfg)
    if audit_ds.countries() != ds.countries() or len(audit_ds.frame) != len(ds.frame) + int(canaries["included"].sum()):
        raise RuntimeError("the canary data set does not hold exactly the original rows plus the included canaries")
    too_many = [c for c in part.train if len(audit_ds.client_arrays(c)[1]) > cfg.max_client_samples]
    if too_many:
        raise ValueError(f"canaries push {too_many[:3]} above max-client-samples; use fewer canaries")
    return audit_cfg


def blackbox_audit(cfg, m: int, confidence: float, rng: np.random.Generator) -> dict:
    """Re-run the federation with the included canary rows; bound ε from their loss under the final model."""
    if cfg.dataset not in ("seed", CSV):
        raise ValueError(f"audit-attack supports the seed data set and CSV runs, this run used {cfg.dataset!r}")
    ds = load_run_data(cfg)
    part = split_countries(ds.countries(), cfg.holdout_offset)
    c = make_canaries(ds, part.train, m, rng, cfg.log_bound)      # resolved: the preset's range
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="carbonfed-audit-bb-") as tmp:
        tmp = Path(tmp)
        run_cfg = isolated_config(_canary_data(cfg, ds, part, c, tmp), tmp)
        out = isolated_simulation(run_cfg, label=f"black-box audit ({m} canary rows)")
        report = build_report(out, run_cfg.keys_dir or None)
        if not (out / "model.pt").is_file():
            raise RuntimeError("the canary run produced no final model")
        loss = losses(*load_final_model(out / "model.pt"), c["x"], c["label"])
    bound = canary_bound(-loss, c["included"], confidence=confidence, delta=cfg.delta, rng=rng)
    scores, inc = -loss, c["included"]
    return {**{k: bound[k] for k in ("epsilon_lower_bound", "epsilon_lower_bound_pure", "guesses", "correct",
                                     "score", "k_per_side", "tests", "per_test_confidence", "sweep")},
            "method": METHOD, "confidence": confidence, "delta": cfg.delta, "m": m, "seconds": time.time() - t0,
            "canary_auc": mia_metrics(scores[inc], scores[~inc])["mia_auc"] if 0 < inc.sum() < m else None,
            "claimed_epsilon_canary_run": (report.get("privacy") or {}).get("epsilon_max"),
            "accuracy": report["metrics"]["accuracy"], "included": int(inc.sum()),
            "design": f"random direction in standardised feature space at {CANARY_RADIUS} std, "
                      "uniform random label, years 5000+i, random training countries",
            "inclusion": [int(b) for b in inc], "loss": [float(v) for v in loss],
            "countries": c["country"], "years": c["year"], "labels": [int(v) for v in c["label"]],
            "features": [[float(v) for v in row] for row in c["x"]]}


# -- membership inference -------------------------------------------------------------------------
def membership_inference(run: Path, cfg: RunConfig) -> dict | None:
    """Loss attack on the run's final model: training countries' rows against held-out countries'
    rows (None without ``model.pt``: the audit does not write it into the run)."""
    if not (run / "model.pt").is_file():
        return None
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


# -- the audit ------------------------------------------------------------------------------------
def _open_run(run_dir, canaries: int, confidence: float) -> tuple[Path, RunConfig]:
    """(resolved run dir, its RunConfig from ``server.json``), after checking the audit's settings."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if canaries < 2:
        raise ValueError(f"need at least 2 canaries, got {canaries}")
    run = existing_run(run_dir, "server.json").resolve()
    return run, RunConfig.from_flower(json.loads((run / "server.json").read_text())["config"])


def verdict(claim: float | None, lines: dict) -> tuple[str, str | None]:
    """("consistent" | "claim refuted" | "no claim", the line whose bound exceeds the claim)."""
    if claim is None:
        return "no claim", None
    over = [name for name, res in lines.items() if res and res["epsilon_lower_bound"] > claim]
    return ("claim refuted", over[0]) if over else ("consistent", None)


def _result(run: Path, cfg: RunConfig, confidence: float, lines: dict, mia: dict | None, t0: float) -> dict:
    """The audit's record (``audit.json``): the headline is the first line that ran."""
    claimed = claimed_epsilon(run, cfg)
    claims = [e for e in [claimed] + [r.get("claimed_epsilon_canary_run") for r in lines.values() if r]
              if e is not None]
    claim = min(claims) if claims else None
    head_name = next(name for name, res in lines.items() if res)
    head = lines[head_name]
    word, by = verdict(claim, lines)
    return {
        "label": LABEL, "run_dir": str(run), "privacy_mode": cfg.privacy, "rounds": cfg.rounds,
        "verdict": word, "refuted_by": by, "claimed_epsilon": claimed, "claim_tested": claim,
        "epsilon_lower_bound": head["epsilon_lower_bound"],
        "epsilon_lower_bound_pure": head["epsilon_lower_bound_pure"],
        "confidence": confidence, "delta": cfg.delta, "headline": head_name, "method": head["method"],
        **{k: head[k] for k in ("m", "guesses", "correct", "score", "k_per_side", "tests")},
        "whitebox": lines.get("whitebox"), "blackbox": lines.get("blackbox"),
        "mia_auc": mia["mia_auc"] if mia else None, "tpr_at_1pct_fpr": mia["tpr_at_1pct_fpr"] if mia else None,
        "tpr_at_0_1pct_fpr": mia["tpr_at_0_1pct_fpr"] if mia else None, "mia": mia,
        "seconds": time.time() - t0, "status": "ok",
    }


def audit_run(run_dir, *, canaries: int = 200, confidence: float = 0.95, whitebox_canaries: int = DEFAULT_CANARIES,
              blackbox: bool = True, noise_scale: float = 1.0) -> dict:
    """Audit the run in ``run_dir``; writes ``run_dir/audit.json``; raises AuditFailure on a refuted claim.

    ``noise_scale`` ≠ 1 is the test-only fault drill of the white-box line (its clients secretly
    draw that fraction of their noise)."""
    run, cfg = _open_run(run_dir, canaries, confidence)
    t0 = time.time()
    rng = np.random.default_rng()               # OS entropy: the coins are secret from the runs
    mia = membership_inference(run, cfg)
    lines = {"whitebox": None, "blackbox": None}
    if cfg.dp:
        line = ddp_whitebox_audit if cfg.ddp else whitebox_audit
        lines["whitebox"] = line(cfg, whitebox_canaries, confidence, rng, noise_scale)
    if blackbox or lines["whitebox"] is None:
        lines["blackbox"] = blackbox_audit(cfg, canaries, confidence, rng)
    result = _result(run, cfg, confidence, lines, mia, t0)
    try:
        if result["verdict"] == "claim refuted":
            check_claim(lines[result["refuted_by"]]["epsilon_lower_bound"], result["claim_tested"], confidence, result)
    except AuditFailure as exc:
        result.update(status="FAILED", error=str(exc))
        (run / "audit.json").write_text(json.dumps(result, indent=2))
        raise
    (run / "audit.json").write_text(json.dumps(result, indent=2))
    return result


# -- the command ---------------------------------------------------------------------------------
def _fmt(x) -> str:
    return "null" if x is None else f"{x:.4f}"


def _line(name: str, r: dict | None) -> str:
    if not r:
        return f"  {name}: not run"
    return (f"  {name}: ε ≥ {_fmt(r['epsilon_lower_bound'])} at δ={r['delta']:g} (pure ε ≥ "
            f"{_fmt(r['epsilon_lower_bound_pure'])}), {r['confidence']:.0%} confidence, {r['correct']}/{r['guesses']} "
            f"guesses correct ({r['score']} score), m={r['m']}, {r['seconds']:.0f} s")


def summary_text(res: dict) -> str:
    mia = res.get("mia")
    return "\n".join([
        f"audit of {res['run_dir']} ({res['privacy_mode']}, {res['rounds']} rounds): {res['verdict'].upper()}"
        + (f" by the {res['refuted_by']} line" if res.get("refuted_by") else ""),
        f"  claimed ε: {_fmt(res['claimed_epsilon'])} (tested: {_fmt(res['claim_tested'])})",
        _line("white-box canaries (what the key holders decrypt, every round)", res.get("whitebox")),
        _line("black-box canaries (final model's loss)", res.get("blackbox")),
        (f"  membership inference: AUC {mia['mia_auc']:.4f}, TPR@1%FPR {mia['tpr_at_1pct_fpr']:.4f}, "
         f"TPR@0.1%FPR {mia['tpr_at_0_1pct_fpr']:.4f}") if mia else
        "  membership inference: skipped (no model.pt: `carbonfed report DIR` makes it)",
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
                description="Empirical privacy audit of a run: one-run canary ε lower bounds (re-runs the "
                            "federation with white-box gradient canaries, then with black-box canary rows), a "
                            "verdict on the claimed ε, and loss-based membership inference.")
    ap.add_argument("run_dir", metavar="DIR", help="run directory (server.json, ledger.jsonl, model.pt)")
    ap.add_argument("--canaries", type=int, default=200, help="black-box canary rows m (default 200)")
    ap.add_argument("--wb-canaries", type=int, default=DEFAULT_CANARIES,
                    help=f"white-box gradient canaries (default {DEFAULT_CANARIES}; ddp+he: at most 3/4 x rounds x "
                         "(the output layer's inputs + 1))")
    ap.add_argument("--no-blackbox", action="store_true",
                    help="skip the black-box line when the white-box one runs (default: run both)")
    ap.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound (default 0.95)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (default: a summary)")
    args = ap.parse_args(argv)
    failure = None
    try:
        with (_stdout_to_stderr() if args.json else contextlib.nullcontext()):
            try:
                res = audit_run(args.run_dir, canaries=args.canaries, confidence=args.confidence,
                                whitebox_canaries=args.wb_canaries, blackbox=not args.no_blackbox)
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

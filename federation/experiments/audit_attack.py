"""Empirical privacy audit of a run: ``carbonfed audit-attack DIR``.

Two attacks, both black-box on the *final* decrypted model (what every key holder gets):

1. **One-run canary audit** (Steinke, Nasr, Jagielski 2023, "Privacy auditing with one (1)
   training run", arXiv:2305.08846). ``m`` canary rows (random, out-of-distribution features, a
   random label, unique years ``5000 + i``) are assigned to random *training* countries; each is
   included independently with probability 1/2 by a secret coin (numpy ``Generator`` seeded from
   OS entropy). The run's own config is re-run through Flower's simulation on a copy of the seed
   CSV plus the included canaries (fresh BFV keys when HE is on), and the final model is decrypted.
   The attacker scores each canary by its negative cross-entropy under that model (after the
   run's standardiser), guesses "included" for the ``k`` highest and "excluded" for the ``k``
   lowest scores and abstains on the rest, for ``k`` in :data:`K_FRACTIONS` × m (Bonferroni over
   the 4 tests). With ``r`` guesses of which ``v`` are right, the bound is the largest ε for
   which the test of the paper's Theorem 3.1 (approximate DP, the run's δ) rejects "the run is
   (ε, δ)-DP" at the requested confidence:

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
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
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
from scipy import special, stats

LABEL = "empirical lower bound"
METHOD = ("one-run canary audit, Steinke-Nasr-Jagielski 2023 Thm 3.1 ((eps, delta) with the run's delta; "
          "pure-eps also reported), black-box loss attack on the final model, Bonferroni over k")
K_FRACTIONS = (0.05, 0.1, 0.2, 0.5)  # guesses per side, as fractions of m (k+ = k- = fraction·m)
CANARY_YEAR0 = 5000
# Canaries: a random direction in the standardised feature space (plain mean/std of the
# transformed features of the training rows), at this many standard deviations from the mean.
CANARY_RADIUS = (8.0, 16.0)
CANARY_T_CLIP = 0.95                 # transformed values stay inside (-1, 1), the transform's range


class AuditFailure(RuntimeError):
    """The empirical lower bound exceeds the claimed ε: the accounting or the implementation is wrong."""

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result


# -- the statistics ------------------------------------------------------------------------------
def p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """P[≥ v correct of r guesses] under "(ε, δ)-DP", m canaries (Steinke et al. 2023, Thm 3.1)."""
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if epsilon < 0 or not (0 <= delta <= 1):
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = float(special.expit(epsilon))                 # e^ε / (1 + e^ε): accuracy of ε-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))         # P[Binomial(r, q) >= v]
    alpha = 0.0
    if delta > 0 and v > 0:
        i = np.arange(1, v + 1)
        below = np.cumsum(stats.binom.pmf(v - i, r, q))   # P[v > Binomial(r, q) >= v - i]
        alpha = float(np.max(below / i))
    return min(1.0, beta + 2.0 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, confidence: float = 0.95, delta: float = 0.0,
                        tol: float = 1e-7) -> float:
    """Largest ε such that the test rejects "(ε, δ)-DP" (p-value ≤ 1 − confidence); 0 if none does."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    level = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) > level:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) <= level:       # p-value grows with ε (to 1 as ε → ∞ when v ≤ r)
        lo, hi = hi, hi * 2
        if hi > 1e3:      # unreachable for v <= r (the p-value tends to 1); never return inf into JSON
            raise RuntimeError(f"no upper bracket for the ε bound (m={m}, r={r}, v={v})")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) <= level:
            lo = mid
        else:
            hi = mid
    return lo


def guess_counts(scores: np.ndarray, included: np.ndarray, k: int, rng: np.random.Generator) -> tuple[int, int]:
    """(guesses, correct): "in" for the k highest scores, "out" for the k lowest, abstain on the rest."""
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    m = len(scores)
    if not 0 <= 2 * k <= m:
        raise ValueError(f"cannot make {k} guesses per side with {m} canaries")
    order = np.lexsort((rng.random(m), scores))       # ascending score, ties broken at random
    low, high = order[:k], order[m - k:] if k else order[:0]
    correct = int(included[high].sum() + (~included[low]).sum())
    return 2 * k, correct


def canary_bound(scores, included, *, confidence: float = 0.95, delta: float = 0.0,
                 fractions=K_FRACTIONS, rng: np.random.Generator | None = None) -> dict:
    """Best bound over the score variants × k = fraction·m, Bonferroni-corrected.

    ``scores``: one array (higher = "included"), or ``{name: array}`` for several score
    variants. Each of the T = variants × k tests runs at level (1 − confidence)/T, so the
    largest bound holds with probability ≥ ``confidence``.
    """
    rng = rng or np.random.default_rng()
    variants = dict(scores) if isinstance(scores, dict) else {"loss": scores}
    m = len(next(iter(variants.values())))
    ks = sorted({k for k in (int(round(f * m)) for f in fractions) if 1 <= k and 2 * k <= m})
    if not ks:
        raise ValueError(f"{m} canaries are too few for any guess")
    per_test = 1.0 - (1.0 - confidence) / (len(ks) * len(variants))
    sweep = []
    for name, sc in variants.items():
        if len(sc) != m:
            raise ValueError(f"score variant {name!r} has {len(sc)} scores for {m} canaries")
        for k in ks:
            r, v = guess_counts(sc, included, k, rng)
            sweep.append({"score": name, "k_per_side": k, "guesses": r, "correct": v,
                          "epsilon": epsilon_lower_bound(m, r, v, per_test, delta),
                          "epsilon_pure": epsilon_lower_bound(m, r, v, per_test, 0.0)})
    best = max(sweep, key=lambda s: (s["epsilon"], s["epsilon_pure"], s["correct"] / s["guesses"]))
    return {"epsilon_lower_bound": best["epsilon"],
            "epsilon_lower_bound_pure": max(s["epsilon_pure"] for s in sweep),
            "guesses": best["guesses"], "correct": best["correct"], "k_per_side": best["k_per_side"],
            "score": best["score"], "tests": len(sweep), "per_test_confidence": per_test, "sweep": sweep}


def check_claim(lower_bound: float, claimed_epsilon: float | None, confidence: float = 0.95,
                result: dict | None = None) -> None:
    """Raise :class:`AuditFailure` when the lower bound exceeds the claimed ε (no claim: no check)."""
    if claimed_epsilon is None or not lower_bound > claimed_epsilon:
        return
    raise AuditFailure(
        f"AUDIT FAILED: the empirical ε lower bound {lower_bound:.4f} exceeds the claimed ε "
        f"{claimed_epsilon:.4f}. This indicates a bug in the privacy accounting or in the DP "
        f"implementation (the bound holds with probability >= {confidence:g} if the claim is true; "
        f"a false alarm has probability <= {1 - confidence:.2g}, so rerun the audit to confirm).", result)


def mia_metrics(member_scores, nonmember_scores) -> dict:
    """ROC AUC and TPR at 1% / 0.1% FPR of 'higher score = member'."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    s = np.concatenate([member_scores, nonmember_scores]).astype(np.float64)
    fpr, tpr, _ = roc_curve(y, s)

    def tpr_at(target):
        ok = fpr <= target
        return float(tpr[ok].max()) if ok.any() else 0.0
    return {"mia_auc": float(roc_auc_score(y, s)), "tpr_at_1pct_fpr": tpr_at(0.01),
            "tpr_at_0_1pct_fpr": tpr_at(0.001)}


# -- models and losses ---------------------------------------------------------------------------
def load_final_model(model_pt: str | Path):
    """(model, standardizer) from a report's ``model.pt``."""
    import torch

    from carbonfed.data.features import Standardizer
    from carbonfed.models.mlp import build_model

    saved = torch.load(model_pt, map_location="cpu", weights_only=False)
    model = build_model(len(saved["features"]), len(saved["classes"]), saved["hidden"])
    model.load_state_dict(saved["state_dict"])
    model.eval()
    return model, Standardizer.from_dict(saved["scaler"])


def losses(model, scaler, x_raw: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy of the model on raw features (standardised as in training)."""
    import torch

    with torch.no_grad():
        logits = model(torch.from_numpy(scaler.apply(np.asarray(x_raw, dtype=np.float32))))
        return torch.nn.functional.cross_entropy(logits, torch.from_numpy(np.asarray(y, dtype=np.int64)),
                                                 reduction="none").numpy().astype(np.float64)


# -- canaries ------------------------------------------------------------------------------------
def make_canaries(ds, train_countries, m: int, rng: np.random.Generator) -> dict:
    """m canary rows for training countries and the secret inclusion coins (fair, independent)."""
    from carbonfed.data.features import LOG_BOUND, transform

    x_train, _ = ds.all_arrays(train_countries)
    t = transform(x_train)
    mean, std = t.mean(0), np.maximum(t.std(0), 1e-3)
    d = len(ds.features)
    direction = rng.normal(size=(m, d))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    radius = rng.uniform(*CANARY_RADIUS, size=(m, 1))
    tc = np.clip(mean + std * direction * radius, -CANARY_T_CLIP, CANARY_T_CLIP)
    x = np.sign(tc) * np.expm1(np.abs(tc) * LOG_BOUND)
    return {"country": [str(c) for c in rng.choice(list(train_countries), size=m)],
            "year": [CANARY_YEAR0 + i for i in range(m)],
            "x": x, "label": rng.integers(0, len(ds.classes), size=m),
            "included": rng.random(m) < 0.5}


def write_canary_data(src_csv: Path, dst_dir: Path, canaries: dict, features, label_column: str) -> Path:
    """Copy ``src_csv`` into ``dst_dir`` and append the *included* canaries as rows."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / src_csv.name
    raw = src_csv.read_bytes()
    header = next(csv.reader(io.StringIO(raw.decode("utf-8-sig").splitlines()[0])))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, restval="", lineterminator="\n")
    for i in np.flatnonzero(canaries["included"]):
        row = {"country": canaries["country"][i], "year": canaries["year"][i], label_column: int(canaries["label"][i])}
        row.update({f: repr(float(v)) for f, v in zip(features, canaries["x"][i])})
        writer.writerow(row)
    with open(dst, "wb") as fh:
        fh.write(raw if raw.endswith(b"\n") else raw + b"\n")
        fh.write(buf.getvalue().encode())
    return dst


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
    from carbonfed.privacy.ledger import read_ledger

    last = {}
    for line in read_ledger(run_dir / "ledger.jsonl"):
        if line.get("kind") in ("stats", "train") and line.get("epsilon") is not None:
            last[line["country"]] = float(line["epsilon"])
    return max(last.values()) if last else None


def _canary_run(run_dir: Path, cfg, m: int, rng: np.random.Generator) -> dict:
    """Run the federation again with the included canaries; returns canaries, their losses, the run's claim."""
    from carbonfed.data import load_dataset, resolve_data_dir, split_countries
    from carbonfed.data.seed import SEED_FILENAME, SEED_LABEL_SOURCE
    from carbonfed.federation.report.build import build_report
    from carbonfed.federation.simulation import run_simulation
    from carbonfed.privacy.he import keygen

    if cfg.dataset != "seed":
        raise ValueError(f"audit-attack supports the seed data set only, this run used {cfg.dataset!r}")
    src = resolve_data_dir(cfg.data_dir or None) / SEED_FILENAME
    ds = load_dataset(cfg.dataset, src.parent)
    part = split_countries(ds.countries(), cfg.holdout_offset)
    canaries = make_canaries(ds, part.train, m, rng)
    out = run_dir / "audit" / "run"
    if out.exists():
        shutil.rmtree(out)                      # a previous audit's canary run (audit/ is ours)
    with tempfile.TemporaryDirectory(prefix="carbonfed-audit-") as tmp:
        tmp = Path(tmp)
        write_canary_data(src, tmp / "data", canaries, ds.features, SEED_LABEL_SOURCE)
        audit_ds = load_dataset(cfg.dataset, tmp / "data")
        if audit_ds.countries() != ds.countries() or len(audit_ds.frame) != len(ds.frame) + int(canaries["included"].sum()):
            raise RuntimeError("the canary data set does not hold exactly the original rows plus the included canaries")
        too_many = [c for c in part.train if len(audit_ds.client_arrays(c)[1]) > cfg.max_client_samples]
        if too_many:
            raise ValueError(f"canaries push {too_many[:3]} above max-client-samples; use fewer canaries")
        keys = ""
        if cfg.he:
            keys = str(tmp / "keys")
            keygen(keys)
        audit_cfg = replace(cfg, data_dir=str(tmp / "data"), keys_dir=keys, out_dir=str(out))
        logging.getLogger("flwr").setLevel(logging.ERROR)
        t0 = time.time()
        run_simulation(audit_cfg)
        report = build_report(out, keys or None)
        seconds = time.time() - t0
        if not (out / "model.pt").is_file():
            raise RuntimeError(f"the canary run in {out} produced no final model")
        model, scaler = load_final_model(out / "model.pt")
        loss = losses(model, scaler, canaries["x"], canaries["label"])
    return {"canaries": canaries, "loss": loss, "seconds": seconds,
            "claimed": (report.get("privacy") or {}).get("epsilon_max"),
            "accuracy": report["metrics"]["accuracy"]}


def audit_run(run_dir, *, canaries: int = 200, confidence: float = 0.95, keys_dir=None) -> dict:
    """Audit the run in ``run_dir``; writes ``run_dir/audit.json``; raises AuditFailure on a violated claim."""
    from carbonfed.data import load_dataset, split_countries
    from carbonfed.federation.config import RunConfig
    from carbonfed.federation.report.build import build_report

    run = Path(run_dir).resolve()
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if canaries < 2:
        raise ValueError(f"need at least 2 canaries, got {canaries}")
    server = run / "server.json"
    if not server.is_file():
        raise ValueError(f"{run} holds no run (server.json missing)")
    cfg = RunConfig.from_flower(json.loads(server.read_text())["config"])
    t0 = time.time()

    # 2. membership inference on the original run's final model.
    if not (run / "model.pt").is_file():
        build_report(run, keys_dir)
    model, scaler = load_final_model(run / "model.pt")
    ds = load_dataset(cfg.dataset, cfg.data_dir or None)
    part = split_countries(ds.countries(), cfg.holdout_offset)
    xm, ym = ds.all_arrays(part.train)
    xn, yn = ds.all_arrays(part.test)
    lm, ln = losses(model, scaler, xm, ym), losses(model, scaler, xn, yn)
    mia = {**mia_metrics(-lm, -ln), "members": len(ym), "nonmembers": len(yn),
           "member_mean_loss": float(lm.mean()), "nonmember_mean_loss": float(ln.mean()),
           "min_resolvable_fpr": 1.0 / len(yn),
           "note": "members = rows of training countries, non-members = rows of held-out countries"}

    # 1. one-run canary audit.
    rng = np.random.default_rng()               # OS entropy: the coins are secret from the run
    delta = cfg.delta
    canary = _canary_run(run, cfg, canaries, rng)
    c = canary["canaries"]
    scores = -canary["loss"]
    bound = canary_bound(scores, c["included"], confidence=confidence, delta=delta, rng=rng)
    both = 0 < c["included"].sum() < canaries
    canary_auc = mia_metrics(scores[c["included"]], scores[~c["included"]])["mia_auc"] if both else None
    claimed = claimed_epsilon(run, cfg)
    result = {
        "label": LABEL, "method": METHOD, "run_dir": str(run), "privacy_mode": cfg.privacy, "rounds": cfg.rounds,
        "epsilon_lower_bound": bound["epsilon_lower_bound"], "delta": delta,
        "epsilon_lower_bound_pure": bound["epsilon_lower_bound_pure"],
        "confidence": confidence, "claimed_epsilon": claimed,
        "claimed_epsilon_canary_run": canary["claimed"],
        "m": canaries, "guesses": bound["guesses"], "correct": bound["correct"],
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
    ap = argparse.ArgumentParser(prog="carbonfed audit-attack",
                                 description="Empirical privacy audit of a run: one-run canary ε lower bound "
                                             "(re-runs the federation with canaries) and loss-based membership inference.")
    ap.add_argument("run_dir", metavar="DIR", help="run directory (server.json, ledger.jsonl, model.pt)")
    ap.add_argument("--canaries", type=int, default=200, help="number of canaries m (default 200)")
    ap.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound (default 0.95)")
    ap.add_argument("--keys", default=None, help="secret context folder, only if DIR/model.pt must be rebuilt (HE runs)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
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

"""privacy_statement.md: what a run's privacy guarantee is, generated from the run's own records.

Every number in the statement comes from one of these, and from nowhere else:

* ``ledger.jsonl``: each client's ε per round, its accountant history, the mechanism it reported
  (σ, q, steps), refusals, rejections, upload sizes, the round summaries;
* ``server.json``: the config the server ran with, its SHA-256, HE parameters, key fingerprint,
  rounds completed, accepted-contribution counts;
* ``report.json`` (:func:`carbonfed.federation.report.build.build_report`): accuracy and macro-F1 per round, the
  data set's SHA-256, the decrypted sample total;
* the :class:`carbonfed.privacy.audit.verify.VerifyResult` of the same run (chain check, PLD recomputation);
* the code that ran, where a value is a property of the code rather than of the run (the
  statistics-release sensitivity is read from :class:`carbonfed.privacy.stats_release.StatsLayout`, the PRV
  error bound from :mod:`carbonfed.privacy.accountant`), and the environment that builds the statement
  (git commit, library versions), each labelled as such.

The statement is built as structured sections (:func:`statement_sections`) so that the HTML
report (:mod:`carbonfed.federation.report.html`) renders the very same content.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

STATEMENT_FILE = "privacy_statement.md"
LIBRARIES = ("torch", "flwr", "opacus", "tenseal", "dp-accounting", "numpy")
REPO_ROOT = Path(__file__).resolve().parents[2]

# Chain bookkeeping fields: written by the ledger, not reported by anyone.
_CHAIN_FIELDS = ("seq", "prev_hash", "hash")
# What each ledger field is, for the plaintext section (fields not listed here are still shown).
_FIELD_TEXT = {
    "node_id": "Flower node id of the client",
    "country": "the client's country name (its identity in the federation)",
    "kind": "request type (stats / train / evaluate): server bookkeeping",
    "round": "round number: server bookkeeping",
    "status": "accepted / rejected / refused / missing: what the server did with the reply",
    "reason": "free text: a refusal message (with the client's ε before and after), a rejection "
              "reason, or a client's error message",
    "bytes": "size of the client's upload in bytes",
    "epsilon": "the client's ε after this request (Opacus PRV)",
    "epsilon_before": "the client's ε before this round",
    "delta": "δ of the claims (server-side config)",
    "noise_multiplier": "the client's DP-SGD noise multiplier σ",
    "sample_rate": "the client's Poisson sampling rate q",
    "steps": "DP-SGD steps the client ran this round",
    "total_steps": "DP-SGD steps the client ran over the run (plus one step per statistics release)",
    "history": "the client's full accountant history: one [σ, q, steps] per mechanism",
    "clipped_params": "number of this client's model parameters the fixed-point codec clipped to "
                      "±param-clip: a plaintext statistic of its individual update",
    "attestation": "the client's HMAC of this line's facts under a key the server does not hold "
                   "(privacy/attest.py): a function of the facts above, revealing nothing more",
}


# -- structured content --------------------------------------------------------------------------

@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    html_id: str | None = None


@dataclass
class Section:
    key: str
    title: str
    blocks: list = field(default_factory=list)   # str (paragraph) | list[str] (bullets) | Table


# -- small helpers -------------------------------------------------------------------------------

def _g(x, digits: int = 12) -> str:
    """A float as stored, without spurious digits (1.9501953125, 1e-05)."""
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    return format(float(x), f".{digits}g")


def _f4(x) -> str:
    return "—" if x is None else f"{float(x):.4f}"


def _pct(x) -> str:
    return "—" if x is None else f"{100 * float(x):.2f}%"


def _range(values) -> str:
    vals = sorted({v for v in values if v is not None})
    if not vals:
        return "—"
    return _g(vals[0]) if len(vals) == 1 else f"{_g(vals[0])} … {_g(vals[-1])} ({len(vals)} values)"


def _verify_dict(verify_result) -> dict:
    if verify_result is None:
        return {}
    if hasattr(verify_result, "to_dict"):
        return verify_result.to_dict()
    return dict(verify_result)


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def code_version(root: Path = REPO_ROOT) -> dict:
    """``git rev-parse HEAD`` of the checkout this module lives in, and whether it is dirty."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None, "detail": "not a git checkout"}
        status = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError) as exc:
        return {"commit": None, "dirty": None, "detail": f"git unavailable ({exc.__class__.__name__})"}
    lines = [l for l in status.stdout.splitlines() if l.strip()]
    modified = sum(1 for l in lines if not l.startswith("??"))
    untracked = len(lines) - modified
    return {"commit": head.stdout.strip(), "dirty": bool(lines),
            "detail": f"{modified} modified tracked file(s), {untracked} untracked file(s)"}


# -- μ-GDP (central-limit approximation) -----------------------------------------------------

def clt_mu(history) -> float:
    """μ of the Gaussian-DP approximation of a composition of ``(σ, q, steps)`` mechanisms.

    Bu, Dong, Long, Su (2020), "Deep learning with Gaussian differential privacy": T steps of the
    Poisson-subsampled Gaussian mechanism with rate q and noise σ are asymptotically μ-GDP with
    μ = q·sqrt(T·(e^{1/σ²} − 1)) (central limit theorem). An unsubsampled Gaussian release with
    sensitivity-normalised noise σ_s is exactly (1/σ_s)-GDP. μ-GDP composes as
    sqrt(μ₁² + μ₂² + …). The result is an approximation, not a bound.
    """
    total = 0.0
    for sig, q, steps in history:
        sig, q, steps = float(sig), float(q), int(steps)
        if q >= 1.0:
            total += steps / sig ** 2
        else:
            try:
                total += q * q * steps * math.expm1(1.0 / sig ** 2)
            except OverflowError:
                return math.inf
    return math.sqrt(total)


def gdp_delta(mu: float, eps: float) -> float:
    """δ(ε) of μ-GDP: Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2) (Dong, Roth, Su 2019, Cor. 2.13)."""
    from scipy.special import log_ndtr, ndtr

    return float(ndtr(-eps / mu + mu / 2) - math.exp(eps + float(log_ndtr(-eps / mu - mu / 2))))


def gdp_epsilon(mu: float, delta: float) -> float | None:
    """The ε at which μ-GDP gives ``delta`` (bisection; δ(ε) decreases in ε)."""
    if not (mu > 0 and math.isfinite(mu)):
        return None if not math.isfinite(mu) else 0.0
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gdp_delta(mu, hi) > delta:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            return None
    for _ in range(100):
        mid = (lo + hi) / 2
        if gdp_delta(mu, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


# -- facts ---------------------------------------------------------------------------------------

def _stats_sensitivity(cfg) -> tuple[list[float], str]:
    """L2 sensitivity of each statistics release (stage 1, then stages 2 and 3 in DP runs of more
    stages), from the layouts the run used."""
    names = ("`StatsLayout.sensitivity`", "`RefineLayout.sensitivity`", "`AsinhLayout.sensitivity`")
    try:
        from carbonfed.data import load_dataset
        from carbonfed.federation.client.participant import Layouts

        ds = load_dataset(cfg.dataset, cfg.data_dir or None)
        stages = Layouts.for_run(cfg, len(ds.features), len(ds.classes)).stages
        return [float(x.sensitivity) for x in stages], (
            f"{', '.join(names[:len(stages)])} of this run's layouts ({len(ds.features)} features, "
            f"{len(ds.classes)} classes)")
    except Exception as exc:   # data not on this machine: the bounds do not depend on it today
        from carbonfed.privacy.stats_release import ASINH_CLIP, CONTRIB_CLIP, REFINE_CLIP
        n = cfg.stats_releases
        return [math.sqrt(1 + CONTRIB_CLIP ** 2), REFINE_CLIP, ASINH_CLIP][:n], (
            f"{', '.join(['sqrt(1 + CONTRIB_CLIP²)', 'REFINE_CLIP', 'ASINH_CLIP'][:n])} from "
            f"`privacy/stats_release.py` (data set not loadable here: {exc.__class__.__name__})")


def collect_facts(run_dir, report: dict, verify_result, baseline: dict | None = None) -> dict:
    """Everything the statement and the HTML report state, from the run's records."""
    from carbonfed.federation.config import RunConfig
    from carbonfed.privacy.accountant import ACCOUNTANT_NAME, EPS_ERROR
    from carbonfed.privacy.ledger import check_chain, read_ledger

    run = Path(run_dir)
    server = json.loads((run / "server.json").read_text())
    config = dict(server.get("config", {}))
    cfg = RunConfig.from_flower(config)
    ledger = read_ledger(run / "ledger.jsonl")
    v = _verify_dict(verify_result)

    # Per client, from the ledger.
    clients: dict[str, dict] = {}
    for n, line in enumerate(ledger, 1):
        if line.get("kind") not in ("stats", "train") or "country" not in line:
            continue
        c = clients.setdefault(line["country"], {"series": [], "sigmas": set(), "accepted_rounds": 0,
                                                 "refused": [], "rejected": [], "last": None, "last_line": None})
        if line.get("epsilon") is not None:
            c["series"].append((line.get("round"), float(line["epsilon"])))
            c["last"], c["last_line"] = line, n
        if line.get("noise_multiplier") is not None:
            c["sigmas"].add(float(line["noise_multiplier"]))
        if line.get("kind") == "train":
            st = line.get("status")
            if st == "accepted":
                c["accepted_rounds"] += 1
            elif st == "refused":
                c["refused"].append((line.get("round"), n))
            else:
                c["rejected"].append((line.get("round"), n, st, line.get("reason", "")))
    per_client = {}
    for who, c in sorted(clients.items()):
        last = c["last"]
        hist = last.get("history") if last else None
        mu = clt_mu(hist) if hist else None
        vc = v.get("per_client", {}).get(who, {})
        per_client[who] = {
            "epsilon": float(last["epsilon"]) if last else None, "line": c["last_line"],
            "recomputed": vc.get("recomputed"), "history": hist, "mu": mu,
            "total_steps": sum(int(h[2]) for h in hist) if hist else 0,
            "accepted_rounds": c["accepted_rounds"], "refused": c["refused"], "rejected": c["rejected"],
            "sigmas": sorted(c["sigmas"]), "series": c["series"]}
    eps_vals = [p["epsilon"] for p in per_client.values() if p["epsilon"] is not None]
    mus = [p["mu"] for p in per_client.values() if p["mu"] is not None]
    rounds = [l for l in ledger if l.get("kind") == "round"]
    train = [l for l in ledger if l.get("kind") == "train"]
    stats_lines = [l for l in ledger if l.get("kind") == "stats"]
    trained = [l for l in train if l.get("status") == "accepted"]
    # the statistics releases of the longest history a stats line carries (stage 1, stage 2)
    stats_hist = max(([tuple(h) for h in (l.get("history") or []) if float(h[1]) >= 1.0] for l in stats_lines),
                     key=len, default=[])
    ledger_deltas = sorted({float(l["delta"]) for l in ledger if l.get("delta") is not None})
    report_eps = ((report.get("privacy") or {}).get("epsilon_per_client") or {})
    mismatch = sorted(who for who, e in report_eps.items()
                      if who in per_client and per_client[who]["epsilon"] is not None
                      and not math.isclose(float(e), per_client[who]["epsilon"], rel_tol=1e-12))
    mismatch += sorted(set(report_eps) ^ {w for w, p in per_client.items() if p["epsilon"] is not None})
    delta = ledger_deltas[0] if ledger_deltas else cfg.delta
    mu_max = max(mus) if mus else None
    sensitivity, sensitivity_src = _stats_sensitivity(cfg)
    try:
        config_digest_ok = RunConfig.from_flower(config).digest() == server.get("config_sha256")
    except ValueError:
        config_digest_ok = False
    fields_seen: dict[str, object] = {}
    for l in ledger:
        if l.get("kind") in ("stats", "train", "evaluate"):
            for k, val in l.items():
                if k not in _CHAIN_FIELDS and (k not in fields_seen or fields_seen[k] is None):
                    fields_seen[k] = val
    upload = [int(l["bytes"]) for l in trained if isinstance(l.get("bytes"), int)]
    return {
        "run_dir": str(run.resolve()), "run_name": run.resolve().name, "cfg": cfg, "config": config,
        "server": server, "report": report, "verify": v, "baseline": baseline, "ledger_lines": len(ledger),
        "ledger_chain_ok": not check_chain(ledger), "ledger_head": ledger[-1].get("hash") if ledger else None,
        "ledger_sha256": _sha256(run / "ledger.jsonl"), "server_sha256": _sha256(run / "server.json"),
        "per_client": per_client, "epsilon_max": max(eps_vals) if eps_vals else None,
        "epsilon_min": min(eps_vals) if eps_vals else None, "delta": delta, "ledger_deltas": ledger_deltas,
        "mu_max": mu_max, "mu_epsilon": gdp_epsilon(mu_max, delta) if mu_max else None,
        "report_mismatch": mismatch, "accountant": ACCOUNTANT_NAME, "eps_error": EPS_ERROR,
        "sigmas": sorted({float(l["noise_multiplier"]) for l in train if l.get("noise_multiplier") is not None}),
        "sample_rates": sorted({float(l["sample_rate"]) for l in train if l.get("sample_rate") is not None}),
        "steps": sorted({int(l["steps"]) for l in trained if l.get("steps") is not None}),
        "stats_mechanisms": stats_hist, "stats_stages": len({int(l.get("stage", 1)) for l in stats_lines}),
        "stats_sensitivity": sensitivity, "stats_sensitivity_src": sensitivity_src,
        "rounds": rounds, "rounds_completed": server.get("rounds_completed"),
        "addressed": sorted({sum(1 for l in train if l.get("round") == r["round"]) for r in rounds}),
        "accepted": sorted({r.get("accepted") for r in rounds}),
        "refusals": [(l.get("country"), l.get("round")) for l in train if l.get("status") == "refused"],
        "rejections": [(l.get("country"), l.get("round"), l.get("status"), l.get("reason", ""))
                       for l in ledger if l.get("kind") in ("stats", "train", "evaluate")
                       and l.get("status") not in ("accepted", "refused")],
        "stats_terms": server.get("stats_terms"), "model_terms": server.get("model_terms"),
        "fields_seen": fields_seen, "upload_bytes": (min(upload), max(upload)) if upload else None,
        "config_digest_ok": config_digest_ok, "code": code_version(), "libraries": library_versions(),
    }


# -- the sections --------------------------------------------------------------------------------

def _summary(f: dict) -> Section:
    cfg, rep, v = f["cfg"], f["report"], f["verify"]
    m = rep.get("metrics") or {}
    items = [f"Data set `{cfg.dataset}`, privacy mode `{cfg.privacy}`, {f['rounds_completed']} of {cfg.rounds} "
             f"planned rounds completed, {rep['clients']['train']} training and {rep['clients']['test']} held-out "
             "clients (one per country)."]
    if cfg.dp:
        items.append(f"**ε_max = {_f4(f['epsilon_max'])}** (Opacus PRV; exact ledger value {f['epsilon_max']!r}) "
                     f"against the target ε = {_g(cfg.epsilon)}, at **δ = {_g(f['delta'])}**, per training client, "
                     "for adding or removing one row of that client's data.")
        items.append(f"Independent recomputation (dp-accounting PLD): ε_max = {_f4(v.get('epsilon_max_recomputed'))}.")
        if f["mu_max"] is not None:
            items.append(f"Gaussian-DP view (central-limit approximation, not a bound): μ ≈ {_f4(f['mu_max'])}.")
    else:
        items.append(f"**No differential privacy** in mode `{cfg.privacy}`: no ε bounds what the outputs reveal "
                     "about any row.")
    items.append(f"Audit (`privacy/verify.py`): **{'passed' if v.get('ok') else 'FAILED'}**"
                 + (f" with {len(v.get('problems', []))} problem(s), listed under Accounting." if not v.get("ok") else "."))
    items.append(f"Held-out accuracy {_f4(m.get('accuracy'))}, macro-F1 {_f4(m.get('macro_f1'))} (not DP: see below).")
    return Section("summary", "Summary", [items])


def _unit(f: dict) -> Section:
    cfg = f["cfg"]
    pre = [] if cfg.dp else [f"Mode `{cfg.privacy}` has no DP guarantee; the DP modes (`dp`, `dp+he`) of this code "
                             "use the unit and relation below."]
    return Section("unit", "Unit of privacy and neighbouring relation", pre + [
        "The unit of privacy is **one record: one country-year row** of one client's data set (each client "
        "is one country and holds that country's rows, one per year).",
        "Neighbouring data sets differ by **adding or removing one row of one client's data set** (add/remove-one, "
        "as Opacus's Poisson-sampling accounting and dp-accounting's `ADD_OR_REMOVE_ONE`). Each row belongs to "
        "exactly one client, so the guarantee for a row is the ε of the client holding it; ε_max is the guarantee "
        "for every row of every training client.",
        f"A client's row count is treated as public (it sets the update's weight and Opacus's normalisation); "
        f"clients hold at most max-client-samples = {cfg.max_client_samples} rows, and δ = {_g(f['delta'])} "
        f"{'is' if f['delta'] < 1 / cfg.max_client_samples else 'is NOT'} below 1/{cfg.max_client_samples}.",
    ])


def _guarantee(f: dict) -> Section:
    cfg = f["cfg"]
    s = Section("guarantee", "The guarantee")
    if not cfg.dp:
        s.blocks.append(f"Mode `{cfg.privacy}` runs no DP mechanism: there is no (ε, δ) guarantee. The table lists "
                        "the clients the ledger records.")
    else:
        n = sum(1 for p in f["per_client"].values() if p["epsilon"] is not None)
        distinct = len({p["epsilon"] for p in f["per_client"].values() if p["epsilon"] is not None})
        s.blocks.append(f"Each training client's uploads are (ε_c, δ)-DP with **δ = {_g(f['delta'])}** and ε_c as "
                        f"below ({n} clients, {distinct} distinct value(s)); **ε_max = {_f4(f['epsilon_max'])}**, "
                        f"minimum {_f4(f['epsilon_min'])}, target ε = {_g(cfg.epsilon)}.")
        if f["report_mismatch"]:
            s.blocks.append(f"**Discrepancy:** report.json's ε per client differs from the ledger for "
                            f"{', '.join(f['report_mismatch'][:10])}. The ledger values are shown.")
        mu_eps = f["mu_epsilon"]
        s.blocks.append(
            "The same guarantee as μ-Gaussian DP, by the central-limit approximation of Bu, Dong, Long and Su "
            "(2020): each DP-SGD round is T Poisson-subsampled Gaussian steps with μ = q·sqrt(T·(e^{1/σ²} − 1)); the "
            "unsubsampled statistics release (one per stage) with noise multiplier σ_s is (1/σ_s)-GDP; they compose as "
            f"sqrt(μ₁² + μ₂² + …). **μ_max ≈ {_f4(f['mu_max'])}**, which as (ε, δ) at δ = {_g(f['delta'])} reads "
            f"ε ≈ {_f4(mu_eps)}. This is the CLT approximation, **not a bound** (it can understate the privacy loss "
            "at few steps); the PRV ε above is the figure of record.")
    rows = []
    for who, p in f["per_client"].items():
        rows.append([who, _f4(p["epsilon"]) if cfg.dp else "— (no DP)", _f4(p["recomputed"]),
                     _f4(p["mu"]), str(p["accepted_rounds"]), str(len(p["refused"])), str(p["total_steps"]),
                     str(p["line"] or "—")])
    s.blocks.append(Table(["client", "ε (PRV, ledger)", "ε (PLD, recomputed)", "μ (GDP, CLT approx.)",
                           "rounds accepted", "rounds refused", "total steps", "ledger line"], rows, "epsilon-table"))
    return s


def _accounting(f: dict) -> Section:
    cfg, v, libs = f["cfg"], f["verify"], f["libraries"]
    s = Section("accounting", "Accounting")
    if cfg.dp:
        s.blocks.append(
            f"Each client accounts its own history with the **Opacus PRV accountant** (`{f['accountant']}`, Gopi, "
            f"Lee and Wutschitz 2021; opacus {libs['opacus']} in the environment that generated this statement; the "
            f"run did not record the clients' library versions). The PRV ε is an **upper bound on the true ε up to "
            f"its numerical error eps_error = {_g(f['eps_error'])}** (Opacus returns the upper end of its error "
            "interval). The noise was calibrated with the same accountant.")
    else:
        s.blocks.append("No accountant ran: the mode has no DP mechanism.")
    s.blocks.append(
        f"Independent recomputation: `privacy/verify.py` re-checked the ledger's hash chain "
        f"({f['ledger_lines']} lines) and re-accounted every client's reported history with "
        f"**{v.get('accountant', '?')} {v.get('accountant_version', '?')}** (Google's PLD accountant, pessimistic "
        f"estimate, value discretisation {_g(v.get('value_discretization_interval'))}), which shares no code with "
        f"Opacus. Recomputed ε_max = {_f4(v.get('epsilon_max_recomputed'))} vs claimed "
        f"{_f4(v.get('epsilon_max_claimed'))}; budget ε = {_g(v.get('epsilon_budget'))}. "
        + (f"Client attestations (`privacy/attest.py`): {v['attestations_checked']} ledger line(s) of client facts "
           "carry the client's HMAC, under a key derived from the key holders' secret context that the server does "
           "not hold, and it matches: for those lines the server wrote what the clients sent"
           + (" (lines that do not match are listed under the problems below). " if v.get("problems") else ". ")
           if v.get("attestations_checked") is not None else
           "Client attestations were not checked (no HE, or the audit ran without the secret context): the ledger's "
           "client facts rest on the server's hash chain alone. ")
        + f"Result: **{'passed' if v.get('ok') else 'FAILED'}**.")
    if v.get("problems"):
        s.blocks.append("Problems found by the audit:")
        s.blocks.append([p.replace("`", "'") for p in v["problems"]])
    if v.get("notes"):
        s.blocks.append("Audit notes:")
        s.blocks.append([n.replace("`", "'") for n in v["notes"]])
    return s


def _mechanism(f: dict) -> Section:
    cfg = f["cfg"]
    rows = [
        ["DP-SGD", "on" if cfg.dp else "off", "config `privacy`"],
        ["clip norm C (per-sample L2)", _g(cfg.max_grad_norm), "config `max-grad-norm`"],
        ["noise multiplier σ (noise std σ·C)", _range(f["sigmas"]), "ledger, train lines"],
        ["sampling", "Poisson, public rate q = 1/batches-per-epoch", "code: `privacy/dp_sgd.py`"],
        ["sampling rate q", _range(f["sample_rates"]) + f" (config: 1/{cfg.batches_per_epoch})", "ledger, train lines"],
        ["steps per round", _range(f["steps"]) + f" (= local-epochs {cfg.local_epochs} × batches-per-epoch "
                                                 f"{cfg.batches_per_epoch})", "ledger, accepted train lines"],
        ["local epochs", str(cfg.local_epochs), "config"],
        ["rounds", f"{f['rounds_completed']} completed of {cfg.rounds} planned", "server.json"],
        ["clients addressed per round", _range(f["addressed"]) + " (every training client, no client sampling)",
         "ledger"],
        ["updates accepted per round", _range(f["accepted"]), "ledger, round lines"],
        ["statistics release noise multiplier σ_s", _g(cfg.stats_sigma),
         "config `stats-noise-multiplier`" + (" (raised so that the statistics releases spend at most half of ε)"
                                              if cfg.stats_sigma > cfg.stats_noise_multiplier else "")],
        ["statistics releases in the ledger", (", ".join(str(list(m)) for m in f["stats_mechanisms"])
                                               or f"none charged: {f['stats_stages']} exact stage(s), outside ε"),
         "ledger, stats lines ([σ_s, q = 1, 1 step] per stage)"],
        ["statistics release L2 sensitivity Δ per stage", " / ".join(_g(x, 6) for x in f["stats_sensitivity"]),
         f["stats_sensitivity_src"]],
        ["statistics release noise std σ_s·Δ per stage",
         " / ".join(_g(cfg.stats_sigma * x, 6) for x in f["stats_sensitivity"]),
         "derived"],
        ["fixed-point clip of parameters", f"±{_g(cfg.param_clip)}", "config `param-clip` (post-processing)"],
        ["δ", _g(f["delta"]), "ledger" if f["ledger_deltas"] else "config"],
        ["target ε", _g(cfg.epsilon) if cfg.dp else "—", "config `epsilon`"],
    ]
    return Section("mechanism", "Mechanism settings", [Table(["setting", "value", "source"], rows, "mechanism-table")])


def _budget(f: dict) -> Section:
    cfg = f["cfg"]
    if not cfg.dp:
        return Section("budget", "Budget policy", ["No DP budget applies in this mode."])
    refusals = f["refusals"]
    sig_changes = [w for w, p in f["per_client"].items() if len(p["sigmas"]) > 1]
    return Section("budget", "Budget policy", [[
        f"The noise multiplier is calibrated **once**, before the first upload, for the planned {cfg.rounds} rounds "
        f"plus the statistics release(s), so the planned total ε reaches at most ε = {_g(cfg.epsilon)} at "
        f"δ = {_g(f['delta'])}. " + ("Every client reported one σ throughout the run." if not sig_changes else
                                     f"**{len(sig_changes)} client(s) reported more than one σ**: "
                                     + ", ".join(sig_changes[:10]) + "."),
        "Before touching its data in a round, a client computes the ε it would reach after the round and "
        "**refuses the round if that exceeds ε**; it spends nothing and the refusal is recorded in the ledger "
        "(status `refused`, with the reason).",
        f"Refusals in this run: {len(refusals)}" + (": " + ", ".join(f"{c} (round {r})" for c, r in refusals[:20])
                                                   if refusals else "."),
        "The spend of a round is charged to the client's accountant before training, so a round that fails "
        "after training is still counted by the client; the ledger records such a round only as a client error "
        "or a missing reply, without its spend, until the client's next line carries its full history.",
    ]])


def _coverage(f: dict) -> tuple[Section, Section]:
    cfg, rep = f["cfg"], f["report"]
    covered = Section("covered", "What the guarantee covers")
    not_cov = Section("not_covered", "What it does not cover")
    sig_s = cfg.stats_sigma
    if cfg.dp:
        eps = f["epsilon_max"] or 0.0
        covered.blocks.append([
            "**Every upload** of each training client: each round's model update"
            + ((f", and the round-0 statistics releases ({cfg.stats_releases} stages, σ_s > 0)" if cfg.two_stage_stats else
                ", and the round-0 statistics release (σ_s > 0)") if sig_s > 0 else "") + ".",
            "Hence, as post-processing, **every broadcast global model**, the final model (`model.pt`"
            + (f": the mean of the global models of the last {cfg.average_last} rounds, `average-last`" if cfg.average_last > 1 else "")
            + "), and the scaler and class weights derived from the statistics aggregate, for any party that sees them, "
            "including one that decrypts individual ciphertexts.",
            "The composition over the whole run, adaptively (later rounds depend on earlier global models): ε is "
            "accounted over each client's full history, never per round.",
            "Fixed-point clipping, stochastic rounding, encryption and sample weighting are post-processing.",
        ])
    else:
        covered.blocks.append(f"Nothing: mode `{cfg.privacy}` has no DP mechanism.")
    items = [
        f"**Evaluation metrics.** The {rep['clients']['test']} held-out clients' confusion matrices are exact "
        "counts (no noise); their sum is decrypted every round and gives the accuracy and macro-F1 in this "
        "statement. Held-out clients run no DP at all.",
        "**Hyper-parameter tuning** and every choice of configuration made by looking at the data "
        "(e.g. `bench/tune.py`) is not accounted.",
        ("**Preprocessing statistics: NOT covered in this run** (stats-noise-multiplier = 0 or DP off): the "
         "statistics aggregate (class counts, feature means and variances) is exact." if sig_s <= 0 else
         f"Preprocessing statistics are covered in this run (σ_s = {_g(sig_s)} > 0); they would not be with "
         "stats-noise-multiplier = 0."),
        "**Timing and size side channels**: local training time grows with the client's row count (expected "
        "batch n·q); reply sizes" + (f" vary ({f['upload_bytes'][0]}–{f['upload_bytes'][1]} bytes per update in "
                                     "this run)" if f["upload_bytes"] else "") + "; refusals and errors are visible.",
        "**Row counts**: each client's row count is the weight of its update and is treated as public; the total "
        "row count of the accepted clients is readable by every key holder"
        + (f" ({rep['model']['samples']} in this run)" if rep.get("model") else "") + ".",
        "**A country as a whole**: a client's rows are its whole data set; for k rows group privacy gives only "
        "(kε, k·e^{(k−1)ε}·δ)"
        + (f", already ({_f4(2 * eps)}, {_g(2 * math.exp(eps) * f['delta'], 3)}) at k = 2" if cfg.dp else "")
        + "; consecutive years of a country are strongly correlated.",
        "**Randomness quality** (see Randomness) and floating-point attacks on Gaussian sampling.",
        "**Malicious parties**: a client that misreports its history or ignores its budget, a server that forges, "
        "drops or replays terms, or rewrites the ledger (it is written by the server and not signed).",
    ]
    not_cov.blocks.append(items)
    return covered, not_cov


def _trust(f: dict) -> Section:
    cfg, he, server = f["cfg"], f["report"].get("he"), f["server"]
    s = Section("trust", "Trust model, keys and encryption")
    if not cfg.he:
        s.blocks.append(f"No encryption in mode `{cfg.privacy}`: the server sees every update, the statistics and "
                        "the confusion matrices in the clear.")
        return s
    has_sk = he.get("server_has_secret_key") if he else None
    s.blocks.append([
        "**Clients** (training and held-out) all hold **one shared BFV secret key** (`secret.ctx` from "
        "`carbonfed keygen`). Any key holder can decrypt any ciphertext it obtains, not only aggregates.",
        f"**Server**: public context only; `server_has_secret_key` = **{str(has_sk).lower()}** (report.json). It adds "
        "ciphertexts and can also encrypt (forge terms).",
        "A server colluding with any one client reads every individual update: against that coalition only DP "
        "protects, which is why each client adds its own noise locally.",
        "The key fingerprint check catches honest misconfiguration only (it is self-reported).",
    ])
    heh = server.get("he") or {}
    rows = [["scheme", str(he.get("scheme"))], ["ring dimension N", str(he.get("poly_modulus_degree"))],
            ["coefficient modulus bits", str(he.get("coeff_mod_bit_sizes"))],
            ["plain modulus", str(he.get("plain_modulus"))], ["security", f"{he.get('security_bits')} bits"],
            ["server holds secret key", str(has_sk).lower()],
            ["key fingerprint (SHA-256 of public key)", f"`{heh.get('key_fingerprint', '—')}`"],
            ["packing", str(he.get("packing"))],
            ["fixed-point resolution", _g(he.get("fixed_point_resolution"), 6)],
            ["upload per client per round", f"{he['upload_bytes_per_client_round'] / 1e3:.1f} kB"
             if he.get("upload_bytes_per_client_round") else "—"]]
    s.blocks.append(Table(["HE parameter", "value"], rows, "he-table"))
    return s


def _rng(f: dict) -> Section:
    cfg = f["cfg"]
    if not cfg.dp:
        return Section("rng", "Randomness", ["No DP noise is drawn in this mode."])
    keyed = ("keyed with **256 bits of OS entropy** (`secrets.randbits(256)`), a fresh key per client per round "
             "(and per statistics release)" if not cfg.reproducible_noise else
             f"keyed **deterministically from the public config seed** ({cfg.seed}), the country and the round "
             "(reproducible-noise = true): **anyone who knows the config can regenerate a client's noise, and "
             "against them the guarantee does not hold**")
    return Section("rng", "Randomness", [[
        f"DP-SGD noise, Poisson sampling and the statistics-release noise come from **ChaCha20** "
        f"(`randomgen.ChaCha`, 20 rounds), a cryptographically secure generator (CSPRNG), {keyed}.",
        "Each Gaussian value is the sum of four draws divided by two (float64), the hardening against "
        "floating-point precision attacks that Opacus's `secure_mode` applies (Holohan & Braghin 2021, §5.1).",
        f"Stochastic rounding in the fixed-point codec uses numpy PCG64 seeded from the public seed "
        f"({cfg.seed}); it acts on the already-noised update (post-processing).",
    ]])


def _plaintext(f: dict) -> Section:
    cfg = f["cfg"]
    s = Section("plaintext", "What reaches the server in plaintext")
    s.blocks.append("Every field below is in the ledger. All but the server's own bookkeeping (`kind`, `round`, "
                    "`status`, `delta`) were sent to the server in the clear by, or observed about, a client "
                    "(the example is each field's first non-null value in the ledger):")
    rows = []
    for k, val in sorted(f["fields_seen"].items()):
        ex = json.dumps(val, ensure_ascii=False)
        rows.append([f"`{k}`", _FIELD_TEXT.get(k, "(reported field)"), ex if len(ex) <= 60 else ex[:57] + "…"])
    s.blocks.append(Table(["field", "what", "example"], rows, "plaintext-table"))
    items = [
        "Node ids and **country names** of every client, and each client's **role** (train / held-out) from setup.",
        "The **key fingerprint** each client reports with every reply"
        + (f" (`{(f['server'].get('he') or {}).get('key_fingerprint', '—')[:16]}…`)" if cfg.he else "") + ".",
        "Each training client's **ε, δ, σ, q, steps, total steps and full accountant history** (reply metadata), "
        "and the per-update **clipped-parameter count**.",
        "**Reply sizes and timings**, refusals, errors and missing replies.",
        f"The **number of accepted contributions** (statistics: {f['stats_terms']}, model: {f['model_terms']}), "
        "which the server also sends to every client.",
    ]
    if cfg.he:
        items.append("Payloads (updates with their sample count, statistics, confusion matrices) are BFV "
                     "ciphertexts: not plaintext to the server.")
    else:
        items.append("**The payloads themselves**: every client's fixed-point model update with its sample count, "
                     "its statistics and every held-out client's confusion matrix (no encryption in this mode).")
    s.blocks.append(items)
    return s


def _accuracy(f: dict) -> Section:
    rep, base = f["report"], f["baseline"]
    m = rep.get("metrics") or {}
    s = Section("accuracy", "Accuracy and the non-private baseline")
    s.blocks.append(f"Held-out accuracy **{_f4(m.get('accuracy'))}**, macro-F1 **{_f4(m.get('macro_f1'))}** "
                    f"(last scored round; {rep['clients']['test']} held-out countries; exact, not DP).")
    averaged = (rep.get("model") or {}).get("averaged_rounds") or []
    if len(averaged) > 1:
        s.blocks.append(f"The model scored is the run's model: the mean of the global models of the last "
                        f"{f['cfg'].average_last} rounds (`average-last`; at the last round, rounds "
                        f"{averaged[0]}–{averaged[-1]}), in every row of the table below the mean as it stood after that round.")
    if base is None:
        s.blocks.append("**no baseline run given**: run the same config with `--privacy none` and pass it with "
                        "`--baseline DIR` to compare.")
        rows = [[str(h["round"]), _f4(h.get("accuracy")), _f4(h.get("macro_f1")), "—", "—"]
                for h in rep.get("history", [])]
    else:
        bm = base.get("metrics") or {}
        bcfg = (base.get("provenance") or {}).get("config") or {}
        ignore = {"privacy", "epsilon", "delta", "keys-dir", "out-dir", "data-dir", "stats-noise-multiplier",
                  "reproducible-noise"}
        diff = sorted(k for k in set(bcfg) | set(f["config"]) if k not in ignore and bcfg.get(k) != f["config"].get(k))
        da = (m.get("accuracy") - bm["accuracy"]) if m.get("accuracy") is not None and bm.get("accuracy") is not None else None
        df = (m.get("macro_f1") - bm["macro_f1"]) if m.get("macro_f1") is not None and bm.get("macro_f1") is not None else None
        s.blocks.append(f"Baseline (mode `{base.get('privacy_mode')}`): accuracy {_f4(bm.get('accuracy'))}, macro-F1 "
                        f"{_f4(bm.get('macro_f1'))}. Difference (this run − baseline): accuracy "
                        f"{'—' if da is None else f'{da:+.4f}'}, macro-F1 {'—' if df is None else f'{df:+.4f}'}.")
        if base.get("privacy_mode") not in ("none", "he"):
            s.blocks.append(f"**Caution:** the baseline runs mode `{base.get('privacy_mode')}`, which is not non-private.")
        s.blocks.append("The baseline's config matches this run's apart from the privacy settings." if not diff else
                        "**Caution:** the baseline's config also differs in " + ", ".join(f"`{k}`" for k in diff) + ".")
        bh = {h["round"]: h for h in base.get("history", [])}
        rows = [[str(h["round"]), _f4(h.get("accuracy")), _f4(h.get("macro_f1")),
                 _f4(bh.get(h["round"], {}).get("accuracy")), _f4(bh.get(h["round"], {}).get("macro_f1"))]
                for h in rep.get("history", [])]
    s.blocks.append(Table(["round", "accuracy", "macro-F1", "baseline accuracy", "baseline macro-F1"], rows,
                          "accuracy-table"))
    cm, classes = m.get("confusion_matrix"), m.get("classes")
    if cm is not None and classes:
        s.blocks.append("Confusion matrix of the last scored round, summed over the held-out countries (rows: true "
                        "class, columns: predicted), with each class's precision, recall and F1. Macro-F1 averages the "
                        "F1 of every class with a true or a predicted row, so a class the held-out countries do not "
                        "hold but the model predicts counts as F1 = 0.")
        s.blocks.append(Table(["true ↓ predicted →", *classes, "precision", "recall", "F1"],
                              [[c, *(str(v) for v in row), _f4(pc["precision"]), _f4(pc["recall"]), _f4(pc["f1"])]
                               for c, row, pc in zip(classes, cm, m["per_class"])], "confusion-table"))
    return s


def _provenance(f: dict) -> Section:
    code, libs, rep, server = f["code"], f["libraries"], f["report"], f["server"]
    data = (rep.get("provenance") or {}).get("data") or {}
    commit = code["commit"] or "not available"
    dirty = {True: "**dirty**", False: "clean", None: "unknown"}[code["dirty"]]
    rows = [
        ["code version (git HEAD of the report builder's checkout)", f"`{commit}` ({dirty}: {code['detail']})"],
        ["config SHA-256 (server.json)", f"`{server.get('config_sha256')}` "
                                         f"({'recomputed: matches' if f['config_digest_ok'] else '**recomputed: DIFFERS**'})"],
        ["data SHA-256", f"`{data.get('sha256')}`"],
        ["data file", f"{data.get('path')} ({data.get('rows_used')} rows used)"],
        ["ledger", f"{f['ledger_lines']} lines, chain {'intact' if f['ledger_chain_ok'] else '**BROKEN**'}, "
                   f"last hash `{f['ledger_head']}`"],
        ["ledger.jsonl SHA-256", f"`{f['ledger_sha256']}`"],
        ["server.json SHA-256", f"`{f['server_sha256']}`"],
        ["run directory", f["run_dir"]],
    ]
    if server.get("resumed_from"):
        rows.append(["server restarts (resumed after round)", str(server["resumed_from"])])
    rows += [[f"{name} version (report builder's environment)", v] for name, v in libs.items()]
    return Section("provenance", "Provenance", [
        Table(["item", "value"], rows, "provenance-table"),
        "The run itself did not record its code commit or library versions: the versions above are those of the "
        "environment that generated this statement.",
    ])


def statement_sections(facts: dict) -> list[Section]:
    covered, not_cov = _coverage(facts)
    return [_summary(facts), _unit(facts), _guarantee(facts), _accounting(facts), _mechanism(facts),
            _budget(facts), covered, not_cov, _trust(facts), _rng(facts), _plaintext(facts),
            _accuracy(facts), _provenance(facts)]


def statement_title(facts: dict) -> str:
    cfg = facts["cfg"]
    return f"Privacy statement: {cfg.dataset}, {cfg.privacy}, run {facts['run_name']}"


# -- rendering -----------------------------------------------------------------------------------

def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", "",
           "_Generated by `privacy/statement.py` from `ledger.jsonl`, `server.json` and `report.json` of the run; "
           "do not edit by hand._", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for b in sec.blocks:
            if isinstance(b, Table):
                out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
                out.append("|" + "|".join("---" for _ in b.header) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            elif isinstance(b, list):
                out += [f"* {item}" for item in b]
            else:
                out.append(str(b))
            out.append("")
    return "\n".join(out)


def inline_html(text: str) -> str:
    """The statement's inline markdown (`code`, **bold**, _em_) as HTML, everything else escaped."""
    import html as _html

    parts = re.split(r"(`[^`]*`)", str(text))
    out = []
    for p in parts:
        if len(p) >= 2 and p.startswith("`") and p.endswith("`"):
            out.append(f"<code>{_html.escape(p[1:-1])}</code>")
        else:
            e = _html.escape(p)
            e = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", e)
            out.append(e)
    return "".join(out)


def render_html_sections(sections: list[Section]) -> str:
    out = []
    for sec in sections:
        out.append(f'<section id="sec-{sec.key}"><h2>{inline_html(sec.title)}</h2>')
        for b in sec.blocks:
            if isinstance(b, Table):
                tid = f' id="{b.html_id}"' if b.html_id else ""
                wrap = ' class="scroll"' if len(b.rows) > 20 else ""
                out.append(f"<div{wrap}><table{tid}><thead><tr>"
                           + "".join(f"<th>{inline_html(h)}</th>" for h in b.header) + "</tr></thead><tbody>")
                out += ["<tr>" + "".join(f"<td>{inline_html(c)}</td>" for c in row) + "</tr>" for row in b.rows]
                out.append("</tbody></table></div>")
            elif isinstance(b, list):
                out.append("<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in b) + "</ul>")
            else:
                out.append(f"<p>{inline_html(b)}</p>")
        out.append("</section>")
    return "\n".join(out)


def write_privacy_statement(run_dir, report: dict, verify_result, baseline: dict | None = None) -> Path:
    """Write ``run_dir/privacy_statement.md`` from the run's ledger, server.json and report.json."""
    facts = collect_facts(run_dir, report, verify_result, baseline)
    path = Path(run_dir) / STATEMENT_FILE
    path.write_text(render_markdown(statement_title(facts), statement_sections(facts)), encoding="utf-8")
    return path

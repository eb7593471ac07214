"""The facts the privacy statement and the HTML report state, collected from one run's records.

Guarantees
----------
* :func:`collect_facts` reads only ``ledger.jsonl``, ``server.json``, the run's ``report.json``
  (passed in), the :class:`carbonfed.privacy.audit.verify.VerifyResult` of the same run, and the code
  that ran where a value is a property of the code (the statistics-release sensitivity from the
  run's layouts, the PRV error bound from :mod:`carbonfed.privacy.accountant`); the environment
  that builds the statement (git commit, library versions) is labelled as such.
* Per client it keeps the last ledger line that carries an ε (the client's full accountant
  history; a closing statement counts), and derives μ-GDP from that history
  (:func:`carbonfed.privacy.audit.maths.clt_mu`).
* ``claims`` is what the documents claim, from the signed charter and each client's own last
  signed statement (:func:`carbonfed.federation.report.audit_sections.document_claims`), which
  ``carbonfed verify`` checks them against.
* It never changes the run directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from importlib import metadata
from pathlib import Path

from carbonfed.federation.client.participant import Layouts
from carbonfed.federation.config import RunConfig
from carbonfed.federation.report.audit_sections import document_claims
from carbonfed.federation.run_data import load_run_data
from carbonfed.privacy.accountant import ACCOUNTANT_NAME, EPS_ERROR
from carbonfed.privacy.audit.maths import clt_mu, gdp_epsilon
from carbonfed.privacy.ledger import check_chain, read_ledger
from carbonfed.privacy.statements import line_history
from carbonfed.privacy.stats_release import ASINH_CLIP, CONTRIB_CLIP, REFINE_CLIP

LIBRARIES = ("torch", "flwr", "opacus", "tenseal", "dp-accounting", "numpy")
REPO_ROOT = Path(__file__).resolve().parents[2]

# Chain bookkeeping fields: written by the ledger, not reported by anyone.
_CHAIN_FIELDS = ("seq", "prev_hash", "hash")


# -- environment and files -----------------------------------------------------------------------

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


def _stats_sensitivity(cfg) -> tuple[list[float], str]:
    """L2 sensitivity of each statistics release (stage 1, then stages 2 and 3 in DP runs of more
    stages), from the layouts the run used."""
    names = ("`StatsLayout.sensitivity`", "`RefineLayout.sensitivity`", "`AsinhLayout.sensitivity`")
    try:
        ds = load_run_data(cfg)
        stages = Layouts.for_run(cfg, len(ds.features), len(ds.classes)).stages
        return [float(x.sensitivity) for x in stages], (
            f"{', '.join(names[:len(stages)])} of this run's layouts ({len(ds.features)} features, "
            f"{len(ds.classes)} classes)")
    except Exception as exc:   # data not on this machine: the bounds do not depend on it today
        n = cfg.stats_releases
        return [math.sqrt(1 + CONTRIB_CLIP ** 2), REFINE_CLIP, ASINH_CLIP][:n], (
            f"{', '.join(['sqrt(1 + CONTRIB_CLIP²)', 'REFINE_CLIP', 'ASINH_CLIP'][:n])} from "
            f"`privacy/stats_release.py` (data set not loadable here: {exc.__class__.__name__})")


# -- from the ledger ------------------------------------------------------------------------------

def _client_lines(ledger: list[dict]) -> dict[str, dict]:
    """Per country: its ε series, σs, accepted train rounds, refusals, rejections and last ε line."""
    clients: dict[str, dict] = {}
    for n, line in enumerate(ledger, 1):
        if line.get("kind") not in ("stats", "train", "close") or "country" not in line:
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
    return clients


def _per_client(ledger: list[dict], v: dict) -> dict[str, dict]:
    """Each client's claimed and recomputed ε, history, μ and round counts, by country."""
    per_client = {}
    for who, c in sorted(_client_lines(ledger).items()):
        last = c["last"]
        hist = line_history(last) if last else None
        mu = clt_mu(hist) if hist and len(hist[0]) == 3 else None   # ddp+he histories: Skellam, no GDP view
        vc = v.get("per_client", {}).get(who, {})
        per_client[who] = {
            "epsilon": float(last["epsilon"]) if last else None, "line": c["last_line"],
            "recomputed": vc.get("recomputed"), "history": hist, "mu": mu,
            "total_steps": sum(int(h[-1]) for h in hist) if hist else 0,
            "accepted_rounds": c["accepted_rounds"], "refused": c["refused"], "rejected": c["rejected"],
            "sigmas": sorted(c["sigmas"]), "series": c["series"]}
    return per_client


def _report_mismatch(report: dict, per_client: dict[str, dict]) -> list[str]:
    """The clients whose ε in report.json differs from the ledger's, or is in only one of them."""
    report_eps = ((report.get("privacy") or {}).get("epsilon_per_client") or {})
    mismatch = sorted(who for who, e in report_eps.items()
                      if who in per_client and per_client[who]["epsilon"] is not None
                      and not math.isclose(float(e), per_client[who]["epsilon"], rel_tol=1e-12))
    mismatch += sorted(set(report_eps) ^ {w for w, p in per_client.items() if p["epsilon"] is not None})
    return mismatch


def _fields_seen(ledger: list[dict]) -> dict[str, object]:
    """Every field of the client lines (chain bookkeeping aside) with its first non-null value."""
    fields_seen: dict[str, object] = {}
    for l in ledger:
        if l.get("kind") in ("stats", "train", "evaluate"):
            for k, val in l.items():
                if k not in _CHAIN_FIELDS and (k not in fields_seen or fields_seen[k] is None):
                    fields_seen[k] = val
    return fields_seen


def _config_digest_ok(config: dict, server: dict) -> bool:
    try:
        return RunConfig.from_flower(config).digest() == server.get("config_sha256")
    except ValueError:
        return False


def _mechanism_facts(ledger: list[dict], cfg) -> dict:
    """The mechanisms the ledger records: σ, q, steps, statistics releases, rounds, refusals."""
    rounds = [l for l in ledger if l.get("kind") == "round"]
    train = [l for l in ledger if l.get("kind") == "train"]
    stats_lines = [l for l in ledger if l.get("kind") == "stats"]
    trained = [l for l in train if l.get("status") == "accepted"]
    # the statistics releases of the longest history a stats line carries (stage 1, stage 2)
    stats_hist = max(([tuple(h) for h in (line_history(l) or []) if len(h) == 3 and float(h[1]) >= 1.0]
                      for l in stats_lines),
                     key=len, default=[])
    sensitivity, sensitivity_src = _stats_sensitivity(cfg)
    upload = [int(l["bytes"]) for l in trained if isinstance(l.get("bytes"), int)]
    return {
        "sigmas": sorted({float(l["noise_multiplier"]) for l in train if l.get("noise_multiplier") is not None}),
        "sample_rates": sorted({float(l["sample_rate"]) for l in train if l.get("sample_rate") is not None}),
        "steps": sorted({int(l["steps"]) for l in trained if l.get("steps") is not None}),
        "stats_mechanisms": stats_hist, "stats_stages": len({int(l.get("stage", 1)) for l in stats_lines}),
        "stats_sensitivity": sensitivity, "stats_sensitivity_src": sensitivity_src, "rounds": rounds,
        "addressed": sorted({sum(1 for l in train if l.get("round") == r["round"]) for r in rounds}),
        "accepted": sorted({r.get("accepted") for r in rounds}),
        "refusals": [(l.get("country"), l.get("round")) for l in train if l.get("status") == "refused"],
        "rejections": [(l.get("country"), l.get("round"), l.get("status"), l.get("reason", ""))
                       for l in ledger if l.get("kind") in ("stats", "train", "evaluate")
                       and l.get("status") not in ("accepted", "refused")],
        "upload_bytes": (min(upload), max(upload)) if upload else None,
    }


# -- all of it ------------------------------------------------------------------------------------

def collect_facts(run_dir, report: dict, verify_result, baseline: dict | None = None) -> dict:
    """Everything the statement and the HTML report state, from the run's records."""
    run = Path(run_dir)
    server = json.loads((run / "server.json").read_text())
    config = dict(server.get("config", {}))
    cfg = RunConfig.from_flower(config)
    ledger = read_ledger(run / "ledger.jsonl")
    v = _verify_dict(verify_result)
    per_client = _per_client(ledger, v)
    eps_vals = [p["epsilon"] for p in per_client.values() if p["epsilon"] is not None]
    mus = [p["mu"] for p in per_client.values() if p["mu"] is not None]
    ledger_deltas = sorted({float(l["delta"]) for l in ledger if l.get("delta") is not None})
    delta = ledger_deltas[0] if ledger_deltas else cfg.delta
    mu_max = max(mus) if mus else None
    return {
        "run_dir": str(run.resolve()), "run_name": run.resolve().name, "cfg": cfg, "config": config,
        "server": server, "report": report, "verify": v, "baseline": baseline, "ledger_lines": len(ledger),
        "ledger_chain_ok": not check_chain(ledger), "ledger_head": ledger[-1].get("hash") if ledger else None,
        "ledger_sha256": _sha256(run / "ledger.jsonl"), "server_sha256": _sha256(run / "server.json"),
        "per_client": per_client, "epsilon_max": max(eps_vals) if eps_vals else None,
        "epsilon_min": min(eps_vals) if eps_vals else None, "delta": delta, "ledger_deltas": ledger_deltas,
        "mu_max": mu_max, "mu_epsilon": gdp_epsilon(mu_max, delta) if mu_max else None,
        "report_mismatch": _report_mismatch(report, per_client), "accountant": ACCOUNTANT_NAME,
        "eps_error": EPS_ERROR, **_mechanism_facts(ledger, cfg), "rounds_completed": server.get("rounds_completed"),
        "stats_terms": server.get("stats_terms"), "model_terms": server.get("model_terms"),
        "fields_seen": _fields_seen(ledger), "config_digest_ok": _config_digest_ok(config, server),
        "code": code_version(), "libraries": library_versions(), "claims": document_claims(run, ledger),
    }

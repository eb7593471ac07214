"""report.json: what a run achieved, computed by a key holder from the server's outputs.

Every number comes from one of three places, and from nowhere else:
* the ledger (``ledger.jsonl``): ε per client (each client's own last signed statement,
  :mod:`carbonfed.federation.report.signed_record`), the mechanism settings, who took part, timings;
* the encrypted aggregates, decrypted here with the clients' secret context: the held-out
  confusion matrices (accuracy, macro-F1) and the final global model;
* ``server.json``: the config, HE parameters and total time as the server measured them.

Guarantee: no aggregate is used unless its check slots carry the tags of the contributions the
ledger accepted for it (the run's charter, :mod:`carbonfed.privacy.binding`): a swapped, stale,
forged or missing ``aggregates/*.bin`` that the ledger implies is refused
(:class:`~carbonfed.privacy.binding.BindingError`, a ValueError naming the file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from carbonfed.data import sha256_file, split_countries
from carbonfed.data.features import ASINH_CENTER, ASINH_K, ASINH_STD_FLOOR, ASINH_UNIT, ASINH_Z_BOUND, REFINE_Z_BOUND, SECOND_MOMENT_WEIGHT, STD_FLOOR
from carbonfed.privacy.stats_release import ASINH_CLIP, ASINH_FLOOR_SDS, CONTRIB_CLIP, REFINE_CLIP
from carbonfed.federation.config import RunConfig
from carbonfed.federation.presets import AUTO, DDP_AUTO, preset_record
from carbonfed.federation.run_data import load_run_data
from carbonfed.federation.client.participant import Layouts, make_cipher
from carbonfed.federation.report.audit_sections import empirical_record
from carbonfed.federation.report.ddp_privacy import ddp_privacy
from carbonfed.federation.report.signed_record import BoundAggregates, load_run_charter, signed_epsilons
from carbonfed.federation.wire import stage_key
from carbonfed.privacy.mask_streams import stream_plan
from carbonfed.models.mlp import build_model, describe
from carbonfed.models.params import load_flat_params, num_params
from carbonfed.privacy.accountant import ACCOUNTANT_NAME
from carbonfed.privacy.binding import secret_key_bytes, tag_key
from carbonfed.privacy.charter import Charter
from carbonfed.privacy.he import SECRET_CONTEXT_FILE, HEParams, load_secret_context
from carbonfed.privacy.ledger import read_ledger
from carbonfed.privacy.statements import line_history


def scores(cm: np.ndarray) -> dict:
    """Accuracy and macro-F1 (over classes present in truth or prediction, as scikit-learn)."""
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    f1 = [c["f1"] for c in per_class(cm, range(len(cm))) if c["f1"] is not None]
    return {"accuracy": float(np.trace(cm) / total) if total else None,
            "macro_f1": float(np.mean(f1)) if f1 else None}


def per_class(cm: np.ndarray, classes) -> list[dict]:
    """Precision, recall, F1 and support of each class (None where undefined: nothing predicted /
    no true row); macro-F1 averages the F1 of the classes with a true or a predicted row."""
    cm = np.asarray(cm, dtype=np.float64)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    return [{"class": name,
             "precision": float(tp[k] / predicted[k]) if predicted[k] else None,
             "recall": float(tp[k] / support[k]) if support[k] else None,
             "f1": float(2 * tp[k] / (support[k] + predicted[k])) if support[k] + predicted[k] else None,
             "support": int(support[k]), "predicted": int(predicted[k])}
            for k, name in enumerate(classes)]


def _one_or_range(values):
    vals = sorted(set(v for v in values if v is not None))
    if not vals:
        return None
    return vals[0] if len(vals) == 1 else {"min": vals[0], "max": vals[-1]}


def floored_std_features(scaler, features) -> list[str]:
    """The features whose final std is the scaler's floor (:attr:`Standardizer.floor`): their
    released variance was at or below the floor's square.
    Either the feature is nearly constant (exact statistics say so) or, under DP, the noise
    pulled its variance down; its scale in the model is then uncertain."""
    return [f for f, sd in zip(features, scaler.std) if sd <= scaler.floor * (1 + 1e-9)]


@dataclass
class _RunInputs:
    """What :func:`build_report` reads: the run's records, its data set and layouts, and the secret context."""

    run: Path
    server: dict
    cfg: RunConfig
    ledger: list[dict]
    ds: object
    layouts: Layouts
    ctx: object | None
    charter: Charter
    bound: BoundAggregates

    @classmethod
    def load(cls, run_dir: str | Path, keys_dir: str | Path | None) -> "_RunInputs":
        run = Path(run_dir)
        server = json.loads((run / "server.json").read_text())
        cfg = RunConfig.from_flower(server["config"])
        ledger = read_ledger(run / "ledger.jsonl")
        ds = load_run_data(cfg)
        n_train = len(split_countries(ds.countries(), cfg.holdout_offset).train) if cfg.ddp else 0
        layouts = Layouts.for_run(cfg, len(ds.features), len(ds.classes), n_train)   # ddp+he: the clients' shares
        ctx = load_secret_context(Path(keys_dir or cfg.keys_dir) / SECRET_CONTEXT_FILE) if cfg.he else None
        charter = load_run_charter(run)
        key = tag_key(charter.sha256, secret_key_bytes(ctx) if ctx is not None else None)
        bound = BoundAggregates.of(run, ledger, charter, key, HEParams().plain_modulus)
        return cls(run, server, cfg, ledger, ds, layouts, ctx, charter, bound)

    def open(self, name: str, length: int) -> tuple[np.ndarray, int]:
        """The aggregate ``aggregates/name`` decrypted (or read, without HE) as ``length`` integers,
        checked against its contributions (:class:`BoundAggregates`), and their number."""
        return self.bound.open(name, make_cipher(self.cfg, self.ctx, length).decrypt)

    def rounds(self) -> list[dict]:
        return [r for r in self.ledger if r.get("kind") == "round"]


def _history(inp: _RunInputs) -> tuple[list[dict], np.ndarray | None]:
    """Per round: the scores of its decrypted confusion matrix and the ledger's round summary;
    and the last scored round's confusion matrix."""
    history, last_cm = [], None
    metrics = inp.layouts.metrics
    for r in inp.rounds():
        name = f"metrics_round_{r['round']:03d}.bin"
        entry = {"round": r["round"], "accuracy": None, "macro_f1": None,
                 "epsilon_max": r.get("epsilon_max"), "seconds": r["seconds"],
                 "accepted": r["accepted"], "rejected": r["rejected"],
                 # the rounds whose global models the evaluated model averages (average-last)
                 "model_rounds": r.get("model_rounds", [r["round"]])}
        if name in inp.bound:             # the ledger accepted evaluations of this round: the file must hold them
            cm = metrics.unpack_sum(*inp.open(name, metrics.length))
            last_cm = cm.reshape(len(inp.ds.classes), -1)
            entry.update(scores(last_cm))
        history.append(entry)
    return history, last_cm


def _final_model(inp: _RunInputs) -> tuple[dict | None, list[str] | None, float | None]:
    """The final model, decrypted by the key holder and saved as ``model.pt`` next to the report;
    with the features whose std is floored and the floor (all None without ``aggregates/model.bin``)."""
    run, cfg, ds, layouts = inp.run, inp.cfg, inp.ds, inp.layouts
    if "model.bin" not in inp.bound:
        return None, None, None
    params, total = layouts.update.unpack_sum(*inp.open("model.bin", layouts.update.length))
    model = build_model(len(ds.features), len(ds.classes), cfg.hidden_sizes, cfg.seed)
    load_flat_params(model, params)
    scaler = layouts.scaler([inp.open(f"{stage_key(k)}.bin", lay.length) for k, lay in enumerate(layouts.stages, 1)])
    floored, std_floor = floored_std_features(scaler, ds.features), scaler.floor
    torch.save({"state_dict": model.state_dict(), "features": list(ds.features), "classes": list(ds.classes),
                "hidden": list(cfg.hidden_sizes), "scaler": scaler.to_dict()}, run / "model.pt")
    averaged = [rnd for _, rnd, _ in inp.bound.expected["model.bin"].parts]     # as its check slots proved
    # the rows behind one global model (the averaged models' summed counts over their number)
    final = {"path": str(run / "model.pt"), "samples": total / len(averaged),
             # which global models model.pt is: the mean of those of these rounds (average-last)
             "averaged_rounds": averaged,
             "output": (f"the sample-weighted mean of the global models of rounds {averaged[0]}–{averaged[-1]} "
                        f"(average-last = {cfg.average_last}), summed on ciphertexts by the server"
                        if len(averaged) > 1 else "the global model of the last round"),
             "architecture": describe(len(ds.features), len(ds.classes), cfg.hidden_sizes),
             "parameters": num_params(model),
             "initial_model": "torch's initialisation for the run's seed, output bias at the centred log class "
                              "frequencies of the statistics release (stage 1 counts)"}
    return final, floored, std_floor


def _stats_release(ledger: list[dict]) -> tuple[object, bool, int]:
    """The statistics releases as charged (the unsubsampled steps of the stats lines' histories):
    their noise multiplier (one value or a range; None when none was charged), whether they are
    inside ε, and how many were charged (the longest run of them a stats line carries)."""
    # ddp+he histories are [variance, l2, l1, q, steps] (privacy.distributed_dp.HISTORY_KEYS): σ = √variance / l2
    sig = lambda h: h[0] if len(h) == 3 else float(h[0]) ** 0.5 / float(h[1])  # noqa: E731
    rate = lambda h: float(h[1] if len(h) == 3 else h[3])                     # noqa: E731
    stats_sigma = _one_or_range(sig(h) for l in ledger if l.get("kind") == "stats"
                                for h in (line_history(l) or []) if rate(h) >= 1.0)
    stats_releases = max((sum(int(h[-1]) for h in (line_history(l) or []) if rate(h) >= 1.0)
                          for l in ledger if l.get("kind") == "stats"), default=0)
    return stats_sigma, stats_sigma is not None, stats_releases


def _privacy(cfg: RunConfig, ledger: list[dict], charter: Charter, stats_sigma, covered: bool) -> dict | None:
    """Privacy, from the ledger: each client's ε as its last signed statement states it, and the
    mechanisms' settings (None without DP)."""
    if not cfg.dp:
        return None
    eps = signed_epsilons(ledger, charter)
    train_lines = [l for l in ledger if l.get("kind") == "train" and l.get("noise_multiplier") is not None]
    return {"delta": cfg.delta, "epsilon_target": cfg.epsilon,
            "epsilon_max": max(eps.values()) if eps else None, "epsilon_per_client": eps,
            "accountant": ACCOUNTANT_NAME, "noise_multiplier": _one_or_range(l["noise_multiplier"] for l in train_lines),
            "max_grad_norm": cfg.max_grad_norm,
            "sample_rate": _one_or_range(l["sample_rate"] for l in train_lines),
            "stats_noise_multiplier": stats_sigma,
            "stats_release_covered": covered,
            **({"ddp": ddp_privacy(cfg, ledger), "max_grad_norm": cfg.ddp_clip,
                "accountant": "skellam-rdp"} if cfg.ddp else {})}


def _masks(inp: _RunInputs) -> dict | None:
    """The masks' guarantee (issue 22): the plan (threshold t, neighbours), who learns what, and
    what the ledger's rounds say of them (None: no masks in this run)."""
    blocks = [r["masks"] for r in inp.rounds() if isinstance(r.get("masks"), dict)]
    if not (inp.cfg.masked and blocks):
        return None
    plan, held_out = stream_plan(inp.cfg, inp.charter, "update"), stream_plan(inp.cfg, inp.charter, "metrics")
    stats = [line for line in inp.ledger if line.get("kind") == "stats-masks"]
    metrics = [r["metrics_masks"] for r in inp.rounds() if isinstance(r.get("metrics_masks"), dict)]
    return {**plan.describe(), "who_learns_what": plan.who_learns_what(),
            "rounds_unmasked": sum(1 for b in blocks if b["status"] == "unmasked"),
            "rounds_abandoned": [{"round": b["round"], "reason": b["reason"]} for b in blocks if b["status"] != "unmasked"],
            "refused_messages": sum(1 for line in inp.ledger if line.get("kind") == "masks"),
            # the other mask streams (carbonfed.privacy.mask_streams): the statistics stages, the evaluation counts
            "statistics": {"stages_unmasked": sum(1 for b in stats if b["status"] == "unmasked"),
                           "stages_abandoned": [{"stage": b["stage"], "reason": b["reason"]}
                                                for b in stats if b["status"] != "unmasked"]},
            "metrics": None if not (held_out and metrics) else {
                **held_out.describe(), "who_learns_what": held_out.who_learns_what(),
                "rounds_unmasked": sum(1 for b in metrics if b["status"] == "unmasked"),
                "rounds_abandoned": [{"round": b["round"], "reason": b["reason"]}
                                     for b in metrics if b["status"] != "unmasked"]}}


def _he(inp: _RunInputs) -> dict | None:
    """The HE parameters as the server ran them, the upload size and the packing (None without HE)."""
    if not inp.cfg.he:
        return None
    uploads = [r["upload_bytes_per_client"] for r in inp.rounds() if r.get("upload_bytes_per_client")]
    return {**{k: inp.server["he"][k] for k in ("scheme", "poly_modulus_degree", "coeff_mod_bit_sizes",
                                                "plain_modulus", "security_bits", "server_has_secret_key")},
            "upload_bytes_per_client_round": float(np.mean(uploads)) if uploads else None,
            "packing": "one BFV vector per update: a check slot per 4096-slot ciphertext, the sample count, "
                       "the sample-weighted fixed-point parameters",
            "fixed_point_resolution": inp.layouts.update.codec.resolution, "masks": _masks(inp)}


def _preprocessing(layouts: Layouts, stats_sigma, covered: bool, stats_releases: int,
                   floored: list[str] | None, std_floor: float | None) -> dict:
    """What the statistics release computed and released, and whether ε covers it."""
    bound = layouts.stats.log_bound        # the run's range of the log transform (its data set's preset)
    return {
        "transform": (f"asinh(x / c) per feature (stage 3: c = expm1({bound:g}·(|m2| + {ASINH_K:g}·s2)) from the "
                      "stage-2 mean m2 and std s2 of the log features below); then (u - mean) / std with the "
                      "stage-3 federated mean and std" if layouts.asinh is not None else
                      f"signed log1p, clipped to ±{bound:g}, divided by {bound:g}; then (x - mean) / std "
                      "with the federated mean and std"),
        "released": f"the sum over all training clients of (rows per class, Σx, {SECOND_MOMENT_WEIGHT:g}·Σx²) of the "
                    f"signed-log1p features (clipped to ±{bound:g}, divided by {bound:g})"
                    + (f", each record's (x, {SECOND_MOMENT_WEIGHT:g}·x²) clipped to L2 norm {CONTRIB_CLIP:g}"
                       if covered else "")
                    + "; it reveals the global class frequencies and each feature's mean and variance, never "
                      "one client's own statistics",
        "stages": len(layouts.stages),
        "second_stage": (f"then the sum of (Σz, Σz²) with z = clip((x - m1) / u, ±{REFINE_Z_BOUND:g}), m1 the "
                         f"stage-1 mean and u = max(|m1|, stage-1 std, {STD_FLOOR:g}) per feature, each record's (z, z²) "
                         f"clipped to L2 norm {REFINE_CLIP:g}; the mean and std of the log features come from it (stage-1 "
                         "counts): each feature's variance is measured in its own unit"
                         if layouts.refine is not None else None),
        "third_stage": (f"then the sum of (Σz, Σz²) with z = clip((asinh(x / c) - {ASINH_CENTER:g}) / {ASINH_UNIT:g}, "
                        f"±{ASINH_Z_BOUND:g}), c from stage 2 as above, each record's (z, z²) clipped to L2 norm "
                        f"{ASINH_CLIP:g}; the model's mean and std of asinh(x / c) come from it (variance floored at the larger "
                        f"of {ASINH_STD_FLOOR:g}² and {ASINH_FLOOR_SDS:g} standard deviations of the noise on its second-moment term, "
                        f"{ASINH_UNIT:g}²·σ_s·{ASINH_CLIP:g}·√clients / rows)" if layouts.asinh is not None else None),
        "noise_multiplier": stats_sigma or 0.0,
        # features whose released std fell to the floor: nearly constant (with asinh features: c
        # far above the data, e.g. OWID's energy per capita) or, under DP, a variance the noise
        # pulled down; null without model.pt
        "floored_std_features": floored,
        "std_floor": std_floor,
        "covered_by_epsilon": covered,
        "statement": (f"charged to every training client's accountant as {stats_releases} Gaussian release(s) "
                      f"(noise multiplier {stats_sigma} each; L2 sensitivity "
                      + " and ".join(f"{lay.sensitivity:.4f}" for lay in layouts.stages[:stats_releases]) + "): inside ε"
                      if covered else
                      "released WITHOUT noise: outside the differential-privacy guarantee"),
    }


def _clients(inp: _RunInputs) -> dict:
    """Who took part, from the ledger (a deployment may federate a subset of the partition)."""
    part = split_countries(inp.ds.countries(), inp.cfg.holdout_offset)
    ledger = inp.ledger
    return {"train": len({l["country"] for l in ledger if l.get("kind") == "stats"
                          and l.get("status") == "accepted"}) or len(part.train),
            "test": len({l["country"] for l in ledger if l.get("kind") == "evaluate"
                         and l.get("status") == "accepted"}) or len(part.test),
            "partition": {"train": len(part.train), "test": len(part.test)}}


def _metrics(history: list[dict], last_cm: np.ndarray | None, classes) -> dict:
    """The last scored round's accuracy and macro-F1, its summed confusion matrix (rows true class,
    columns predicted) and per-class scores."""
    last_scored = next((h for h in reversed(history) if h["accuracy"] is not None), None)
    return {"accuracy": last_scored["accuracy"] if last_scored else None,
            "macro_f1": last_scored["macro_f1"] if last_scored else None,
            "classes": list(classes),
            "confusion_matrix": last_cm.astype(int).tolist() if last_cm is not None else None,
            "per_class": per_class(last_cm, classes) if last_cm is not None else None}


def build_report(run_dir: str | Path, keys_dir: str | Path | None = None) -> dict:
    """Build ``report.json`` of a run (and ``model.pt``, the decrypted final model) and return it.

    HE runs need the clients' secret context: ``keys_dir`` (default: the run config's keys-dir).
    """
    inp = _RunInputs.load(run_dir, keys_dir)
    cfg, server, ds, rounds = inp.cfg, inp.server, inp.ds, inp.rounds()
    history, last_cm = _history(inp)
    final, floored, std_floor = _final_model(inp)
    stats_sigma, covered, stats_releases = _stats_release(inp.ledger)
    report = {
        "dataset": cfg.dataset, "privacy_mode": cfg.privacy, "rounds": cfg.rounds, "seed": cfg.seed,
        # the data set's recommended settings and the run's resolved values of them (presets.py)
        "preset": preset_record(cfg.dataset, {name: getattr(cfg, name) for name in (*AUTO, *DDP_AUTO)}),
        "holdout_offset": cfg.holdout_offset,
        "clients": _clients(inp),
        "metrics": _metrics(history, last_cm, ds.classes),
        "history": history, "privacy": _privacy(cfg, inp.ledger, inp.charter, stats_sigma, covered), "he": _he(inp),
        "preprocessing": _preprocessing(inp.layouts, stats_sigma, covered, stats_releases, floored, std_floor),
        "timing": {"total_s": server["total_s"], "per_round_s": float(np.mean([r["seconds"] for r in rounds])) if rounds else None},
        "model": final,
        "provenance": {"config_sha256": server["config_sha256"], "config": server["config"],
                       "data": {**ds.source, "sha256": ds.source.get("sha256") or sha256_file(ds.source["path"])}},
    }
    report["audit"] = {"empirical": empirical_record(inp.run)}        # the last audit-attack's verdict (issue 23)
    if report["privacy"] is not None and report["he"] is not None:   # the masks' guarantee (issue 22)
        report["privacy"]["masks"] = report["he"]["masks"]
    (inp.run / "report.json").write_text(json.dumps(report, indent=2))
    return report

"""The white-box, all-iterates canary audit of ``carbonfed audit-attack`` for ``ddp+he`` runs
(distributed DP-FedSGD); ``dp``/``dp+he`` runs have :mod:`.audit_whitebox`.

Method: one-run auditing (Steinke, Nasr, Jagielski 2023, "Privacy auditing with one (1) training
run", arXiv:2305.08846, Thm 3.1 at the run's δ) with gradient canaries, scored as in the
federated one-shot estimate of Andrew et al. (ICLR 2024, "One-shot empirical privacy estimation
for federated learning": canary updates in fixed random directions, scored by their inner
product with what the observer sees). ``m`` canaries (:mod:`carbonfed.privacy.canary_ddp`) are
spread round-robin over the training clients without a fault drill; each is included by a
secret fair coin (OS entropy). An included canary is a *record* of its client: a clipped
gradient of norm ``C`` (``ddp-clip``) that joins the client's sum of clipped per-example
gradients every round with the public Poisson rate ``q``, before the rounding and the client's
Skellam share; its direction, in the output layer's softmax-invariant subspace (dimension
``D = h + 1``: no real gradient has any component there), is a fresh random one each round. The
run's own config is re-run (:func:`~carbonfed.federation.experiments.audit_run.isolated_simulation`:
a temporary folder, fresh keys, no state folder), pairwise masks as the run had them.

What the auditor observes, and why. In ``ddp+he`` the claim is central: the ledger's ε is that of
each round's *sum* of every contributor's clipped gradients and Skellam share, the only thing the
key holders ever decrypt (a sum below ``min-noise-clients`` is never released; the server holds
only ciphertexts; the pairwise masks, when on, cancel in the sum). So the auditor is given exactly
that: every round's aggregate as the server wrote it (``aggregates/model_round_NNN.bin`` of the
canary run), decrypted with the canary run's key and released as the key holders release it
(:func:`carbonfed.privacy.distributed_dp.release`: the floor and plausibility checks, divided by
the scale), projected on the canary subspace, in units of ``C``. No client's upload is read (one
upload alone carries only its own share of the noise and is not what the claim is about). All
canaries share each round's sum, so their directions overlap (``<u, v>²`` is ``1/D`` on average):
the score (:func:`carbonfed.privacy.audit.empirical.lmmse_scores`) is the linear MMSE estimate of
the coins from all rounds at once, with the noise variance estimated from the observations
(a projection when the noise dominates, a least-squares fit that removes the overlap when it is
small, as under the fault drill). The observations hold ``R·D`` numbers (``R`` rounds): ``m`` is
cut to three quarters of that (:func:`canary_cap`). More canaries than numbers cannot be told
apart even without noise; in simulations of the scoring (exact Gaussian noise, the seed preset's
R = 70, D = 22, σ = 14 C), the correct run's bound rose by ~0.1 from m = 1,500 to 6,000 while the
drill's fell from ~4.7 to ~2.3, and at R·D = 520 three quarters beat a half and the whole.

Test: as :mod:`.audit_whitebox` (top/bottom-``k`` guesses, ``k`` in :data:`FRACTIONS` × m,
Bonferroni). The bound is a lower bound on the record-level ε of the released sums; above the
claim (the run's ledger, and the canary run's), the claim is refuted.

Guarantees
----------
* Nothing is written to the audited folder; the canary run and its keys live in a temporary
  folder removed when the audit ends or fails.
* Canaries go only to training clients named in no fault drill (at most
  :data:`~.audit_whitebox.MAX_PER_CLIENT` each), ``m`` ≤ :func:`canary_cap`; the result says the ``m`` used.
* ``noise_scale`` ≠ 1 is the test-only fault drill: each client's Skellam share is drawn with that
  fraction of the plan's noise multiplier, while the ledger still claims the plan's ε.
* A round whose aggregate was not written or not released contributes no observation (its
  canaries are simply not scored on it: it can only weaken the bound).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from carbonfed.data import split_countries
from carbonfed.federation.client.ddp_layout import DDPUpdateLayout, ddp_plan, update_layout
from carbonfed.federation.client.participant import make_cipher
from carbonfed.federation.config import RunConfig
from carbonfed.federation.experiments.audit_run import claimed_epsilon, isolated_config, isolated_simulation
from carbonfed.federation.experiments.audit_whitebox import FRACTIONS, plan_canaries
from carbonfed.federation.run_data import load_run_data
from carbonfed.models.mlp import build_model
from carbonfed.privacy.audit.empirical import canary_bound, lmmse_scores, mia_metrics
from carbonfed.privacy.canary_ddp import output_shape
from carbonfed.privacy.canary_grad import ENV_VAR, CanaryPlan, null_projection, round_directions
from carbonfed.privacy.distributed_dp import DDPPlan, NoiseFloorError, centred, release
from carbonfed.privacy.fixed_point import WrapError
from carbonfed.privacy.he import SECRET_CONTEXT_FILE, load_secret_context
from carbonfed.privacy.packing import BLOCK

METHOD = ("white-box one-run audit (Steinke-Nasr-Jagielski 2023, Thm 3.1 with the run's delta) of ddp+he: "
          "record canaries (clipped gradients of norm C, Poisson rate q) in training clients' clipped sums, in the "
          "output layer's softmax-invariant subspace, a fresh random direction per round; scores: the linear MMSE "
          "estimate of the coins from every round's decrypted aggregate (what the key holders see); top/bottom-k "
          "guesses, Bonferroni over k")


def canary_cap(rounds: int, dim: int) -> int:
    """Most canaries planted: three quarters of the numbers the observations hold (rounds × subspace
    dimension), so that the least-squares end of the score stays well conditioned."""
    return 3 * int(rounds) * int(dim) // 4


def aggregate_observation(vec: np.ndarray, plan_: DDPPlan, layout: DDPUpdateLayout, n_classes: int,
                          dim: int) -> tuple[np.ndarray, int]:
    """(the released gradient sum in the canary subspace, in units of C; the number of uploads it
    sums) of one decrypted ``ddp+he`` aggregate (check slots skipped: they hold the clients' tags).
    Raises NoiseFloorError / WrapError where the key holders would refuse to release it."""
    payload = np.delete(centred(vec, plan_.plain_modulus), np.arange(0, len(vec), BLOCK))
    terms = int(payload[0])
    grad = release(plan_, layout.gradient(payload), terms)
    return null_projection(grad, n_classes, dim) / plan_.clip, terms


def read_observations(out: Path, cfg: RunConfig, ctx, plan_: DDPPlan, n_features: int,
                      n_classes: int) -> list[tuple[int, np.ndarray, int]]:
    """[(round, observation, contributors)] of every round whose aggregate the canary run wrote
    and the key holders would release."""
    paths = {rnd: out / "aggregates" / f"model_round_{rnd:03d}.bin" for rnd in range(1, cfg.rounds + 1)}
    paths = {rnd: path for rnd, path in paths.items() if path.is_file()}
    if not paths:
        return []
    layout = update_layout(cfg, n_features, n_classes)
    cipher = make_cipher(cfg, ctx, layout.length)
    _, dim = output_shape(build_model(n_features, n_classes, cfg.hidden_sizes, cfg.seed))
    found = []
    for rnd, path in paths.items():
        try:
            obs, terms = aggregate_observation(cipher.decrypt(path.read_bytes()), plan_, layout, n_classes, dim)
        except (NoiseFloorError, WrapError, ValueError, RuntimeError):
            continue
        found.append((rnd, obs, terms))
    return found


def ddp_scores(plan: CanaryPlan, observations: list[tuple[int, np.ndarray, int]],
               rate: float) -> tuple[dict, float]:
    """({"lmmse": scores, "projection": Σ_t <obs_t, u_jt>}, the estimated noise variance per
    coordinate in units of C²). Needs at least one observation."""
    obs = np.stack([o for _, o, _ in observations])
    dirs = np.zeros((len(observations), len(plan.clients), obs.shape[1]))
    for idx, country in enumerate(plan.client_order):
        members = plan.members(country)
        for i, (rnd, _, _) in enumerate(observations):
            dirs[i, members] = round_directions(plan.seed, idx, rnd, len(members), obs.shape[1])
    scores, sigma2 = lmmse_scores(obs, dirs, rate)
    return {"lmmse": scores, "projection": np.einsum("tmd,td->m", dirs, obs)}, sigma2


def accounted_sd(plan_: DDPPlan, contributors: int) -> float:
    """The noise sd per coordinate of a released sum of ``contributors`` uploads, in units of C."""
    return float(np.sqrt(plan_.share_variance * contributors) / plan_.scale / plan_.clip)


def _auc(scores: np.ndarray, included: np.ndarray) -> float | None:
    return mia_metrics(scores[included], scores[~included])["mia_auc"] if 0 < included.sum() < len(included) else None


def ddp_whitebox_audit(cfg: RunConfig, m: int, confidence: float, rng: np.random.Generator,
                       noise_scale: float = 1.0) -> dict:
    """Re-run the ``ddp+he`` config ``cfg`` with record canaries and bound ε from every round's aggregate."""
    if not cfg.ddp:
        raise ValueError(f"this white-box audit covers ddp+he runs, not {cfg.privacy!r}")
    ds = load_run_data(cfg)
    nf, nc = len(ds.features), len(ds.classes)
    part = split_countries(ds.countries(), cfg.holdout_offset)
    plan_ = ddp_plan(cfg, nf, nc, len(part.train))
    _, dim = output_shape(build_model(nf, nc, cfg.hidden_sizes, cfg.seed))
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="carbonfed-audit-ddp-") as tmp:
        tmp = Path(tmp)
        run_cfg = isolated_config(cfg, tmp)
        plan = plan_canaries(cfg, list(part.train), min(m, canary_cap(cfg.rounds, dim)), rng, run_cfg.out_dir,
                             str(tmp / "captures"), noise_scale)
        out = isolated_simulation(run_cfg, {ENV_VAR: str(plan.save(tmp))},
                                  f"white-box audit ({len(plan.clients)} record canaries)")
        print(f"white-box audit: decrypting and scoring the {cfg.rounds} rounds' aggregates", file=sys.stderr,
              flush=True)
        ctx = load_secret_context(Path(run_cfg.keys_dir) / SECRET_CONTEXT_FILE)
        observations = read_observations(out, cfg, ctx, plan_, nf, nc)
        claimed = claimed_epsilon(out, cfg)
    if not observations:
        raise RuntimeError("the canary run released no aggregate to score")
    scores, sigma2 = ddp_scores(plan, observations, plan_.sample_rate)
    included = np.asarray(plan.included)
    bound = canary_bound({"lmmse": scores["lmmse"]}, included, confidence=confidence, delta=cfg.delta,
                         fractions=FRACTIONS, rng=rng)
    return {"method": METHOD, **{k: bound[k] for k in ("epsilon_lower_bound", "epsilon_lower_bound_pure", "guesses",
                                                      "correct", "k_per_side", "score", "tests",
                                                      "per_test_confidence", "sweep")},
            "confidence": confidence, "delta": cfg.delta, "m": len(plan.clients), "clients": len(plan.client_order),
            "included": int(included.sum()), "canary_auc": _auc(scores["lmmse"], included),
            "projection_auc": _auc(scores["projection"], included), "rounds_read": len(observations),
            "subspace_dim": dim, "sample_rate": plan_.sample_rate, "clip": plan_.clip,
            "noise_sd_estimated": float(np.sqrt(sigma2)),
            "noise_sd_accounted": float(np.mean([accounted_sd(plan_, n) for _, _, n in observations])),
            "claimed_epsilon_canary_run": claimed, "seconds": time.time() - t0, "noise_scale": noise_scale,
            "masks_off": False,
            "observed": "every round's decrypted aggregate (the sum of every contributor's clipped gradients and "
                        "Skellam share: what the key holders see in ddp+he), in the canary subspace",
            **({"fault_drill": f"Skellam noise shares secretly x{noise_scale:g}; the ledger claims the plan's noise"}
               if noise_scale != 1.0 else {})}

"""The white-box, all-iterates canary audit of ``carbonfed audit-attack`` (the first line; the
black-box loss audit of :mod:`.audit_attack` is the second).

Method: one-run auditing with gradient canaries (Steinke, Nasr, Jagielski 2023, "Privacy
auditing with one (1) training run", arXiv:2305.08846, the white-box setting with Dirac-like
gradient canaries). ``m`` canaries (:mod:`carbonfed.privacy.canary_grad`) are spread evenly over
the training clients (those without a fault drill); each is included by a secret fair coin
(OS entropy). An included canary is a record of its client whose clipped gradient, norm ``C``,
joins each DP-SGD step with the public Poisson rate ``q``, in a fresh random direction of the
output layer's softmax-invariant subspace every round. The audited run's own config is re-run
(:func:`~carbonfed.federation.experiments.audit_run.isolated_simulation`: a temporary folder,
fresh keys, no state folder).

What the auditor observes, and why. In ``dp`` and ``dp+he`` the record-level claim is made
*per client*: each client's upload of each round is its DP-SGD output, and the key holders
(with the server, which holds every ciphertext) can decrypt every individual upload. So the
auditor is given exactly that: every training client's upload of every round, as sent (the
ciphertext, captured at the client and decrypted with the audit run's secret key), and the
global model it started from (which every key holder decrypts too). Where the run masks its
uploads (issue 22's pairwise masks, on in HE modes), the key holders see only each round's sum;
but the ledger's ε is the per-client DP-SGD release's, which the accountant computes without
crediting the masks. The canary run therefore runs with masks off: the auditor observes the very
mechanism the claim is about (masks only hide it further), and the result says so
(``masks_off``). Scoring only the global
aggregate would add the noise of the 130 other clients to each canary's signal and give a
bound far below what the key holders can really learn. Per client and round, the observation
is the round's descent step in the canary subspace (start − upload), in units of
``C·lr / max(1, n·q)`` (``n``: the row count in the upload, so every client's steps have the same
noise scale). The score of a canary (``projection``) is the inner product of each round's step
with the canary's direction, summed over rounds. Its included neighbours on the same client add
``<u, v> · count`` to it, of variance about 0.04 % of the DP noise's per neighbour (random
directions in ``h + 1 = 22`` dimensions, independent across rounds), so it is the one score tested
(fixed before any audit, so no Bonferroni over scores). The least-squares fit of a client's rounds
on all its canaries at once (``regression``, which removes that overlap) is reported as a
diagnostic (``regression_auc``); on the drill's data it separated as well, no better.

Test: guess "included" for the ``k`` highest and "excluded" for the ``k`` lowest scores, ``k``
in :data:`FRACTIONS` × m, Bonferroni over them; the bound is the largest ε that Theorem 3.1 (the
run's δ) rejects at the requested confidence
(:func:`carbonfed.privacy.audit.empirical.canary_bound`). It is a lower bound on the ε of each
client's release of its records; above the claim, the claim is refuted.

Guarantees
----------
* Nothing is written to the audited folder; the canary run, its keys and the captured uploads
  live in a temporary folder that is removed when the audit ends or fails.
* Canaries go only to training clients named in no fault drill, at most
  :data:`MAX_PER_CLIENT` per client; ``m`` is cut to that (the result says the ``m`` used).
* ``noise_scale`` ≠ 1 is the test-only fault drill: the clients draw that fraction of the
  noise they account; the ledger still claims the full σ (the result says so).
* A canary whose client sent no readable upload in a round gets no score from that round (its
  score stays a tie broken at random: it can only weaken the bound).
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from carbonfed.data import split_countries
from carbonfed.federation.client.participant import Layouts, make_cipher
from carbonfed.federation.config import RunConfig
from carbonfed.federation.experiments.audit_run import claimed_epsilon, isolated_config, isolated_simulation
from carbonfed.federation.faults import parse_drill
from carbonfed.federation.run_data import load_run_data
from carbonfed.privacy.audit.empirical import canary_bound, mia_metrics
from carbonfed.privacy.canary_grad import ENV_VAR, CanaryPlan, null_projection, round_directions
from carbonfed.privacy.he import SECRET_CONTEXT_FILE, load_secret_context
from carbonfed.privacy.packing import BLOCK

FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.25)   # guesses per side, as fractions of m
MAX_PER_CLIENT = 200                         # a client's canaries interfere by ~0.04 % of the noise each
DEFAULT_CANARIES = 10000
METHOD = ("white-box one-run audit (Steinke-Nasr-Jagielski 2023, Thm 3.1 with the run's delta): gradient "
          "canaries (norm C, Poisson rate q) in the output layer's softmax-invariant subspace, a fresh random "
          "direction per round; scores from every client's decrypted per-round upload step along its canaries' "
          "directions, summed over rounds; top/bottom-k guesses, Bonferroni over k")


def plan_canaries(cfg: RunConfig, train: list[str], m: int, rng: np.random.Generator, out_dir: str,
                  capture_dir: str, noise_scale: float = 1.0) -> CanaryPlan:
    """``m`` canaries over the eligible training clients, round-robin in a secret order, fair coins."""
    eligible = [c for c in train if c not in parse_drill(cfg.fault_drill)]
    if not eligible:
        raise ValueError("no training client without a fault drill to hold canaries")
    m = min(m, MAX_PER_CLIENT * len(eligible))
    order = [eligible[i] for i in rng.permutation(len(eligible))]
    clients = tuple(order[i % len(order)] for i in range(m))
    return CanaryPlan(seed=int(rng.integers(2**62)), clients=clients,
                      included=tuple(bool(b) for b in rng.random(m) < 0.5), out_dir=out_dir,
                      capture_dir=capture_dir, noise_scale=noise_scale)


def decode_upload(vec: np.ndarray, layouts: Layouts) -> tuple[np.ndarray, int]:
    """(parameters, row count) of one client's decrypted upload (check slots skipped, not checked:
    they hold the client's tag)."""
    codec = layouts.update.codec
    t = codec.plain_modulus
    v = np.mod(np.asarray(vec, dtype=np.int64), t)
    v = np.where(v > t // 2, v - t, v)
    payload = np.delete(v, np.arange(0, len(v), BLOCK))
    count = int(payload[0])
    if not 1 <= count <= layouts.update.max_client_samples:
        raise ValueError(f"row count {count} out of range")
    params = codec.decode(payload[1:1 + layouts.update.n_params]) * (layouts.update.max_client_samples / count)
    return params, count


def _client_steps(plan: CanaryPlan, cfg: RunConfig, country: str, layouts: Layouts, cipher, n_classes: int):
    """[(round, descent step in the canary subspace in units of C·lr/max(1, n·q))] of one client."""
    steps = []
    for rnd in range(1, cfg.rounds + 1):
        up, start = plan.upload_file(country, rnd), plan.start_file(country, rnd)
        if not (up.is_file() and start.is_file()):
            continue
        try:
            params, count = decode_upload(cipher.decrypt(up.read_bytes()), layouts)
        except (ValueError, RuntimeError):
            continue
        begin = np.load(start)
        unit = cfg.max_grad_norm * cfg.lr / max(1.0, count / cfg.batches_per_epoch)
        steps.append((rnd, (begin - null_projection(params, n_classes, len(begin))) / unit))
    return steps


def canary_scores(plan: CanaryPlan, cfg: RunConfig, n_features: int, n_classes: int, ctx) -> tuple[dict, int]:
    """({variant: score per canary}, uploads read). ``projection``: Σ over rounds of the descent
    step along each canary's direction; ``regression``: the least-squares fit of every round's
    step of a client on all its canaries' directions at once (removes their mutual overlap)."""
    layouts = Layouts.for_run(cfg, n_features, n_classes)
    cipher = make_cipher(cfg, ctx, layouts.update.length)
    proj, reg, read = np.zeros(len(plan.clients)), np.zeros(len(plan.clients)), 0
    for idx, country in enumerate(plan.client_order):
        members = plan.members(country)
        steps = _client_steps(plan, cfg, country, layouts, cipher, n_classes)
        if not steps:
            continue
        dirs = [round_directions(plan.seed, idx, rnd, len(members), len(step)) for rnd, step in steps]
        proj[members] = sum(d @ step for d, (_, step) in zip(dirs, steps))
        design = np.concatenate([d.T for d in dirs])               # (rounds·dim) × canaries
        reg[members] = np.linalg.lstsq(design, np.concatenate([s for _, s in steps]), rcond=None)[0]
        read += len(steps)
    return {"projection": proj, "regression": reg}, read


def whitebox_audit(cfg: RunConfig, m: int, confidence: float, rng: np.random.Generator,
                   noise_scale: float = 1.0) -> dict:
    """Re-run ``cfg`` with gradient canaries and bound ε from every client's per-round uploads."""
    if not cfg.dp or cfg.ddp:
        raise ValueError(f"the white-box audit covers record-level DP-SGD (dp, dp+he), not {cfg.privacy!r}")
    ds = load_run_data(cfg)
    part = split_countries(ds.countries(), cfg.holdout_offset)
    masks_off = bool(getattr(cfg, "masked", False))     # the per-client release the ledger accounts, unmasked
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="carbonfed-audit-wb-") as tmp:
        tmp = Path(tmp)
        run_cfg = isolated_config(replace(cfg, masks=False) if masks_off else cfg, tmp)
        plan = plan_canaries(cfg, list(part.train), m, rng, run_cfg.out_dir, str(tmp / "uploads"), noise_scale)
        out = isolated_simulation(run_cfg, {ENV_VAR: str(plan.save(tmp))},
                                  f"white-box audit ({len(plan.clients)} gradient canaries)")
        print(f"white-box audit: decrypting and scoring {len(plan.client_order)} clients' uploads of "
              f"{cfg.rounds} rounds", file=sys.stderr, flush=True)
        ctx = load_secret_context(Path(run_cfg.keys_dir) / SECRET_CONTEXT_FILE) if cfg.he else None
        scores, read = canary_scores(plan, cfg, len(ds.features), len(ds.classes), ctx)
        claimed = claimed_epsilon(out, cfg)
    included = np.asarray(plan.included)
    best, reg = scores["projection"], scores["regression"]
    bound = canary_bound({"projection": best}, included, confidence=confidence, delta=cfg.delta, fractions=FRACTIONS,
                         rng=rng)
    both = 0 < included.sum() < len(included)
    return {"method": METHOD, "epsilon_lower_bound": bound["epsilon_lower_bound"],
            "epsilon_lower_bound_pure": bound["epsilon_lower_bound_pure"], "confidence": confidence,
            "delta": cfg.delta, "m": len(plan.clients), "clients": len(plan.client_order),
            "included": int(included.sum()), "guesses": bound["guesses"], "correct": bound["correct"],
            "k_per_side": bound["k_per_side"], "score": bound["score"], "tests": bound["tests"],
            "per_test_confidence": bound["per_test_confidence"], "sweep": bound["sweep"],
            "canary_auc": mia_metrics(best[included], best[~included])["mia_auc"] if both else None,
            "regression_auc": mia_metrics(reg[included], reg[~included])["mia_auc"] if both else None,
            "uploads_read": read, "claimed_epsilon_canary_run": claimed, "seconds": time.time() - t0,
            "noise_scale": noise_scale, "masks_off": masks_off,
            "observed": "every training client's decrypted upload of every round and the global model it "
                        "started from (what the key holders can decrypt in dp/dp+he)",
            **({"fault_drill": f"noise multiplier secretly x{noise_scale:g}; the ledger claims the full sigma"}
               if noise_scale != 1.0 else {})}

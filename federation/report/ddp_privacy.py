"""``report.json`` ``privacy.ddp`` of a ``ddp+he`` run: the central guarantee and the per-upload one.

Guarantees
----------
* ``epsilon_central``: the statistics releases and every released round at the noise its sum
  carried (each share's variance × the round's contributors, from the ledger's round lines),
  accounted by :func:`carbonfed.privacy.distributed_dp.spent`; ``epsilon_planned`` is the plan's
  (every round at the floor ``min_noise_clients``), the bound each client charged.
  ``carbonfed verify`` recomputes the central ε independently from the signed contributors.
* ``epsilon_per_upload``: what a party that decrypts one client's ciphertexts learns (today: the
  server together with any one key holder): that client's statistics shares and its
  ``rounds_released`` uploads each with only its own share of the noise,
  :func:`~carbonfed.privacy.distributed_dp.upload_epsilon`. Weak by design; stated, never hidden.
"""

from __future__ import annotations

from carbonfed.federation.client.ddp import server_lr
from carbonfed.federation.client.ddp_layout import share_stages
from carbonfed.federation.config import RunConfig
from carbonfed.federation.run_data import data_schema
from carbonfed.federation.server.ddp import server_plan
from carbonfed.privacy.distributed_dp import spent, upload_epsilon
from carbonfed.privacy.skellam import Release

PAPER = ("Agarwal, Kairouz and Liu 2021, 'The Skellam Mechanism for Differentially Private Federated Learning', "
         "Theorem 3.5 (Skellam RDP), with Poisson subsampling by Zhu and Wang 2019, Theorem 5")


def ddp_privacy(cfg: RunConfig, ledger: list[dict]) -> dict | None:
    """The ``privacy.ddp`` block from the ledger's round lines (None: no round line with ddp fields)."""
    rounds = [r["ddp"] for r in ledger if r.get("kind") == "round" and isinstance(r.get("ddp"), dict)]
    if not rounds:
        return None
    n_train = int(rounds[-1]["training_clients"])
    p = server_plan(cfg, n_train)
    released = [int(d["contributors"]) for d in rounds if d.get("released")]
    shares = [Release(s.share_variance, s.l2, s.release.l1, 1.0, 1)
              for s in share_stages(cfg, *data_schema(cfg), n_train) if s.sigma > 0]
    d = p.describe(cfg.delta)
    return {"mechanism": "distributed DP-FedSGD: Skellam noise shares summed exactly under BFV", "theorem": PAPER,
            "epsilon_central": spent(p, released, cfg.delta), "epsilon_planned": d["epsilon"],
            "epsilon_per_upload": upload_epsilon(p, len(released), cfg.delta, prior_shares=shares),
            "delta": cfg.delta, "min_noise_clients": p.min_clients, "training_clients": n_train,
            "rounds_released": len(released), "rounds_withheld": len(rounds) - len(released),
            "contributors_per_round": [int(x["contributors"]) for x in rounds],
            "noise_multiplier": p.noise_multiplier, "central_variance": p.central_variance,
            "share_variance": p.share_variance, "scale": p.scale, "clip": p.clip, "sample_rate": p.sample_rate,
            "l2": p.l2, "l1": p.l1, "wrap_probability": d["wrap_probability"],
            "server_optimizer": {"kind": cfg.server_opt, "lr": server_lr(cfg, p), "lr_setting": cfg.lr,
                                 "lr_z_cap": cfg.ddp_lr_z if cfg.server_opt == "adam" else None, "momentum": cfg.momentum,
                                 "weight_decay": max(0.0, cfg.ddp_weight_decay)}}

"""The server's side of ``ddp+he`` (distributed DP-FedSGD, issue 19): the noise floor of a round and
what the ledger records of it.

Guarantees
----------
* :func:`round_record` states, for every training round, how many uploads the aggregate sums
  (``contributors``), whether it is released (at least ``min-noise-clients`` of them, and
  ``min-train-clients``: otherwise the server keeps the previous aggregate and no key holder is
  sent the round's sum) and, for a released round, the noise the sum carries (``variance`` =
  each share's variance × contributors) with the sensitivities and sample rate it is accounted
  with (:func:`carbonfed.federation.client.ddp_layout.round_mechanism`), in the plan's integer
  units (``scale``), as plain numbers that :func:`carbonfed.privacy.audit.ddp_epsilon.recompute_epsilon` reads.
* The plan is the clients' (:func:`~carbonfed.federation.client.ddp_layout.ddp_plan`, the same
  pure function of the config, the data set's schema and the number of training clients).
"""

from __future__ import annotations

from carbonfed.federation.client.ddp_layout import ddp_plan, round_mechanism
from carbonfed.federation.config import RunConfig
from carbonfed.federation.run_data import data_schema


def server_plan(cfg: RunConfig, n_train: int):
    """The run's plan as the server computes it (no data read: the schema is in the config)."""
    return ddp_plan(cfg, *data_schema(cfg), n_train)


def round_record(cfg: RunConfig, n_train: int, contributors: int) -> dict:
    """The ledger's ``ddp`` fields of a round whose aggregate sums ``contributors`` uploads."""
    p = server_plan(cfg, n_train)
    released = contributors >= cfg.release_floor(n_train)
    out = {"contributors": int(contributors), "released": bool(released), "min_noise_clients": p.min_clients,
           "training_clients": int(n_train), "clip": p.clip, "scale": p.scale, "share_variance": p.share_variance}
    if released:
        out.update(round_mechanism(p, contributors))
    return out

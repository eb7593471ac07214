"""Gradient canaries in DP-SGD, for the white-box audit of ``carbonfed audit-attack``.

A *gradient canary* (Steinke, Nasr, Jagielski 2023, "Privacy auditing with one (1) training run",
the white-box setting) is a record whose clipped per-sample gradient is a fixed vector of norm
exactly ``C`` (``max_grad_norm``): it is Poisson-sampled into each DP-SGD step with the public
rate ``q`` like every real row, and its gradient is added to the clipped sum before the Gaussian
noise. DP-SGD's guarantee covers any per-sample gradient of norm at most ``C``, so each canary is
one record under the client's record-level claim.

Dedicated coordinates. The canaries live in the output layer's *softmax-invariant* subspace:
moving the output layer's weights by ``1_k ⊗ a`` and its bias by ``1_k · b`` (``k`` classes)
shifts every logit by the same amount, so no loss, prediction or real per-sample gradient
depends on it (the real gradients ``(p − y) ⊗ h`` sum to zero over the classes, with or without
class weights). In that subspace of dimension ``h + 1`` (``h``: the output layer's input width)
the real data contribute exactly nothing; only the DP noise and the canaries do. A canary's
direction there is a fresh random unit vector every round (:func:`round_directions`), so the
canaries of one client barely interfere: two canaries overlap by ``<u, v>`` of variance
``1/(h+1)`` per round, with independent signs across rounds.

How a run gets its canaries. ``carbonfed audit-attack`` writes a :class:`CanaryPlan` and names it
in the environment variable :data:`ENV_VAR` while its own canary federation runs (simulation
workers inherit it). :func:`audit_canaries` reads it in the client: the canaries assigned to
this client (included or not), which :func:`carbonfed.privacy.dp_sgd.train_local` inserts, and a
tap that writes this client's upload, as sent, for the auditor.

Guarantees
----------
* Without :data:`ENV_VAR`, :func:`audit_canaries` returns :data:`NO_CANARIES`, a falsy object
  whose :meth:`~NoCanaries.capture` returns its argument: training and uploads are unchanged.
* A plan is honoured only in the run it was written for (its ``out_dir`` is the run's), else
  :func:`audit_canaries` raises: a stray variable cannot plant canaries in, or weaken the noise
  of, another run.
* :meth:`ClientCanaries.step_gradients` adds, to the output layer, ``C`` times the sum of the
  directions of the *included* canaries that this step's Poisson draw (rate ``q``) took; each
  direction has norm exactly 1 in parameter space (:func:`null_projection` is its adjoint).
* ``noise_scale`` (default 1) is a test-only fault drill: the noise actually drawn is multiplied
  by it while the accountant (and so the ledger) still charges the claimed σ.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ENV_VAR = "CARBONFED_AUDIT_CANARIES"
PLAN_FILE = "canary-plan.json"


def null_projection(flat: np.ndarray, n_classes: int, dim: int) -> np.ndarray:
    """The ``dim = h + 1`` coordinates of a flat parameter vector (output layer last: weight
    ``k × h`` row-major, then bias ``k``) in the orthonormal basis ``(1_k ⊗ e_j, 1_k) / √k``."""
    flat = np.asarray(flat, dtype=np.float64)
    k = n_classes
    weight = flat[len(flat) - k * dim:len(flat) - k].reshape(k, dim - 1)
    return np.concatenate([weight.sum(0), [flat[-k:].sum()]]) / np.sqrt(k)


def round_directions(seed: int, client: int, rnd: int, n: int, dim: int) -> np.ndarray:
    """``n × dim`` unit rows: the directions of a client's canaries in round ``rnd``."""
    g = np.random.default_rng([seed, client, rnd]).normal(size=(n, dim))
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def _slug(country: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", country).strip("_") or "country"


@dataclass(frozen=True)
class CanaryPlan:
    """The audit's secret canaries: the client of each, the inclusion coins, the directions' seed."""

    seed: int
    clients: tuple[str, ...]        # one per canary
    included: tuple[bool, ...]      # one per canary
    out_dir: str                    # the canary run this plan is for (RunConfig.out_dir)
    capture_dir: str                # where the clients' uploads are written
    noise_scale: float = 1.0        # fault drill only

    @functools.cached_property
    def client_order(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.clients)))

    def members(self, country: str) -> np.ndarray:
        """Indices of the canaries assigned to ``country``, in plan order (their slots)."""
        return np.flatnonzero(np.asarray(self.clients) == country)

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / PLAN_FILE
        path.write_text(json.dumps({"seed": int(self.seed), "clients": list(self.clients),
                                    "included": [bool(b) for b in self.included], "out_dir": self.out_dir,
                                    "capture_dir": self.capture_dir, "noise_scale": float(self.noise_scale)}))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CanaryPlan":
        d = json.loads(Path(path).read_text())
        return cls(int(d["seed"]), tuple(d["clients"]), tuple(bool(b) for b in d["included"]), d["out_dir"],
                   d["capture_dir"], float(d.get("noise_scale", 1.0)))

    def upload_file(self, country: str, rnd: int) -> Path:
        return Path(self.capture_dir) / f"{_slug(country)}-r{rnd:04d}.bin"

    def start_file(self, country: str, rnd: int) -> Path:
        return Path(self.capture_dir) / f"{_slug(country)}-r{rnd:04d}.start.npy"


class NoCanaries:
    """Outside an audit: no canary, the upload passes through untouched."""

    noise_scale = 1.0

    def __bool__(self) -> bool:
        return False

    def capture(self, data: bytes) -> bytes:
        return data


NO_CANARIES = NoCanaries()


class AssignedCanaries:
    """The canaries of one client in one round of an audit's run, whatever the mechanism: which
    slots of the plan are its (``members``), which of them are included, its index in the plan's
    client order (the seed of its directions), the drill's ``noise_scale`` and the source of the
    canaries' Poisson draws (OS entropy)."""

    def __init__(self, plan: CanaryPlan, country: str, rnd: int):
        self.plan, self.country, self.rnd = plan, country, rnd
        self.members = plan.members(country)
        self.included = np.asarray(plan.included, dtype=bool)[self.members]
        self.client = plan.client_order.index(country)
        self.noise_scale = plan.noise_scale
        self.rng = np.random.default_rng()

    def __bool__(self) -> bool:
        return True

    def directions_for(self, dim: int) -> np.ndarray:
        """This round's unit directions of this client's canaries (all of its slots), in the subspace."""
        return round_directions(self.plan.seed, self.client, self.rnd, len(self.members), dim)


class ClientCanaries(AssignedCanaries, NoCanaries):
    """One client's canaries in one round: inserted into its DP-SGD steps, upload captured."""

    def __init__(self, plan: CanaryPlan, country: str, rnd: int):
        super().__init__(plan, country, rnd)
        self.directions = None                      # (included canaries) × dim, set by start()
        self.rate = 0.0

    def start(self, model, sample_rate: float) -> None:
        """Before local training: the output layer's shape, and the start point of this round's
        walk in the canary subspace (the global model, as this client decrypted it)."""
        weight, bias = list(model.parameters())[-2:]
        k, h = weight.shape
        dim = h + 1
        flat = np.concatenate([weight.detach().numpy().ravel(), bias.detach().numpy()]).astype(np.float64)
        Path(self.plan.capture_dir).mkdir(parents=True, exist_ok=True)
        np.save(self.plan.start_file(self.country, self.rnd), null_projection(flat, k, dim))
        self.directions, self.rate, self.k = self.directions_for(dim)[self.included], float(sample_rate), k

    def step_gradients(self, params: list, clip: float) -> dict:
        """``{id(param): tensor}`` to add to the clipped sum of this step (output layer only)."""
        import torch

        taken = self.rng.random(len(self.directions)) < self.rate
        if not taken.any():
            return {}
        g = clip * self.directions[taken].sum(0) / np.sqrt(self.k)
        weight, bias = params[-2:]
        w_add = np.repeat(g[None, :-1], self.k, axis=0)
        b_add = np.full(self.k, g[-1])
        return {id(weight): torch.from_numpy(w_add).to(weight.dtype).view_as(weight),
                id(bias): torch.from_numpy(b_add).to(bias.dtype).view_as(bias)}

    def capture(self, data: bytes) -> bytes:
        """Write this client's upload of the round, as sent (the auditor decrypts it); return it."""
        path = self.plan.upload_file(self.country, self.rnd)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data


@functools.lru_cache(maxsize=2)
def _plan(path: str) -> CanaryPlan:
    return CanaryPlan.load(path)


def client_plan(out_dir: str, country: str) -> CanaryPlan | None:
    """The audit's plan if it gives ``country`` canaries in the run writing to ``out_dir`` (None
    outside an audit, or for a client without canaries); raises for another run's plan."""
    path = os.environ.get(ENV_VAR)
    if not path:
        return None
    plan = _plan(path)
    if str(Path(plan.out_dir).resolve()) != str(Path(out_dir or ".").resolve()):
        raise RuntimeError(f"{ENV_VAR} names a canary plan for {plan.out_dir}, not for this run ({out_dir!r}): "
                           "refusing to plant canaries in another run")
    return plan if country in plan.clients else None


def audit_canaries(out_dir: str, country: str, rnd: int) -> NoCanaries:
    """This client's canaries in round ``rnd`` of the run writing to ``out_dir`` (:data:`NO_CANARIES`
    outside an audit, or for a client without canaries)."""
    plan = client_plan(out_dir, country)
    return ClientCanaries(plan, country, rnd) if plan is not None else NO_CANARIES

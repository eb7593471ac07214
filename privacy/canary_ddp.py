"""Gradient canaries in distributed DP-FedSGD (``ddp+he``), for the white-box audit of
``carbonfed audit-attack``.

A canary is a *record* of a training client whose clipped gradient is a fixed vector of norm
exactly ``C`` (``ddp-clip``): every round it joins the client's sum of clipped per-example
gradients with the public Poisson rate ``q``, as one more row, before the row-by-row rounding
and the client's Skellam share (:func:`carbonfed.privacy.distributed_dp.contribution`). The
ddp guarantee covers any row of norm at most ``C`` (one row moves a round's sum by at most
``Δ₂``), so each canary is one record under the run's central, record-level claim.

Dedicated coordinates, as for DP-SGD (:mod:`carbonfed.privacy.canary_grad`): a canary's vector
lies in the output layer's softmax-invariant subspace (dimension ``h + 1``), where no real
per-example gradient of the cross-entropy has any component, in a fresh random direction every
round (:func:`~carbonfed.privacy.canary_grad.round_directions`, the same seeds as DP-SGD's
canaries: client index in the plan, round). :func:`embed` is the adjoint of
:func:`~carbonfed.privacy.canary_grad.null_projection`: a unit vector of the subspace becomes a
unit vector of parameter space.

Guarantees
----------
* Without :data:`~carbonfed.privacy.canary_grad.ENV_VAR`, :func:`ddp_canaries` returns
  :data:`NO_DDP_CANARIES`: :meth:`~NoDDPCanaries.rows` returns the gradients it is given (the same
  object) and :meth:`~NoDDPCanaries.mechanism` the plan it is given: a round is unchanged.
* A plan is honoured only in the run it was written for (its ``out_dir``), else
  :func:`ddp_canaries` raises (:func:`carbonfed.privacy.canary_grad.client_plan`'s check).
* :meth:`DDPCanaries.rows` appends one row ``C · embed(u)`` per *included* canary of this client
  that this round's Poisson draw (rate ``q``, OS entropy) took; excluded canaries add nothing.
* ``noise_scale`` ≠ 1 is the test-only fault drill: :meth:`DDPCanaries.mechanism` returns the plan
  with its noise multiplier times ``noise_scale``, which the client uses for its Skellam share only;
  the accountant (and so the ledger) still charges the public plan's noise.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from carbonfed.privacy.canary_grad import AssignedCanaries, client_plan
from carbonfed.privacy.distributed_dp import DDPPlan


def embed(coords: np.ndarray, n_classes: int, n_params: int) -> np.ndarray:
    """Rows of ``h + 1`` subspace coordinates as flat parameter vectors (output layer last: weight
    ``k × h`` row-major, then bias ``k``): the adjoint of ``null_projection``, norm-preserving."""
    coords = np.atleast_2d(np.asarray(coords, dtype=np.float64))
    k, dim = n_classes, coords.shape[1]
    out = np.zeros((len(coords), n_params))
    out[:, n_params - k * dim:n_params - k] = np.tile(coords[:, :-1], (1, k)) / np.sqrt(k)
    out[:, n_params - k:] = coords[:, -1:] / np.sqrt(k)
    return out


def output_shape(model) -> tuple[int, int]:
    """(classes k, subspace dimension h + 1) of a model whose last parameters are the output layer."""
    weight = list(model.parameters())[-2]
    k, h = weight.shape
    return int(k), int(h) + 1


class NoDDPCanaries:
    """Outside an audit: no canary, the public plan's noise."""

    noise_scale = 1.0

    def __bool__(self) -> bool:
        return False

    def rows(self, model, grads: np.ndarray, sample_rate: float, clip: float) -> np.ndarray:
        return grads

    def mechanism(self, plan_: DDPPlan) -> DDPPlan:
        return plan_


NO_DDP_CANARIES = NoDDPCanaries()


class DDPCanaries(AssignedCanaries, NoDDPCanaries):
    """One client's canaries in one ``ddp+he`` round."""

    def vectors(self, n_classes: int, dim: int, n_params: int, sample_rate: float) -> np.ndarray:
        """This round's canary rows (unit norm): the included ones that the Poisson draw took."""
        dirs = self.directions_for(dim)
        taken = self.included & (self.rng.random(len(self.members)) < sample_rate)
        return embed(dirs[taken], n_classes, n_params)

    def rows(self, model, grads: np.ndarray, sample_rate: float, clip: float) -> np.ndarray:
        """The sampled rows' gradients followed by ``C`` times this round's canary rows."""
        grads = np.asarray(grads, dtype=np.float64)
        k, dim = output_shape(model)
        extra = clip * self.vectors(k, dim, grads.shape[1], sample_rate)
        return np.concatenate([grads, extra]) if len(extra) else grads

    def mechanism(self, plan_: DDPPlan) -> DDPPlan:
        """The plan the client draws its Skellam share from (the drill: less noise than accounted)."""
        if self.noise_scale == 1.0:
            return plan_
        return replace(plan_, noise_multiplier=plan_.noise_multiplier * self.noise_scale)


def ddp_canaries(out_dir: str, country: str, rnd: int) -> NoDDPCanaries:
    """This client's canaries in round ``rnd`` of the ``ddp+he`` run writing to ``out_dir``
    (:data:`NO_DDP_CANARIES` outside an audit, or for a client without canaries)."""
    plan = client_plan(out_dir, country)       # checks that the plan is this run's
    return DDPCanaries(plan, country, rnd) if plan is not None else NO_DDP_CANARIES

"""One country's client: what it does with each request, independent of transport.

The Flower ``ClientApp`` (:mod:`carbonfed.federation.client.app`) turns messages into calls on a
:class:`Participant` and its replies back into messages. The participant keeps every piece of
state that must survive between messages in :attr:`Participant.state` (a dict of plain lists and
scalars that the ClientApp stores in ``context.state``), because a deployed client keeps nothing
in memory between messages.

Guarantees
----------
* The noise multiplier is calibrated once, for the whole planned run (``rounds`` rounds of
  ``local_epochs`` epochs, plus the statistics release), so that the client's total ε at ``delta``
  reaches at most the target ``epsilon``.
* Before touching its data in a round, the client computes the ε it would have spent after
  that round; if that exceeds its budget it refuses, says so, and spends nothing.
* Each statistics release (stage 1 at the setup; stages 2 and 3, :meth:`Participant.refine`, in
  DP runs with more stages) happens at most once per run per client, and is charged before it is made.
* Every upload is an encrypted integer vector (HE on) carrying the sample count inside it.
* ``ddp+he`` (distributed DP-FedSGD) only changes what the layouts are and what a round does:
  :mod:`~carbonfed.federation.client.ddp_layout` (Skellam shares), :func:`~carbonfed.federation.client.ddp.train_round`.
* With a :class:`~carbonfed.federation.client.signer.Signer` (every run of the ClientApp), every
  upload carries this client's tag of its kind and round in its check slots, every aggregate it
  receives is decrypted only if its check slots carry the tags of the contributions the server
  names (else :class:`~carbonfed.federation.client.signer.RequestRefused`), and every fact it
  reports is a statement it signs after its previous one (:meth:`Participant.sign`).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from carbonfed.data.dataset import FederatedDataset
from carbonfed.data.partition import Partition
from carbonfed.privacy.stats_release import AsinhLayout, RefineLayout, StatsLayout
from carbonfed.federation.client import ddp, ddp_layout, masking, scaler_cache
from carbonfed.federation.client.errors import BudgetExceeded
from carbonfed.federation.client.signer import Part, Signer
from carbonfed.federation.config import RunConfig
from carbonfed.federation.faults import corrupt, nan_params, parse_drill
from carbonfed.federation.wire import stage_key
from carbonfed.models.mlp import build_model
from carbonfed.models.params import flatten_params, load_flat_params, num_params
from carbonfed.privacy.accountant import ClientAccountant, calibrate_noise
from carbonfed.privacy.distributed_dp import DDPAccountant, DDPPlan
from carbonfed.privacy.dp_sgd import TrainSettings, audit_canaries, planned_mechanism, train_local
from carbonfed.privacy.fixed_point import FixedPointCodec
from carbonfed.privacy.he import BFVCipher, HEParams, key_fingerprint, new_secret_context, params_of
from carbonfed.privacy.packing import CountLayout, UpdateLayout
from carbonfed.privacy.randomness import NoiseSource
from carbonfed.privacy.secure_sum import PlainCipher
from carbonfed.privacy.statements import chain_after

PLAIN_FINGERPRINT = "plaintext"
__all__ = ["BudgetExceeded", "Layouts", "Participant", "make_cipher", "released_flag", "PLAIN_FINGERPRINT"]


@dataclass(frozen=True)
class Layouts:
    """The three integer layouts of a run, derived from its config and model size."""

    update: UpdateLayout
    stats: StatsLayout
    metrics: CountLayout
    refine: RefineLayout | None = None   # second-stage statistics (RunConfig.stats_releases >= 2)
    asinh: AsinhLayout | None = None     # third-stage statistics (RunConfig.stats_releases == 3)

    @property
    def stages(self) -> list:
        """The statistics releases of the run, in order: stage 1, then the later stages."""
        return [lay for lay in (self.stats, self.refine, self.asinh) if lay is not None]

    @property
    def he_requirement(self) -> tuple[int, int]:
        """(longest vector, most ciphertexts summed into one aggregate): what the run's HE keys
        must hold (:func:`carbonfed.privacy.he_ring.ring_for`, ``check_ring``); the server's
        model average sums the most, ``update.codec.max_terms``."""
        return max(lay.length for lay in (self.update, self.metrics, *self.stages)), self.update.codec.max_terms

    def scaler(self, aggregates: list[tuple[np.ndarray, int]]):
        """The scaler from decrypted statistics aggregates ``[(vector, terms) of stage 1, of
        stage 2, ...]``: each stage's aggregate read with the scaler of the stages before it."""
        (vec, terms), rest = aggregates[0], aggregates[1:]
        scaler = self.stats.unpack_sum(vec, terms)
        for lay, (vec, terms) in zip(self.stages[1:], rest):
            scaler = lay.unpack_sum(vec, terms, scaler)
        return scaler

    @classmethod
    @functools.lru_cache(maxsize=16)   # pure in its (frozen) arguments; asked for on every message
    def for_run(cls, cfg: RunConfig, n_features: int, n_classes: int, n_train: int = 0) -> "Layouts":
        """``n_train`` (training clients) sizes the noise shares of ``ddp+he`` (0: lengths only)."""
        if cfg.ddp:
            stages = ddp_layout.share_stages(cfg, n_features, n_classes, n_train)
            return cls(update=ddp_layout.update_layout(cfg, n_features, n_classes), stats=stages[0],
                       metrics=CountLayout(n_classes * n_classes), refine=(stages[1:2] or [None])[0],
                       asinh=(stages[2:3] or [None])[0])
        t = HEParams().plain_modulus
        n_params = num_params(build_model(n_features, n_classes, cfg.hidden_sizes, cfg.seed))
        # headroom for the server's sum of the last ``average-last`` global models, each a sum of
        # at most max-clients-per-round updates
        codec = FixedPointCodec(t, clip=cfg.param_clip, max_terms=cfg.max_clients_per_round * cfg.average_last)
        stats = StatsLayout(n_features, n_classes, cfg.max_client_samples, cfg.stats_sigma, t, cfg.max_clients_per_round,
                            cfg.log_bound)
        return cls(update=UpdateLayout(n_params, cfg.max_client_samples, codec), stats=stats,
                   metrics=CountLayout(n_classes * n_classes),
                   refine=RefineLayout(stats) if cfg.stats_releases >= 2 else None,
                   asinh=AsinhLayout(stats) if cfg.stats_releases >= 3 else None)


def released_flag(stage: int) -> str:
    """The participant-state key that says statistics stage ``stage`` was released."""
    return {1: "stats_released", 2: "refine_released"}.get(stage, f"stage{stage}_released")


def make_cipher(cfg: RunConfig, ctx, length: int):
    """BFV under ``ctx`` when HE is on, else the plaintext twin with the same modulus."""
    if cfg.he:
        if ctx is None:
            raise ValueError("HE is on but no TenSEAL context was given (keys-dir / secret-context unset)")
        return BFVCipher(ctx, length)
    return PlainCipher(length, HEParams().plain_modulus)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@dataclass
class Participant:
    cfg: RunConfig
    dataset: FederatedDataset
    partition: Partition
    country: str
    ctx: object = None            # secret TenSEAL context (HE on) or None
    state: dict = field(default_factory=dict)
    fingerprint: str = ""         # of ``ctx``'s public key; computed here unless the caller has it
    signer: Signer | None = None  # charter, signing key and check-slot tags (None: unit tests of the protocol)
    maskers: dict = field(default_factory=dict, repr=False)   # by upload kind: masking.arm(_upload) sets, apply uses

    def __post_init__(self):
        self.role = self.partition.role(self.country)
        self.fault = parse_drill(self.cfg.fault_drill).get(self.country, "")
        if self.fault == "foreign-key" and self.cfg.he:
            self.ctx, self.fingerprint = new_secret_context(params_of(self.ctx)), ""   # the run's ring, another key
        self.x, self.y = self.dataset.client_arrays(self.country)
        self.layouts = Layouts.for_run(self.cfg, len(self.dataset.features), len(self.dataset.classes),
                                       len(self.partition.train) if self.cfg.ddp else 0)
        if not self.cfg.he:
            self.fingerprint = PLAIN_FINGERPRINT
        elif not self.fingerprint:
            self.fingerprint = key_fingerprint(self.ctx)
        if len(self.y) > self.cfg.max_client_samples:
            raise ValueError(f"{self.country} holds {len(self.y)} rows, more than max-client-samples="
                             f"{self.cfg.max_client_samples}: raise that public bound for this federation")
        self.settings = TrainSettings(lr=self.cfg.lr, momentum=self.cfg.momentum, local_epochs=self.cfg.local_epochs,
                                      batches_per_epoch=self.cfg.batches_per_epoch, max_grad_norm=self.cfg.max_grad_norm)

    # -- signatures and check slots -----------------------------------------------------------
    def sign(self, kind: str, rnd: int, facts: dict, **kw) -> dict:
        """This client's signed statement of ``facts`` (:meth:`Signer.sign`), chained after its
        previous one; the chain head is updated in the state without writing it (the caller
        writes the state once, with the reply it caches)."""
        st = self.signer.sign(self.state.get("chain"), kind, rnd, facts, **kw)
        dict.__setitem__(self.state, "chain", chain_after(st))
        return st

    def _tagged(self, vec: np.ndarray, kind: str, rnd: int) -> np.ndarray:   # and masked (issue 22)
        return masking.apply(self, self.signer.tag(vec, kind, rnd) if self.signer is not None else vec, kind)

    def _opened(self, name: str, vec: np.ndarray, parts: list[Part] | None, terms: int) -> np.ndarray:
        """A decrypted aggregate, checked against the contributions the server names (with a signer)."""
        if self.signer is None:
            return vec
        return self.signer.check(name, vec, parts or [], terms)

    # -- privacy state ---------------------------------------------------------------------
    @property
    def accountant(self) -> ClientAccountant | DDPAccountant:
        kind = DDPAccountant if self.cfg.ddp else ClientAccountant
        return kind.from_state(self.state.get("accountant", {}))

    def ddp_plan(self) -> DDPPlan:
        """The run's public ``ddp+he`` plan (:func:`~carbonfed.federation.client.ddp_layout.ddp_plan`)."""
        return ddp_layout.ddp_plan(self.cfg, len(self.dataset.features), len(self.dataset.classes),
                                   len(self.partition.train))

    def _save_accountant(self, acc: ClientAccountant) -> None:
        self.state["accountant"] = acc.state_dict()

    def epsilon(self) -> float:
        """ε of the accountant's history at the run's δ, kept in the state with the steps the
        history composes (ε is a pure function of the history, and every charge adds steps)."""
        acc = self.accountant
        known = self.state.get("epsilon")
        if known and known[0] == acc.total_steps():
            return float(known[1])
        eps = acc.epsilon(self.cfg.delta)
        dict.__setitem__(self.state, "epsilon", [acc.total_steps(), eps])
        return eps

    def stats_mechanism(self) -> list[tuple[float, float, int]]:
        """The planned statistics releases: one unsubsampled Gaussian step per stage."""
        s = self.cfg.stats_sigma       # 0 without DP or with exact statistics
        return [(s, 1.0, 1)] * self.cfg.stats_releases if s > 0 else []

    def _charge_release(self, stage: int) -> None:
        """Charge statistics stage ``stage`` (1, 2 or 3) to the accountant, before it is made."""
        if self.cfg.dp:
            self.noise_multiplier()
            acc = self.accountant
            plan = self.stats_mechanism()
            if self.cfg.ddp and self.cfg.stats_sigma > 0:
                acc.add(self.layouts.stages[stage - 1].release)   # its share's central mechanism
            elif stage <= len(plan) and not self.cfg.ddp:
                acc.add(*plan[stage - 1])
            self._save_accountant(acc)

    def noise_multiplier(self) -> float:
        """Calibrated once for the whole planned run, then kept in the state (``ddp+he``: the
        plan's central noise multiplier)."""
        if self.cfg.ddp:
            return float(self.ddp_plan().noise_multiplier)
        if "noise_multiplier" not in self.state:
            q, steps = planned_mechanism(self.settings)
            self.state["noise_multiplier"] = calibrate_noise(
                self.cfg.epsilon, self.cfg.delta, q, steps * self.cfg.rounds, prior=self.stats_mechanism())
        return float(self.state["noise_multiplier"])

    # -- requests --------------------------------------------------------------------------
    def setup(self) -> dict:
        """Role, key fingerprint and (training clients) the encrypted noisy statistics."""
        out = {"role": self.role, "country": self.country, "fingerprint": self.fingerprint, "stats": None}
        if self.role != "train":
            return out
        if self.state.get(released_flag(1)):
            raise RuntimeError(f"{self.country} already released its statistics in this run; "
                               "a second release would spend more privacy budget")
        self._charge_release(1)
        if self.cfg.dp:
            out["noise_multiplier"] = self.noise_multiplier()
        out["stats"] = make_cipher(self.cfg, self.ctx, self.layouts.stats.length).encrypt(self._tagged(
            self.layouts.stats.pack(self.x, self.y, self.noise_source("stats", self.country)), stage_key(1), 0))
        self.state[released_flag(1)] = True
        return out

    def refine(self, stats: list[tuple[bytes, int]], parts: dict | None = None) -> dict:
        """The next statistics stage, k = len(stats) + 1 (2 or 3), measured with the scaler made
        from the aggregates of stages 1..k-1 in ``stats`` (``parts["stats"]``: their contributions,
        :meth:`_opened`); the reply's key is ``stage_key(k)``."""
        stage = len(stats) + 1
        if self.role != "train":
            raise RuntimeError(f"{self.country} is an evaluation client: it releases no statistics")
        if not 2 <= stage <= len(self.layouts.stages):
            raise RuntimeError(f"this run has no statistics stage {stage} (it makes "
                               f"{len(self.layouts.stages)}: stats-stages={self.cfg.stats_stages}, DP noise on or off)")
        done = [k for k in range(1, stage) if not self.state.get(released_flag(k))]
        if done:
            raise RuntimeError(f"{self.country} has no record of its stage-{done[0]} statistics release; "
                               f"refusing stage {stage}")
        if self.state.get(released_flag(stage)):
            raise RuntimeError(f"{self.country} already released its stage-{stage} statistics in this run; "
                               "another release would spend more privacy budget")
        self._check_terms(None, stats)
        prev = self._standardizer(stats, parts)
        self._charge_release(stage)
        lay = self.layouts.stages[stage - 1]
        data = make_cipher(self.cfg, self.ctx, lay.length).encrypt(self._tagged(
            lay.pack(self.x, prev, self.noise_source(stage_key(stage), self.country)), stage_key(stage), 0))
        self.state[released_flag(stage)] = True
        return {stage_key(stage): data, "noise_multiplier": self.noise_multiplier()}

    def opened_model(self, model_bytes: bytes, model_terms: int, parts: dict | None) -> np.ndarray:
        """The decrypted model aggregate, checked against ``parts["model"]``."""
        vec = make_cipher(self.cfg, self.ctx, self.layouts.update.length).decrypt(model_bytes)
        return self._opened("the global model", vec, (parts or {}).get("model"), model_terms)

    def seal(self, vec: np.ndarray, kind: str, rnd: int) -> bytes:
        """``vec`` tagged as this client's ``kind`` of round ``rnd`` and encrypted."""
        return make_cipher(self.cfg, self.ctx, len(vec)).encrypt(self._tagged(vec, kind, rnd))

    def _global_model(self, model_bytes: bytes | None, model_terms: int, scaler, parts: dict | None = None):
        """The decrypted global model (checked against ``parts["model"]``), or before round 1 the
        public initial model: the run's seed, the output bias at the log class frequencies that
        statistics stage 1 released."""
        model = build_model(len(self.dataset.features), len(self.dataset.classes), self.cfg.hidden_sizes, self.cfg.seed,
                            class_counts=scaler.class_counts)
        if model_bytes is not None:
            params, _ = self.layouts.update.unpack_sum(self.opened_model(model_bytes, model_terms, parts), model_terms)
            load_flat_params(model, params)
        return model

    def _standardizer(self, stats: list[tuple[bytes, int]], parts: dict | None = None):
        """The scaler from the statistics aggregates ``[(stage 1, terms), (stage 2, terms), ...]``:
        all the run's stages, or (:meth:`refine`) the stages before the one being released; each
        checked against its contributions in ``parts["stats"]`` (once per process: :mod:`.scaler_cache`)."""
        lays = self.layouts.stages
        if len(stats) > len(lays):
            raise ValueError(f"{len(stats)} statistics aggregates came with the request; this run makes {len(lays)}")
        named = list((parts or {}).get("stats") or [None] * len(stats))
        return scaler_cache.scaler(scaler_cache.scaler_key(self, stats, named), lambda: self.layouts.scaler([
            (self._opened(f"the stage-{k} statistics", make_cipher(self.cfg, self.ctx, lay.length).decrypt(data),
                          [named[k - 1]] if k <= len(named) and named[k - 1] else None, terms), terms)
            for k, (lay, (data, terms)) in enumerate(zip(lays, stats), 1)]))

    def _scaler(self, stats: list[tuple[bytes, int]], parts: dict | None = None):
        """The run's final scaler: every stage's aggregate must have come with the request."""
        if len(stats) < len(self.layouts.stages):
            raise ValueError(f"this run makes {len(self.layouts.stages)} statistics stages, but only "
                             f"{len(stats)} aggregate(s) came with the request")
        return self._standardizer(stats, parts)

    def noise_source(self, *purpose) -> NoiseSource:
        """The randomness of one release: with DP, ChaCha20 keyed from OS entropy unless the run
        asked for reproducible noise; otherwise (and then) keyed from the public seed and ``purpose``."""
        if self.cfg.dp and not self.cfg.reproducible_noise:
            return NoiseSource.from_os_entropy()
        return NoiseSource.derived(self.cfg.seed, *purpose)

    def train(self, server_round: int, model_bytes: bytes | None, model_terms: int,
              stats: list[tuple[bytes, int]], parts: dict | None = None) -> dict:
        """Train one round; returns the encrypted update and the ledger facts of this round
        (``parts``: the contributions of the aggregates received, ``{"model": [...], "stats": [...]}``).

        With DP on, the round's mechanism is charged to the accountant (in ``state``) *before*
        training starts: whatever fails afterwards, the spend is never forgotten.
        """
        if self.cfg.ddp:
            return ddp.train_round(self, server_round, model_bytes, model_terms, stats, parts)
        torch.set_num_threads(1)
        self._check_terms(model_terms if model_bytes is not None else None, stats)
        # the aggregates received are opened (and checked) before anything is charged
        scaler = self._scaler(stats, parts)
        model = self._global_model(model_bytes, model_terms, scaler, parts)
        q, steps = planned_mechanism(self.settings)
        facts = {"sample_rate": q, "steps": steps}
        settings = self.settings
        if self.cfg.dp:
            sigma = self.noise_multiplier()
            acc = self.accountant
            eps_before = self.epsilon()
            eps_after = acc.epsilon_after(sigma, q, steps, self.cfg.delta)
            facts.update(noise_multiplier=sigma, epsilon_before=eps_before)
            if eps_after > self.cfg.epsilon:
                raise BudgetExceeded(
                    f"{self.country}: round {server_round} would raise ε from {eps_before:.4f} to "
                    f"{eps_after:.4f}, above the budget ε={self.cfg.epsilon} at δ={self.cfg.delta}; refusing to train")
            acc.add(sigma, q, steps)
            dict.__setitem__(self.state, "epsilon", [acc.total_steps(), eps_after])   # written with the charge
            self._save_accountant(acc)
            facts.update(epsilon=eps_after, total_steps=acc.total_steps())
            settings = settings.with_noise(sigma)
        settings = settings.with_class_weights(tuple(scaler.class_weights(self.cfg.class_weight_power)))
        outcome = train_local(model, scaler.apply(self.x), self.y, settings, self.noise_source("train", self.country,
                              server_round), canaries := audit_canaries(self.cfg.out_dir, self.country, server_round))
        params = flatten_params(model)
        if self.fault == "nan":
            params = nan_params(params)
        if not np.all(np.isfinite(params)):
            raise ValueError(f"{self.country}: local training produced NaN/inf parameters; update withheld")
        rng = np.random.default_rng(_seed(self.cfg.seed, "encode", self.country, server_round))
        vec, clipped = self.layouts.update.pack(params, len(self.y), rng)
        vec = self._tagged(vec, "update", server_round)
        facts.update(steps=outcome.steps, clipped_params=clipped)
        if self.fault == "wrong-length":
            vec = vec[:-1]
        update = canaries.capture(make_cipher(self.cfg, self.ctx, len(vec)).encrypt(vec))
        if self.fault == "corrupt":
            update = corrupt(update)
        return {"update": update, "facts": facts}

    def _check_terms(self, model_terms: int | None, stats: list[tuple[bytes, int]]) -> None:
        """An aggregate of fewer than min-train-clients terms could be one client's own data."""
        counts = [("model", model_terms)] + [("statistics", t) for _, t in stats]
        floor = self.cfg.release_floor(len(self.partition.train))
        low = [(k, v) for k, v in counts if v is not None and v < floor]
        if low:
            what = "min-noise-clients" if self.cfg.ddp else "min-train-clients"
            raise ValueError(f"refusing an aggregate of {low[0][1]} {low[0][0]} contributions "
                             f"(< {what}={floor}): it could expose single clients")

    def evaluate(self, model_bytes: bytes | None, model_terms: int, stats: list[tuple[bytes, int]],
                 rnd: int = 0, parts: dict | None = None) -> bytes:
        """Encrypted confusion matrix (true class × predicted class) of the global model here,
        tagged as round ``rnd``'s metrics."""
        torch.set_num_threads(1)
        self._check_terms(model_terms if model_bytes is not None else None, stats)
        scaler = self._scaler(stats, parts)
        model = self._global_model(model_bytes, model_terms, scaler, parts).eval()
        with torch.no_grad():
            pred = model(torch.from_numpy(scaler.apply(self.x))).argmax(1).numpy()
        k = len(self.dataset.classes)
        cm = np.zeros((k, k), dtype=np.int64)
        np.add.at(cm, (self.y, pred), 1)
        return make_cipher(self.cfg, self.ctx, self.layouts.metrics.length).encrypt(
            self._tagged(self.layouts.metrics.pack(cm), "metrics", rnd))

"""A federation of masking clients and one server, in process, for the mask tests.

Every client is a real :class:`~carbonfed.privacy.mask_client.MaskingClient` with its own Ed25519
key; uploads are real TenSEAL BFV ciphertexts of packed update vectors; the server is a real
:class:`~carbonfed.privacy.mask_recovery.RoundRecovery` that sums ciphertexts under the public
context. ``Drops`` says who vanishes at which step; ``tamper`` lets a test replace one client's
reply by a forged or replayed one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from carbonfed.privacy.fixed_point import FixedPointCodec
from carbonfed.privacy.mask_client import MaskingClient, MaskRefusal
from carbonfed.privacy.mask_adverts import read_adverts
from carbonfed.privacy.mask_recovery import RoundRecovery
from carbonfed.privacy.mask_wire import seal
from carbonfed.privacy.masks import MaskPlan, centred, plan_masks, unmask_sum
from carbonfed.privacy.packing import UpdateLayout
from carbonfed.privacy.secure_sum import SecureSum
from carbonfed.privacy.signing import new_signing_key, public_hex

N_PARAMS = 110                      # 1 count + 110 parameters + 1 check slot = 112 slots


def layout(modulus: int, clients: int) -> UpdateLayout:
    return UpdateLayout(n_params=N_PARAMS, max_client_samples=500,
                        codec=FixedPointCodec(plain_modulus=modulus, clip=1.0, max_terms=clients + 1))


@dataclass
class Federation:
    run: str
    plan: MaskPlan
    modulus: int
    length: int
    clients: dict[str, MaskingClient]
    signing: dict
    public_keys: dict[str, str]
    adverts: list[bytes]
    members: set
    seen_commits: set = field(default_factory=set)

    @property
    def names(self) -> list[str]:
        return sorted(self.clients)


def federation(n: int, modulus: int, length: int, plan: MaskPlan | None = None, run: str = "run-1") -> Federation:
    names = [f"c{i:03d}" for i in range(n)]
    plan = plan or plan_masks(n)
    signing = {c: new_signing_key() for c in names}
    public = {c: public_hex(k) for c, k in signing.items()}
    clients = {c: MaskingClient(c, signing[c], run, names, plan, modulus) for c in names}
    adverts = [cl.advert() for cl in clients.values()]
    for cl in clients.values():
        assert cl.accept_adverts(adverts, public) == []
    members, rejected = read_adverts(dict(zip(names, adverts)), run, public)     # the server, once per run
    assert rejected == []
    return Federation(run, plan, modulus, length, clients, signing, public, adverts, set(members))


def updates(fed: Federation, seed: int) -> dict[str, np.ndarray]:
    """One packed update vector per client (random parameters in the clip range)."""
    rng = np.random.default_rng(seed)
    lay = layout(fed.modulus, len(fed.clients))
    return {c: lay.pack(rng.uniform(-1, 1, N_PARAMS), int(rng.integers(1, 500)), rng)[0] for c in fed.names}


def reseal(fed: Federation, client: str, kind: str, rnd: int, payload: bytes, answers: str = "",
           claimed: str | None = None) -> bytes:
    """A message with ``payload`` signed by ``client``'s own key (naming ``claimed`` if given)."""
    return seal(fed.signing[client], kind, fed.run, rnd, claimed or client, payload, answers)


def payload_of(data: bytes) -> bytes:
    n = int.from_bytes(data[:2], "little")
    return data[2 + n:-64]


@dataclass
class Drops:
    before_share: tuple = ()
    before_upload: tuple = ()
    after_upload: tuple = ()          # uploaded, then gone before the seeds step
    in_keys: tuple = ()               # up for the seeds step, gone for the keys step


@dataclass
class Outcome:
    recovery: RoundRecovery
    ciphertexts: dict[str, bytes]
    unmasked: bytes | None
    summed: list[str]


def _step(fed, rnd, tamper, step, client, default):
    return tamper(step, client, default) if tamper else default


def share_and_upload(fed, rnd, xs, cipher, drops: Drops, tamper=None) -> tuple[RoundRecovery, dict[str, bytes]]:
    rec = RoundRecovery(fed.plan, fed.run, rnd, fed.names, fed.public_keys, fed.members, fed.modulus,
                        fed.seen_commits)
    for c in fed.names:
        if c not in drops.before_share:
            rec.add_bundle(_step(fed, rnd, tamper, "bundle", c, fed.clients[c].share(rnd)), sender=c)
    shared = rec.shared()
    cts = {}
    for c in shared:
        if c not in drops.before_upload:
            try:
                cts[c] = cipher.encrypt(fed.clients[c].mask(rnd, xs[c], shared))
            except MaskRefusal:
                pass
    return rec, cts


def recover(fed, rnd, rec: RoundRecovery, cts, drops: Drops, tamper=None) -> list[str]:
    """Seeds and keys steps; returns the summed clients (raises RoundAbandoned)."""
    rec.start_recovery(cts)
    gone = set(drops.after_upload)
    while due := rec.seeds_due():
        for j in due:
            if j in gone:
                rec.drop(j)
                continue
            try:
                reply = fed.clients[j].reveal_seeds(rnd, rec.summed())
            except MaskRefusal as exc:
                rec.drop(j, f"refused: {exc}")
                continue
            rec.add_seeds(_step(fed, rnd, tamper, "seeds", j, reply), sender=j)
    rec.start_keys()
    gone |= set(drops.in_keys) | set(drops.before_share)
    for h in fed.names:
        if h not in gone and h not in drops.before_upload:
            reply = fed.clients[h].reveal_keys(rnd, rec.summed())
            rec.add_keys(_step(fed, rnd, tamper, "keys", h, reply), sender=h)
    return rec.summed()


def run_round(fed, rnd, xs, cipher, public_cipher, drops: Drops = Drops(), tamper=None) -> Outcome:
    rec, cts = share_and_upload(fed, rnd, xs, cipher, drops, tamper)
    summed = recover(fed, rnd, rec, cts, drops, tamper)
    total = SecureSum(public_cipher)
    for c in summed:
        total.add(cts[c])
    return Outcome(rec, cts, unmask_sum(public_cipher, total.serialize(), rec.correction(fed.length)), summed)


def plain_sum(xs: dict[str, np.ndarray], names, modulus: int) -> np.ndarray:
    return centred(np.sum([xs[c] for c in names], axis=0), modulus)



def _timed(fn, *args):
    t0 = time.process_time()
    out = fn(*args)
    return out, time.process_time() - t0


def measure(fed: Federation, rnd: int, xs, cipher, public_cipher, dropped: tuple) -> dict:
    """Bytes per client and CPU seconds of one round in which ``dropped`` vanish after uploading,
    step by step: what the clients add to today's round and what the server adds."""
    per_client, server, size = {"share": 0.0, "mask": 0.0, "encrypt": 0.0, "seeds": 0.0, "keys": 0.0}, {}, {}
    rec = RoundRecovery(fed.plan, fed.run, rnd, fed.names, fed.public_keys, fed.members, fed.modulus,
                        fed.seen_commits)
    bundles = {}
    for c in fed.names:
        bundles[c], dt = _timed(fed.clients[c].share, rnd)
        per_client["share"] += dt
    _, server["bundles"] = _timed(lambda: [rec.add_bundle(b, sender=c) for c, b in bundles.items()])
    shared, cts, plain_cts = rec.shared(), {}, {}
    for c in shared:
        masked, dt = _timed(fed.clients[c].mask, rnd, xs[c], shared)
        per_client["mask"] += dt
        cts[c], dt = _timed(cipher.encrypt, masked)
        per_client["encrypt"] += dt
        plain_cts[c] = cipher.encrypt(xs[c])
    rec.start_recovery(cts)
    for j in dropped:
        rec.drop(j)
    seeds = {}
    for j in rec.seeds_due():
        seeds[j], dt = _timed(fed.clients[j].reveal_seeds, rnd, rec.summed())
        per_client["seeds"] += dt
    _, server["seeds"] = _timed(lambda: [rec.add_seeds(d, sender=j) for j, d in seeds.items()])
    rec.start_keys()
    keys = {}
    for h in rec.summed():
        keys[h], dt = _timed(fed.clients[h].reveal_keys, rnd, rec.summed())
        per_client["keys"] += dt
    _, server["keys"] = _timed(lambda: [rec.add_keys(d, sender=h) for h, d in keys.items()])
    correction, server["correction"] = _timed(rec.correction, fed.length)
    total = SecureSum(public_cipher)
    for c in rec.summed():
        total.add(cts[c])
    unmasked, server["unmask"] = _timed(unmask_sum, public_cipher, total.serialize(), correction)
    n = len(fed.names)
    size.update(advert=float(np.mean([len(a) for a in fed.adverts])),
                bundle=float(np.mean([len(b) for b in bundles.values()])),
                seeds=float(np.mean([len(b) for b in seeds.values()])),
                keys=float(np.mean([len(b) for b in keys.values()])),
                ciphertext_masked=float(np.mean([len(b) for b in cts.values()])),
                ciphertext_plain=float(np.mean([len(b) for b in plain_cts.values()])))
    return {"bytes": size, "client_cpu_s": {k: v / n for k, v in per_client.items()}, "server_cpu_s": server,
            "summed": rec.summed(), "unmasked": unmasked}


def agreement_cpu(fed: Federation) -> tuple[float, float]:
    """CPU seconds of the per-run key agreement: one client (check adverts, derive pair keys), and
    the server (check adverts)."""
    name = fed.names[0]
    cl = MaskingClient(name, fed.signing[name], fed.run, fed.names, fed.plan, fed.modulus)
    return (_timed(cl.accept_adverts, fed.adverts, fed.public_keys)[1],
            _timed(read_adverts, fed.adverts, fed.run, fed.public_keys)[1])

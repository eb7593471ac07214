"""``ddp+he`` clients on the real seed data under real BFV keys (federation/client/ddp*.py): the
server's ciphertext sum decrypts to the exact sum of the integer uploads, the key holders agree
on the next model and its optimizer state, an aggregate below the noise floor is refused before
anything is charged, and the statistics shares sum to the variance the accountant charges."""

from __future__ import annotations

import numpy as np
import pytest

from carbonfed.data import split_countries
from carbonfed.federation.client.ddp_layout import ShareStage, stage_bases
from carbonfed.federation.client.participant import Participant, make_cipher
from carbonfed.federation.config import RunConfig
from carbonfed.federation.wire import stage_key
from carbonfed.privacy.distributed_dp import release
from carbonfed.privacy.he import SECRET_CONTEXT_FILE, load_secret_context
from carbonfed.privacy.packing import strip_checks
from carbonfed.privacy.randomness import NoiseSource
from carbonfed.privacy.secure_sum import SecureSum

N = 4   # training clients taking part here (of the seed data's training countries)


@pytest.fixture
def ring(seed_data, keys_dir):
    cfg = RunConfig(privacy="ddp+he", rounds=3, min_noise_clients=3, keys_dir=str(keys_dir), reproducible_noise=True)
    part = split_countries(seed_data.countries(), 0)
    ctx = load_secret_context(keys_dir / SECRET_CONTEXT_FILE)
    ps = [Participant(cfg, seed_data, part, c, ctx) for c in part.train[:N]]
    return cfg, ctx, ps


def _sum(cfg, ctx, length, blobs):
    total = SecureSum(make_cipher(cfg, ctx, length))
    for b in blobs:
        total.add(b)
    return total.serialize(), total.terms


def _stats(cfg, ctx, ps):
    agg = [_sum(cfg, ctx, ps[0].layouts.stats.length, [p.setup()["stats"] for p in ps])]
    for k, lay in enumerate(ps[0].layouts.stages[1:], 2):
        agg.append(_sum(cfg, ctx, lay.length, [p.refine(agg)[stage_key(k)] for p in ps]))
    return agg


def test_sums_are_exact_and_the_key_holders_agree_on_the_next_model(ring):
    cfg, ctx, ps = ring
    stats = _stats(cfg, ctx, ps)
    lay, plan_ = ps[0].layouts.update, ps[0].ddp_plan()
    cipher = make_cipher(cfg, ctx, lay.length)
    ups = [p.train(1, None, 0, stats)["update"] for p in ps]
    own = [strip_checks(cipher.decrypt(u), 1, "upload") for u in ups]   # what the server cannot do
    agg, terms = _sum(cfg, ctx, lay.length, ups)
    total = strip_checks(cipher.decrypt(agg), N, "aggregate")
    t = plan_.plain_modulus
    assert np.array_equal(np.mod(total, t), np.mod(np.sum(own, axis=0), t))         # exact modulo t
    state, steps, gsum = lay.unpack_state(cipher.decrypt(agg), terms)
    assert steps == 0
    w0 = own[0][2:2 + lay.n_params]
    assert all(np.array_equal(o[:2 + 3 * lay.n_params], own[0][:2 + 3 * lay.n_params]) for o in own)  # one state
    assert np.allclose(state[:lay.n_params], lay.codec.decode(w0))
    assert np.array_equal(release(plan_, gsum, N) * plan_.scale, np.sum([o[2 + 3 * lay.n_params:] for o in own], 0))
    nxt = [p.train(2, agg, terms, stats)["update"] for p in ps]
    states = [strip_checks(cipher.decrypt(u), 1, "upload")[:2 + 3 * lay.n_params] for u in nxt]
    assert all(np.array_equal(s, states[0]) for s in states) and states[0][1] == 1     # same step, same state
    assert not np.array_equal(states[0][2:2 + lay.n_params], w0)                       # the model moved
    assert ps[0].epsilon() <= cfg.epsilon


def test_an_aggregate_below_the_noise_floor_is_not_decrypted(ring):
    cfg, ctx, ps = ring
    stats = _stats(cfg, ctx, ps)
    lay = ps[0].layouts.update
    ups = [p.train(1, None, 0, stats)["update"] for p in ps[:2]]
    agg, terms = _sum(cfg, ctx, lay.length, ups)
    before = dict(ps[3].state.get("accountant", {}))
    with pytest.raises(ValueError, match="min-noise-clients=3"):
        ps[3].train(2, agg, terms, stats)
    assert ps[3].state.get("accountant", {}) == before                 # nothing charged


def test_statistics_shares_sum_to_the_variance_the_accountant_charges(seed_data):
    """40 draws of the sum of 10 clients' shares of stage 1 (one row each): the sample variance
    of the noise is within 6 % of the plan's (a 10 % error fails: ~2000 samples, sd ≈ 3 %)."""
    cfg = RunConfig(privacy="ddp+he", min_noise_clients=10)
    base = stage_bases(cfg, 21, 5, 1.0)[0]
    stage = ShareStage(base, 20.0, 10, 100)
    x, y = seed_data.client_arrays(seed_data.countries()[0])
    exact = base.local_sums(x[:1], y[:1]) * stage.scale
    noise = []
    for draw in range(40):
        total = sum(strip_checks(stage.pack(x[:1], y[:1], NoiseSource.derived("t", draw, i)), 1, "s").astype(float)
                    for i in range(10))
        noise.append(total - 10 * exact)
    var = np.var(np.concatenate(noise))
    assert abs(var / (10 * stage.share_variance) - 1) < 0.06
    assert abs(stage.release.variance - 10 * stage.share_variance) < 1e-6 * stage.release.variance

"""The run's HE keys (federation/keys.py): the ring each run makes keys of, the server's refusal of
keys that cannot sum the run exactly, ``carbonfed keygen`` with run options, and the
foreign-key drill on the run's ring. Real SEAL/TenSEAL keys, real seed data."""

from dataclasses import replace

import numpy as np
import pytest

from carbonfed.data import split_countries
from carbonfed.federation.cli import main as cli_main
from carbonfed.federation.client.participant import Layouts, Participant
from carbonfed.federation.config import RunConfig
from carbonfed.federation.keys import he_params_for, he_requirement, keygen_for
from carbonfed.federation.server.app import build_strategy
from carbonfed.privacy.he import (BFVCipher, HEParams, key_fingerprint, keygen, load_public_context, load_secret_context,
                                  params_of)
from carbonfed.privacy.he_ring import exact_terms, ring_for
from carbonfed.privacy.secure_sum import SecureSum

MAIN = RunConfig(privacy="he", hidden="linear", stats_stages=3, average_last=10)   # the seed main job
MLP = RunConfig(privacy="he", hidden="32,16", stats_stages=2, average_last=1)       # the seed project's MLP


def test_main_job_ring_is_2048_with_one_prime():
    # 110 parameters + sample count + check slot; 256 clients per round x the last 10 rounds' models
    assert he_requirement(MAIN) == (112, 2560)
    assert he_params_for(MAIN) == HEParams(2048, (51,), 32)
    assert exact_terms(he_params_for(MAIN)) >= 2560 > exact_terms(HEParams(2048, (50,), 32))
    assert he_params_for(MAIN).security_bits() >= 128


def test_a_shared_key_pair_holds_the_largest_requirement():
    """A sweep's one key pair: the longest vector of one job and the most terms of another."""
    assert he_requirement(MLP) == (1319, 256)
    assert he_requirement([MAIN, MLP]) == (1319, 2560)
    assert he_params_for([MLP, MAIN]) == ring_for(1319, 2560)
    big = RunConfig(privacy="he", hidden="64,64", average_last=2)      # 5,829 parameters: 4096-slot ciphertexts
    assert he_params_for([MAIN, big]).poly_modulus_degree == 4096
    with pytest.raises(ValueError, match="no run config"):
        he_params_for([])


def test_server_refuses_keys_that_cannot_sum_the_run(tmp_path):
    """Keys sized for the MLP job (256 terms) cannot hold the main job's model average of 2560
    terms: build_strategy refuses them with one line that names the problem; the run's own keys
    and the default keys pass."""
    small = tmp_path / "small"
    keygen(small, he_params_for(MLP))
    cfg = replace(MAIN, keys_dir=str(small))
    with pytest.raises(ValueError, match="exact sums of at most .* terms, the run needs 2560") as err:
        build_strategy(cfg, tmp_path / "out-small")
    assert "\n" not in str(err.value)
    for name, make in (("own", lambda d: keygen_for(MAIN, d)), ("default", keygen)):
        make(tmp_path / name)
        _, ctx = build_strategy(replace(MAIN, keys_dir=str(tmp_path / name)), tmp_path / f"out-{name}")
        assert not ctx.has_secret_key()


def test_keygen_command_makes_the_ring_of_the_job_given(tmp_path, capsys):
    assert cli_main(["keygen", "--out", str(tmp_path / "mlp"), "--hidden", "32,16", "--stats-stages", "2",
                     "--average-last", "1"]) == 0
    assert params_of(load_public_context(tmp_path / "mlp" / "public.ctx")) == he_params_for(MLP)
    assert "N=2048" in capsys.readouterr().out
    assert cli_main(["keygen", "--out", str(tmp_path / "default")]) == 0       # the default job
    assert params_of(load_public_context(tmp_path / "default" / "public.ctx")) == he_params_for(RunConfig())


def test_foreign_key_drill_uses_the_run_ring_and_another_key(tmp_path, seed_data):
    secret, _ = keygen_for(MAIN, tmp_path / "k")
    ctx = load_secret_context(secret)
    cfg = replace(MAIN, keys_dir=str(tmp_path / "k"))
    part = split_countries(seed_data.countries())
    country = part.train[0]
    drilled = Participant(replace(cfg, fault_drill=f"{country}:foreign-key"), seed_data, part, country, ctx=ctx)
    assert params_of(drilled.ctx) == params_of(ctx) == he_params_for(MAIN)
    assert drilled.fingerprint != key_fingerprint(ctx)
    assert drilled.layouts == Layouts.for_run(cfg, 21, 5)


def test_main_job_upload_fits_32_kB(tmp_path):
    """One training upload of the main job under its own ring: one seeded ciphertext of degree
    2048, about 15 kB (62.0 kB before issue 21)."""
    secret, public = keygen_for(MAIN, tmp_path / "k")
    lay = Layouts.for_run(MAIN, 21, 5).update
    vec, _ = lay.pack(np.random.default_rng(0).uniform(-8, 8, 110), 40, np.random.default_rng(1))
    upload = BFVCipher(load_secret_context(secret), lay.length).encrypt(vec)
    assert 10_000 < len(upload) <= 32_000
    total = SecureSum(BFVCipher(load_public_context(public), lay.length))
    total.add(upload)
    assert np.array_equal(BFVCipher(load_secret_context(secret), lay.length).decrypt(total.serialize()), vec)

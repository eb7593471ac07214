"""A training client's part of the masks (issue 22) as the ClientApp runs it: rebuilt at every
message from its durable state (carbonfed.federation.client.masking), with real Participants,
real Ed25519/X25519 keys under a real sealed charter, and the real server-side RoundRecovery."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from carbonfed.data import split_countries
from carbonfed.data.example import write_example_csv
from carbonfed.federation.client import masking
from carbonfed.federation.client.participant import Participant
from carbonfed.federation.client.signer import Signer
from carbonfed.federation.client.state import PersistentState
from carbonfed.federation.config import RunConfig
from carbonfed.federation.run_data import load_run_data, with_data_schema
from carbonfed.privacy.mask_streams import stream_plan, stream_roster
from carbonfed.privacy.charter import Charter, seal_charter
from carbonfed.privacy.he import HEParams
from carbonfed.privacy.mask_client import MaskRefusal
from carbonfed.privacy.mask_adverts import read_adverts
from carbonfed.privacy.mask_recovery import RoundRecovery
from carbonfed.privacy.masks import centred, plan_masks
from carbonfed.privacy.signing import new_signing_key


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    return _federation(tmp_path_factory.mktemp("mask-client"))


def _federation(folder):
    """(config, data, partition, charter, {country: (signing key, durable state file)}) of a 9-party CSV run."""
    cfg = with_data_schema(RunConfig(dataset="csv", data=str(write_example_csv(folder / "t.csv", parties=9)),
                                     client_col="site", label_col="level", privacy="he", rounds=3, masks=True))
    ds = load_run_data(cfg)
    part = split_countries(ds.countries(), cfg.holdout_offset)
    keys = {c: new_signing_key() for c in ds.countries()}
    roles = {c: part.role(c) for c in ds.countries()}
    charter = Charter.from_body(seal_charter(cfg.to_flower(), keys, roles)["charter"])
    return cfg, ds, part, charter, {c: (keys[c], folder / f"{c}.json") for c in keys}


def participant(federation, country: str, fault: str = "") -> Participant:
    """The client as one message sees it: everything rebuilt, its state read from its file
    (``fault``: the drill a ``fault-drill`` entry would give it)."""
    cfg, ds, part, charter, keys = federation
    key, path = keys[country]
    state = PersistentState(json.loads(path.read_text()) if path.exists() else {}, path)
    signer = Signer(charter, country, key, b"\0" * 32, HEParams().plain_modulus)
    p = Participant(cfg, ds, part, country, None, state, "fingerprint", signer=signer)
    p.fault = fault or p.fault
    return p


def step(federation, country: str, fault: str = "", **config) -> dict:
    """One ``query.masks`` message: the answer, and the state written as the ClientApp's reply writes it."""
    p = participant(federation, country, fault)
    out = masking.answer(p, config)
    p.state.flush()
    return out


def arm(p: Participant, shared: list[str], rnd: int) -> None:
    masking.arm(p, {"mask-shared": json.dumps(shared)}, rnd)
    p.state.flush()                    # the training reply writes it


def _shared_round(federation, faults: dict) -> tuple[RoundRecovery, list[str]]:
    """Adverts, then round 1's bundles (drills in ``faults``) into a real RoundRecovery."""
    charter, roster = federation[3], stream_roster(federation[3], "update")
    adverts = {c: step(federation, c, **{"mask-step": "advert"})["mask-advert"] for c in roster}
    members, _ = read_adverts(adverts, charter.sha256, charter.keys)
    share = {"mask-step": "share", "mask-round": 1, "mask-senders": json.dumps(roster),
             "mask-adverts": [adverts[c] for c in roster]}
    rec = RoundRecovery(plan_masks(len(roster)), charter.sha256, 1, roster, charter.keys, members,
                        HEParams().plain_modulus)
    for c in roster:
        rec.add_bundle(step(federation, c, faults.get(c, ""), **share)["mask-bundle"], sender=c)
    return rec, roster


def test_a_round_through_the_messages_sums_exactly(federation):
    cfg, _, _, charter, _ = federation
    roster, t = stream_roster(charter, "update"), HEParams().plain_modulus
    adverts = {c: step(federation, c, **{"mask-step": "advert"})["mask-advert"] for c in roster}
    assert adverts == {c: step(federation, c, **{"mask-step": "advert"})["mask-advert"] for c in roster}  # derived
    members, rejected = read_adverts(adverts, charter.sha256, charter.keys)
    assert rejected == [] and sorted(members) == roster
    share = {"mask-step": "share", "mask-round": 1, "mask-senders": json.dumps(roster),
             "mask-adverts": [adverts[c] for c in roster]}
    bundles = {c: step(federation, c, **share)["mask-bundle"] for c in roster}
    assert bundles == {c: step(federation, c, **share)["mask-bundle"] for c in roster}   # asked again: same bytes
    rec = RoundRecovery(plan_masks(len(roster)), charter.sha256, 1, roster, charter.keys, members, t)
    assert all(rec.add_bundle(b, sender=c) for c, b in bundles.items())
    rng = np.random.default_rng(0)
    xs = {c: np.concatenate([[1], rng.integers(-1000, 1000, 39)]) for c in roster}    # slot 0: the check slot
    uploads, tagged = {}, {}
    for c in roster:
        p = participant(federation, c)
        arm(p, rec.shared(), 1)
        uploads[c], tagged[c] = p._tagged(xs[c], "update", 1), p.signer.tag(xs[c], "update", 1)
        assert not np.array_equal(uploads[c], tagged[c])                          # masked
    gone = roster[0]                                                               # shared, never uploaded
    rec.start_recovery([c for c in roster if c != gone], liveness=False)
    for c in rec.seeds_due():
        reply = step(federation, c, **{"mask-step": "seeds", "mask-round": 1, "mask-summed": json.dumps(rec.summed())})
        assert rec.add_seeds(reply["mask-seeds"], sender=c)
    rec.start_keys()
    unmask = {"mask-step": "unmask", "mask-round": 1, "mask-next": 2, "mask-summed": json.dumps(rec.summed())}
    replies = {c: step(federation, c, **unmask) for c in roster}
    for c, reply in replies.items():
        rec.add_keys(reply["mask-keys"], sender=c)
        assert "mask-bundle" in reply                    # the next round's bundle rides on the same reply
    total = sum(uploads[c] for c in rec.summed()) - rec.correction(40)
    assert rec.rejections == [] and rec.summed() == roster[1:]
    np.testing.assert_array_equal(centred(total, t), centred(sum(tagged[c] for c in roster[1:]), t))


def test_the_never_both_rule_survives_a_restart(federation):
    """Rebuilt from its state at every message, a client refuses another list of who shared, the
    seeds step of a round whose share keys it revealed, and going back a round."""
    _, _, _, charter, _ = federation
    roster = stream_roster(charter, "update")
    c = roster[1]
    arm(participant(federation, c), roster[1:], 2)                    # round 2's bundle: made above
    with pytest.raises(MaskRefusal, match="another list"):
        arm(participant(federation, c), roster, 2)
    keys = step(federation, c, **{"mask-step": "unmask", "mask-round": 2, "mask-next": 0,
                                  "mask-summed": json.dumps(roster[1:])})
    assert "mask-keys" in keys and "mask-bundle" not in keys
    late = step(federation, c, **{"mask-step": "seeds", "mask-round": 2, "mask-summed": json.dumps(roster[2:])})
    assert "share keys were revealed" in late["mask-refused"] and "mask-seeds" not in late
    # round 3's bundle made before round 2 is over (as it rides on a round-2 upload): round 2 keeps its record
    ahead = masking.ahead(p := participant(federation, c), {"mask-next": 3}, "update")
    p.state.flush()
    assert "mask-bundle" in ahead
    late = step(federation, c, **{"mask-step": "seeds", "mask-round": 2, "mask-summed": json.dumps(roster[2:])})
    assert "share keys were revealed" in late["mask-refused"]
    again = step(federation, c, **{"mask-step": "unmask", "mask-round": 3, "mask-next": 3})
    assert again["mask-bundle"] == ahead["mask-bundle"]             # made again: the very same bytes
    old = step(federation, c, **{"mask-step": "unmask", "mask-round": 2, "mask-next": 1})
    assert "does not follow" in old["mask-refused"] and "mask-bundle" not in old


def test_the_neighbours_keys_lie_beside_the_state_and_a_changed_file_is_refused(federation):
    _, _, _, charter, keys = federation
    c = stream_roster(charter, "update")[3]
    path = keys[c][1]
    peers = path.with_name(f"{path.stem}.masks-peers.json")
    saved = json.loads(path.read_text())["masks"]
    assert "peers" not in saved and len(json.loads(peers.read_text())) == len(stream_roster(charter, "update")) - 1
    data = peers.read_bytes()
    masking._PAIR_KEYS.clear()                       # as a fresh process: the file is read
    try:
        peers.write_bytes(data.replace(b"0", b"1", 1))
        with pytest.raises(MaskRefusal, match="lost or changed"):
            masking.masking_client(participant(federation, c))
        peers.unlink()
        with pytest.raises(MaskRefusal, match="lost or changed"):
            masking.masking_client(participant(federation, c))
    finally:
        peers.write_bytes(data)
    assert masking.masking_client(participant(federation, c)).holders


def test_a_server_restarted_in_the_setup_gets_every_stage_bundle_again(tmp_path):
    """The statistics stream keeps all its stages: a server restarted after stage 3's bundle was made
    asks for stage 1's again and gets the same bytes (the update stream keeps two rounds: refused)."""
    fed = _federation(tmp_path)
    fed = (replace(fed[0], stats_stages=3), *fed[1:])
    roster = stream_roster(fed[3], "stats")
    adverts = {c: step(fed, c, **{"mask-step": "advert", "mask-stream": "stats"})["mask-advert"] for c in roster}
    c = roster[0]

    def share(k: int, stream: str = "stats") -> dict:
        return step(fed, c, **{"mask-step": "share", "mask-stream": stream, "mask-round": k,
                               "mask-senders": json.dumps(roster), "mask-adverts": [adverts[x] for x in roster]})
    first = [share(k)["mask-bundle"] for k in (1, 2, 3)]
    assert [share(k)["mask-bundle"] for k in (1, 2, 3)] == first
    last = {"mask-step": "unmask", "mask-stream": "stats", "mask-round": 3, "mask-next": 0}
    assert "mask-refused" not in step(fed, c, **last)
    assert fed[0].stats_releases == 3 and masking.masking_client(participant(fed, c), "stats").keep == 3


def test_an_unmasked_upload_is_never_made(federation):
    _, _, _, charter, _ = federation
    p = participant(federation, stream_roster(charter, "update")[2])
    with pytest.raises(MaskRefusal, match="names no clients"):
        masking.arm(p, {}, 3)
    with pytest.raises(MaskRefusal, match="no bundle was made for round 3"):
        masking.arm(p, {"mask-shared": json.dumps(stream_roster(charter, "update"))}, 3)


def test_masks_setting():
    assert RunConfig(privacy="he", masks=True).masked and RunConfig(privacy="ddp+he", masks=True).masked
    assert not RunConfig(privacy="he").masked and not RunConfig(privacy="dp", masks=True).masked   # opt-in; HE only
    assert RunConfig(privacy="dp", masks=True).digest() == RunConfig(privacy="dp").digest()   # no HE: no change
    assert RunConfig(privacy="he", masks=True).digest() != RunConfig(privacy="he").digest()
    assert RunConfig.from_flower({"masks": "true"}).masks is True
    with pytest.raises(ValueError, match="mask-neighbours must be 0 or an even number"):
        RunConfig(privacy="he", mask_neighbours=3)
    charter = Charter.from_body(seal_charter(RunConfig().to_flower(), {f"c{i}": new_signing_key() for i in range(131)},
                                             {f"c{i}": "train" for i in range(131)})["charter"])
    assert stream_plan(RunConfig(masks=True), charter, "update").describe()["threshold"] == 87   # complete: 130 neighbours
    assert stream_plan(RunConfig(masks=True, mask_neighbours=40), charter, "update").describe() == {
        "clients": 131, "neighbours": 40, "threshold": 27, "max_dropped": 13, "collusion_bound": 13, "graph": "circulant"}
    import argparse
    ap = argparse.ArgumentParser()
    RunConfig.add_options(ap, skip=())
    assert ap.parse_args(["--masks"]).masks is True and ap.parse_args([]).masks is None


def test_forged_bad_and_replayed_mask_messages_are_named_and_the_round_goes_on(tmp_path):
    """The drills: a bundle claiming another client's name, share keys that open nothing, a keys
    message of the round before. Each is refused with its sender named; the impostor sits the
    round out, and the others' masks still come off (enough valid shares remain)."""
    fed = _federation(tmp_path)
    roster = stream_roster(fed[3], "update")
    faults = {roster[0]: "mask-impostor", roster[1]: "mask-bad-key", roster[2]: "mask-replay"}
    rec, _ = _shared_round(fed, faults)
    assert rec.shared() == roster[1:]
    rng = np.random.default_rng(1)
    xs = {c: np.concatenate([[1], rng.integers(-99, 99, 19)]) for c in rec.shared()}
    uploads = {}
    for c in rec.shared():
        p = participant(fed, c)
        arm(p, rec.shared(), 1)
        uploads[c], xs[c] = p._tagged(xs[c], "update", 1), p.signer.tag(xs[c], "update", 1)
    rec.start_recovery(uploads, liveness=False)
    rec.start_keys()
    unmask = {"mask-step": "unmask", "mask-round": 1, "mask-next": 0, "mask-summed": json.dumps(rec.summed())}
    for c in roster:
        reply = step(fed, c, faults.get(c, ""), **unmask)
        if "mask-keys" in reply:
            rec.add_keys(reply["mask-keys"], sender=c)
    t = HEParams().plain_modulus
    total = centred(sum(uploads.values()) - rec.correction(20), t)
    np.testing.assert_array_equal(total, centred(sum(xs.values()), t))
    why = {(c, s): " | ".join(r.reason for r in rec.rejections if (r.client, r.step) == (c, s))
           for c, s in {(r.client, r.step) for r in rec.rejections}}
    assert f"claims to be {roster[1]} but is not signed by {roster[1]}'s key" in why[(roster[0], "bundle")]
    assert "does not open that share" in why[(roster[1], "keys")]
    assert "replayed: made for run" in why[(roster[2], "keys")] and "round 0" in why[(roster[2], "keys")]

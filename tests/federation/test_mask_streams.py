"""The statistics releases and the evaluation counts are masked too (issue 22): each in its own
mask stream (carbonfed.privacy.mask_streams), with real Participants, real keys under a real sealed
charter, real Flower messages and the real server-side RoundRecovery."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord

from carbonfed.federation.client import masking
from carbonfed.federation.config import RunConfig
from carbonfed.privacy.charter import Charter, seal_charter
from carbonfed.privacy.he import HEParams
from carbonfed.privacy.mask_client import MaskRefusal
from carbonfed.privacy.mask_adverts import read_adverts
from carbonfed.privacy.mask_recovery import RoundRecovery
from carbonfed.privacy.mask_streams import stream_of, stream_plan, stream_roster, stream_run
from carbonfed.privacy.masks import centred
from carbonfed.privacy.signing import new_signing_key
from test_mask_client import _federation, participant, step

T = HEParams().plain_modulus


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return _federation(tmp_path_factory.mktemp("mask-streams"))


def request(**config) -> dict:
    """A request's run config (a Flower Message needs a run's task identity to be made)."""
    return dict(ConfigRecord({"server-round": 0, **config}))


def shared_round(fed, stream: str, rnd: int) -> RoundRecovery:
    """A stream's adverts and round-``rnd`` bundles, through ``query.masks`` steps, into a RoundRecovery."""
    charter = fed[3]
    roster, run = stream_roster(charter, stream), stream_run(charter.sha256, stream)
    adverts = {c: step(fed, c, **{"mask-step": "advert", "mask-stream": stream})["mask-advert"] for c in roster}
    members, rejected = read_adverts(adverts, run, charter.keys)
    assert rejected == [] and sorted(members) == roster
    share = {"mask-step": "share", "mask-stream": stream, "mask-round": rnd, "mask-senders": json.dumps(roster),
             "mask-adverts": [adverts[c] for c in roster]}
    rec = RoundRecovery(stream_plan(fed[0], charter, stream), run, rnd, roster, charter.keys, members, T)
    for c in roster:
        assert rec.add_bundle(step(fed, c, **share)["mask-bundle"], sender=c)
    return rec


def unmasked_sum(fed, rec: RoundRecovery, stream: str, uploads: dict) -> np.ndarray:
    """The server's recovery through the clients' ``query.masks`` steps of ``stream``: the seeds step
    if anyone who shared did not upload, then the keys; the unmasked sum of ``uploads``."""
    rec.start_recovery(uploads, liveness=False)
    for c in rec.seeds_due():
        reply = step(fed, c, **{"mask-step": "seeds", "mask-stream": stream, "mask-round": rec.rnd,
                                "mask-summed": json.dumps(rec.summed())})
        assert rec.add_seeds(reply["mask-seeds"], sender=c)
    rec.start_keys()
    unmask = {"mask-step": "unmask", "mask-stream": stream, "mask-round": rec.rnd, "mask-next": 0,
              "mask-summed": json.dumps(rec.summed())}
    for c in stream_roster(fed[3], stream):
        rec.add_keys(step(fed, c, **unmask)["mask-keys"], sender=c)    # (one that did not upload still holds shares)
    return centred(sum(uploads.values()) - rec.correction(len(next(iter(uploads.values())))), T)


@pytest.mark.parametrize("kind, stage, dropped", [("stats", 1, 0), ("stats2", 2, 0), ("stats3", 3, 2)])
def test_statistics_stages_are_masked_and_sum_exactly(fed, kind, stage, dropped):
    """Every stage's uploads are masked; the sum comes off exactly, also when clients shared the
    stage and then dropped (their pair masks recovered in the stream's seeds step)."""
    rec = shared_round(fed, "stats", stage)
    rng = np.random.default_rng(stage)
    uploads, tagged = {}, {}
    for c in rec.shared()[dropped:]:
        p = participant(fed, c)
        assert masking.arm_upload(p, request(**{"mask-shared": json.dumps(rec.shared())}), kind, stage)
        x = np.concatenate([[1], rng.integers(-500, 500, 29)])
        uploads[c], tagged[c] = p._tagged(x, kind, 0), p.signer.tag(x, kind, 0)
        assert np.mean(uploads[c] != tagged[c]) > 0.9                              # masked
        assert np.array_equal(p._tagged(x, "update", 0), p.signer.tag(x, "update", 0))    # armed for its kind only
        p.state.flush()
    np.testing.assert_array_equal(unmasked_sum(fed, rec, "stats", uploads), centred(sum(tagged.values()), T))
    assert rec.summed() == rec.shared()[dropped:] and rec.dropped() == rec.shared()[:dropped]
    assert rec.rejections == []


def test_streams_are_separate(fed):
    """Another stream's label: other adverts (other keys), and a bundle of the ``stats`` stream is a
    replay in the ``update`` stream (signed for another run)."""
    charter = fed[3]
    c = stream_roster(charter, "update")[0]
    ads = {s: step(fed, c, **{"mask-step": "advert", "mask-stream": s})["mask-advert"] for s in ("update", "stats")}
    assert ads["update"] != ads["stats"]
    keys, rejected = read_adverts({c: ads["stats"]}, charter.sha256, charter.keys)
    assert keys == {} and "replayed: made for run" in rejected[0].reason
    assert [stream_of(k) for k in ("update", "stats", "stats3", "metrics")] == ["update", "stats", "stats", "metrics"]


def test_evaluation_counts_are_masked_among_the_held_out_clients(fed):
    charter = fed[3]
    held_out = stream_roster(charter, "metrics")
    assert len(held_out) >= 2 and not set(held_out) & set(stream_roster(charter, "update"))
    rec = shared_round(fed, "metrics", 1)
    uploads, tagged = {}, {}
    for i, c in enumerate(held_out):
        p = participant(fed, c)
        with pytest.raises(MaskRefusal, match="names no clients"):       # never an unmasked upload
            masking.arm_upload(p, request(), "metrics", 1)
        masking.arm_upload(p, request(**{"mask-shared": json.dumps(held_out)}), "metrics", 1)
        cm = np.concatenate([[1], np.arange(15) * (i + 1)])                       # slot 0: the check slot
        uploads[c], tagged[c] = p._tagged(cm, "metrics", 1), p.signer.tag(cm, "metrics", 1)
        assert not np.array_equal(uploads[c], tagged[c])
        p.state.flush()
    np.testing.assert_array_equal(unmasked_sum(fed, rec, "metrics", uploads), centred(sum(tagged.values()), T))
    trainer = participant(fed, stream_roster(charter, "update")[0])
    assert masking.arm_upload(trainer, request(), "metrics", 1) == ()                 # not its stream


def test_unmasked_runs_and_streams_of_one_client_are_left_alone(fed):
    c = stream_roster(fed[3], "update")[0]
    plain = participant(fed, c)
    plain.cfg = RunConfig(privacy="he")
    assert masking.arm_upload(plain, request(), "stats", 1) == ()
    one = Charter.from_body(seal_charter(RunConfig().to_flower(), {n: new_signing_key() for n in "abc"},
                                         {"a": "train", "b": "train", "c": "test"})["charter"])
    assert stream_plan(RunConfig(masks=True), one, "metrics") is None
    assert stream_plan(RunConfig(masks=True), one, "stats").threshold == 1

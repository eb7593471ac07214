"""Flower's deployment engine on loopback: real SuperLink and SuperNode processes, real TLS,
SuperNode authentication, a SuperNode killed mid-round and a server restarted mid-run.

One deployment (4 SuperNodes: 3 training, 1 held out; 3 rounds) carries both fault drills, to
keep this file within a few minutes: the SuperNode of one training country is SIGKILLed while
its ClientApp handles round 2 (it is started again after round 2, with the same key and state
folder), and the SuperLink with the ServerApp is SIGKILLed after round 2, started again on its
database, and the run submitted again: the ServerApp resumes from its round-2 checkpoint.
"""

import json
import os
import socket
import ssl
import subprocess
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

from carbonfed.federation.client.state import PersistentState, merge_states
from carbonfed.federation.config import APP_COMPONENTS, RunConfig
from carbonfed.federation.deploy.certs import make_node_key
from carbonfed.federation.deploy.deployment import Node, local_deployment
from carbonfed.federation.deploy.flower_cli import REPO, flower_bin, write_app
from carbonfed.federation.deploy.local import deploy_local
from carbonfed.federation.deploy.processes import free_port, marked_pids
from carbonfed.privacy.ledger import check_chain, read_ledger
from carbonfed.privacy.statements import line_history

pytestmark = pytest.mark.slow   # builds whole federations

ROUNDS = 3
CFG = RunConfig(privacy="dp+he", rounds=ROUNDS, local_epochs=1, batches_per_epoch=3,
                round_timeout=240.0, min_train_clients=2)


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "run"
    events: dict[str, dict] = {}
    seen: dict[str, object] = {}

    def on_event(name, info):
        events[name] = info
        if name == "started":
            seen["tls"] = _tls_facts(info["address"], info["ca"])
            seen["server_keys"] = sorted(os.listdir(info["server_keys_dir"]))
            seen["pids"] = marked_pids(info["marker"])
    t0 = time.monotonic()
    deploy_local(CFG, 4, out, kill_client_in_round=2, restart_server_after_round=2, on_event=on_event)
    seconds = time.monotonic() - t0
    leftovers = marked_pids(events["started"]["marker"])
    return out, events, seen, leftovers, seconds


def _tls_facts(address: str, ca: str) -> dict:
    host, port = address.rsplit(":", 1)
    facts = {}
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname=host) as tls:
            facts["version"] = tls.version()
            facts["san"] = tls.getpeercert().get("subjectAltName")
    try:      # the system's CAs do not know this SuperLink: verification must fail
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            with ssl.create_default_context().wrap_socket(sock, server_hostname=host):
                facts["untrusted_ok"] = True
    except ssl.SSLCertVerificationError:
        facts["untrusted_ok"] = False
    return facts


def _lines(out: Path) -> list[dict]:
    return read_ledger(out / "ledger.jsonl")


# -- (a) a SuperNode killed mid-round ----------------------------------------------------------

@pytest.mark.drill
def test_tls_and_key_split(faulty_run):
    _, _, seen, _, _ = faulty_run
    tls = seen["tls"]
    assert tls["version"] in ("TLSv1.2", "TLSv1.3") and ("IP Address", "127.0.0.1") in tls["san"]
    assert tls["untrusted_ok"] is False
    assert seen["server_keys"] == ["public.ctx"]          # the server side never gets secret.ctx
    assert len(seen["pids"]) >= 5                         # SuperLink, SuperExec, 4 SuperNodes, ...


@pytest.mark.drill
def test_killed_node_costs_its_round_only(faulty_run):
    out, events, _, _, _ = faulty_run
    victim = events["killed"]["country"]
    lines = _lines(out)
    train = [l for l in lines if l["kind"] == "train"]
    # round 2: the victim is missing (Flower reported the node gone), the others accepted
    r2 = [l for l in train if l["round"] == 2]
    mine = [l for l in r2 if l["country"] == victim]
    assert mine and all(l["status"] == "missing" for l in mine)
    assert mine[-1]["reason"].startswith("node offline")  # ended by the heartbeat, not the timeout
    others = {l["country"] for l in r2 if l["status"] == "accepted"}
    assert len(others) == 2 and victim not in others
    summary = {l["round"]: l for l in lines if l["kind"] == "round"}
    assert summary[2]["accepted"] == 2 and summary[2]["seconds"] < CFG.round_timeout
    # round 3: the restarted node (same key and state folder) takes part again
    r3 = [l for l in train if l["round"] == 3 and l["status"] == "accepted"]
    assert victim in {l["country"] for l in r3} and summary[3]["accepted"] == 3
    rep = json.loads((out / "report.json").read_text())
    assert rep["metrics"]["accuracy"] is not None and rep["metrics"]["macro_f1"] is not None
    assert Path(rep["model"]["path"]).is_file()
    assert [h["round"] for h in rep["history"]] == [1, 2, 3] and all(h["seconds"] > 0 for h in rep["history"])


@pytest.mark.drill
def test_epsilon_never_decreases(faulty_run):
    out, events, _, _, _ = faulty_run
    per: dict[str, list[tuple[float, int]]] = {}
    for l in _lines(out):
        if l["kind"] in ("stats", "train") and l.get("epsilon") is not None:
            steps = sum(h[2] for h in line_history(l))
            per.setdefault(l["country"], []).append((l["epsilon"], steps))
    assert len(per) == 3
    for country, seq in per.items():
        eps = [e for e, _ in seq]
        steps = [s for _, s in seq]
        assert eps == sorted(eps) and steps == sorted(steps), (country, seq)
        assert eps[-1] <= CFG.epsilon
    victim = events["killed"]["country"]
    assert len(per[victim]) >= 3 and per[victim][-1][1] > per[victim][1][1]   # continued, not reset


# -- (b) the server restarted after round 2 -----------------------------------------------------

@pytest.mark.drill
def test_server_resumes_from_checkpoint(faulty_run):
    out, events, _, _, _ = faulty_run
    lines = _lines(out)
    assert check_chain(lines) == []
    assert [l["round"] for l in lines if l["kind"] == "round"] == [1, 2, 3]
    resumes = [l for l in lines if l["kind"] == "resume"]
    assert [r["round"] for r in resumes] == [2]
    # no second statistics release: each of the 3 training clients released each stage once (the
    # seed preset's three stages)
    assert sorted(l.get("stage", 1) for l in lines if l["kind"] == "stats") == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    server = json.loads((out / "server.json").read_text())
    assert server["resumed_from"] == [2] and server["rounds_completed"] == ROUNDS
    ck = json.loads((out / "checkpoint.json").read_text())
    assert ck["round"] == ROUNDS and ck["ledger"]["last_hash"] == lines[-1]["hash"]
    assert events["restarted-server"]["run_id"] != events["restarted-server"]["old_run"]
    # the audit, with no key: every client fact is the client's own (signed), across the restart
    assert "every client fact signed by its client" in (out / "report.html").read_text()


# -- (c) a SuperNode whose key is not registered ------------------------------------------------

def test_unregistered_supernode_is_refused(tmp_path):
    cfg = RunConfig(privacy="none", rounds=1)
    with local_deployment(cfg, tmp_path) as dep:
        marker = dep.procs.marker
        key, pub = make_node_key(tmp_path / "rogue")
        rogue = Node("Albania", "train", key, pub, free_port(), tmp_path / "rogue-state")
        proc = dep.procs.start("rogue", dep.supernode_argv(rogue))
        rc = proc.wait(timeout=120)
        assert rc != 0
        log = (tmp_path / "deploy-logs" / "rogue.log").read_text()
        assert "Failed to activate SuperNode" in log
        assert dep.online_nodes() == {}                     # the SuperLink knows no node
    assert marked_pids(marker) == []


# -- the app copy that `flwr run` bundles -------------------------------------------------------

def test_app_copy_bundles_the_carbonfed_packages(tmp_path):
    """`flwr run` builds its FAB from write_app's copy: the code under carbonfed/<package>/ (the
    components' modules included), the job's run config as the app's defaults, the repository
    untouched."""
    repo_pyproject = (REPO / "pyproject.toml").read_bytes()
    cfg = RunConfig(privacy="dp", rounds=5, hidden="linear")
    app = write_app(cfg, tmp_path / "app")
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "FLWR_TELEMETRY_ENABLED": "0"}
    res = subprocess.run([flower_bin("flwr"), "build", "--app", str(app)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (fab,) = tmp_path.glob("*.fab")
    with zipfile.ZipFile(fab) as z:
        names = set(z.namelist())
        doc = tomllib.loads(z.read("pyproject.toml").decode())
    for component in APP_COMPONENTS.values():
        assert component.split(":")[0].replace(".", "/") + ".py" in names
    assert {"carbonfed/data/__init__.py", "carbonfed/models/__init__.py", "carbonfed/privacy/he.py"} <= names
    assert doc["tool"]["flwr"]["app"]["components"] == APP_COMPONENTS
    assert doc["tool"]["flwr"]["app"]["config"] == cfg.to_flower()
    assert (REPO / "pyproject.toml").read_bytes() == repo_pyproject


# -- (d) nothing left running -------------------------------------------------------------------

@pytest.mark.drill
def test_no_process_left(faulty_run):
    _, _, _, leftovers, seconds = faulty_run
    assert leftovers == []
    print(f"deployment with both drills: {seconds:.0f}s")


# -- the state merge, without processes ---------------------------------------------------------

def test_merge_keeps_the_larger_spend(tmp_path):
    small = {"accountant": {"noise_multiplier": [1.0], "sample_rate": [0.2], "steps": [5]}}
    big = {"accountant": {"noise_multiplier": [1.0, 1.0], "sample_rate": [0.2, 0.2], "steps": [5, 5]},
           "noise_multiplier": 1.0}
    assert merge_states(big, small)["accountant"]["steps"] == [5, 5]
    assert merge_states(small, big)["accountant"]["steps"] == [5, 5]
    assert merge_states({}, {"stats_released": True}, small)["stats_released"] is True
    st = PersistentState({}, tmp_path / "s.json")
    st["accountant"] = big["accountant"]                   # written through at once
    assert json.loads((tmp_path / "s.json").read_text())["accountant"]["steps"] == [5, 5]
    assert oct((tmp_path / "s.json").stat().st_mode & 0o777) == "0o600"


# -- a client's restart, in process: the state file and the replay of an answered round ----------

def test_client_restart_keeps_epsilon_and_replays(tmp_path, keys_dir):
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from carbonfed.data import resolve_data_dir
    from carbonfed.federation.client import app as ca
    from carbonfed.federation.client.participant import Layouts, make_cipher
    from carbonfed.federation.flower_compat import act_as_server_app
    from carbonfed.federation.server.app import schema
    from carbonfed.federation.wire import bytes_record, record_bytes, stage_key
    from carbonfed.privacy.he import load_public_context
    from carbonfed.privacy.secure_sum import SecureSum

    from carbonfed.federation.enrolment import seal_run

    cfg = seal_run(RunConfig(privacy="dp+he", rounds=3, local_epochs=1, batches_per_epoch=2, keys_dir=str(keys_dir),
                             data_dir=str(resolve_data_dir(None)), stats_stages=3,     # the main job's three stages
                             out_dir=str(tmp_path / "run")))                          # its charter, every client's key
    state_dir = tmp_path / "state"
    act_as_server_app(run_id=1)          # Messages are built as the ServerApp's

    def fresh_node(country):   # what a (re)started SuperNode gives the ClientApp: an empty context.state
        return Context(run_id=1, node_id=7, node_config={"country": country, "state-dir": str(state_dir)},
                       state=RecordDict(), run_config=cfg.to_flower())

    def ask(handler, country, content, mtype):
        msg = Message(content=RecordDict(content), dst_node_id=7, message_type=mtype)
        return handler(msg, fresh_node(country))

    layouts = Layouts.for_run(cfg, *schema(cfg.dataset))
    stats = SecureSum(make_cipher(cfg, load_public_context(keys_dir / "public.ctx"), layouts.stats.length))
    setup_cfg = {"config": ConfigRecord({"server-round": 0})}
    for c in ("Albania", "Algeria"):
        r = ask(ca.setup, c, setup_cfg, "query.setup")
        stats.add(record_bytes(r.content.array_records["stats"], "tenseal.bfv_vector"))
    again = ask(ca.setup, "Albania", setup_cfg, "query.setup")        # a restarted server asks again
    assert again.content.config_records["meta"]["fingerprint"]        # answered (replayed), no error
    # statistics stages 2 and 3, each measured with the scaler of the aggregates before it
    pub = load_public_context(keys_dir / "public.ctx")
    aggregates = {"stats": stats}
    path = ca.state_file(state_dir, "Albania", cfg)

    def request(upto):
        names = [stage_key(k) for k in range(1, upto + 1)]
        parts = [[n, 0, ["Albania", "Algeria"]] for n in names]              # whose tags each aggregate holds
        return {"config": ConfigRecord({"server-round": 0, "stats-parts": json.dumps(parts),
                                        **{f"{n}-terms": 2 for n in names}}),
                **{n: bytes_record(aggregates[n].serialize(), "tenseal.bfv_vector") for n in names}}

    for k, lay in enumerate(layouts.stages[1:], 2):
        name, first, total = stage_key(k), {}, SecureSum(make_cipher(cfg, pub, lay.length))
        for c in ("Albania", "Algeria"):
            r = ask(ca.refine, c, request(k - 1), "query.refine")
            first[c] = record_bytes(r.content.array_records[name], "tenseal.bfv_vector")
            total.add(first[c])
        hist = json.loads(path.read_text())["accountant"]
        again = ask(ca.refine, "Albania", request(k - 1), "query.refine")   # asked again: the same bytes, no charge
        assert record_bytes(again.content.array_records[name], "tenseal.bfv_vector") == first["Albania"]
        assert json.loads(path.read_text())["accountant"] == hist and sum(hist["steps"]) == k
        aggregates[name] = total

    def train(rnd):
        content = request(len(layouts.stages))
        content["config"] = ConfigRecord({**dict(content["config"]), "server-round": rnd, "model-terms": 0})
        r = ask(ca.train, "Albania", content, MessageType.TRAIN)
        facts = json.loads(r.content.config_records["meta"]["signed"])["facts"]
        return record_bytes(r.content.array_records["update"], "tenseal.bfv_vector"), facts

    u1, f1 = train(1)
    steps1 = ca.accountant_steps(json.loads(path.read_text()))
    u1b, f1b = train(1)                      # the same request after a restart: same bytes, no charge
    assert u1b == u1 and f1b == f1 and ca.accountant_steps(json.loads(path.read_text())) == steps1
    _, f2 = train(2)                         # the next round, after another restart: ε continues
    assert f2["epsilon"] > f1["epsilon"] and f2["total_steps"] > f1["total_steps"] == steps1
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    # a client whose state is gone (no statistics release on record) refuses instead of restarting ε
    content = {"config": ConfigRecord({"server-round": 3, "model-terms": 0, "stats-terms": 2}),
               "stats": bytes_record(stats.serialize(), "tenseal.bfv_vector")}
    lost = ask(ca.train, "Angola", content, MessageType.TRAIN).content.config_records["meta"]
    assert lost["status"] == "refused" and "state was lost" in lost["reason"]

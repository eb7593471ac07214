"""A synthetic signed run folder, made as the clients and the server of a real run would make it.

Every client holds a real Ed25519 key and signs its statements with
:func:`carbonfed.privacy.statements.sign_facts`; every ε is Opacus's PRV ε of the history the
client signs (:mod:`carbonfed.privacy.accountant`), so the verifier's independent PLD
re-accounting is exercised for real. The "server" writes the hash-chained ledger, ``server.json``,
the aggregate files (random bytes standing for ciphertexts), ``report.json`` and the round
summaries' manifests. Helpers to tamper with a copy as an attacker would (re-chaining the
ledger afterwards, which needs no key) are at the end.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from carbonfed.privacy.accountant import calibrate_noise, epsilon_of
from carbonfed.privacy.charter import CHARTER_FILE, seal_charter
from carbonfed.privacy.ledger import GENESIS, line_hash, read_ledger
from carbonfed.privacy.signing import new_signing_key
from carbonfed.privacy.statements import FIELD, chain_after, received, sha256_hex, sign_facts

EPS, DELTA, ROUNDS = 3.0, 1e-5, 2
STATS = (4.0, 1.0, 1)
Q, STEPS = 0.2, 5                       # batches-per-epoch 5, local-epochs 1
TRAIN = ("Atlantis", "Borduria", "Carpania")
TEST = ("Syldavia",)
ROLES = {**{c: "train" for c in TRAIN}, **{c: "test" for c in TEST}}
HE_FP = "ab" * 32
CONFIG = {"dataset": "seed", "data-dir": "", "keys-dir": "/keys", "out-dir": "", "privacy": "dp+he",
          "epsilon": EPS, "delta": DELTA, "rounds": ROUNDS, "seed": 0, "local-epochs": 1, "batches-per-epoch": 5,
          "max-grad-norm": 1.0, "stats-noise-multiplier": STATS[0], "stats-stages": 1, "min-train-clients": 2,
          "average-last": 1, "min-nodes": 0, "round-timeout": 600.0}


def make_keys() -> dict:
    return {c: new_signing_key() for c in (*TRAIN, *TEST)}


def planned_sigma() -> float:
    return calibrate_noise(EPS, DELTA, Q, STEPS * ROUNDS, prior=[STATS])


@dataclass
class Client:
    """One client: its key, chain head and accountant history."""

    name: str
    key: object
    charter: str
    chain: dict | None = None
    history: list = field(default_factory=list)

    def sign(self, kind: str, rnd: int, facts: dict, **kw) -> dict:
        st = sign_facts(self.key, self.chain, charter=self.charter, client=self.name, kind=kind, rnd=rnd,
                        facts=facts, **kw)
        self.chain = chain_after(st)
        return st


@dataclass
class RunSpec:
    """How the synthetic run goes; every hook is a client's (signed) or the server's own doing."""

    sigma: dict = field(default_factory=dict)            # client -> σ (default: planned)
    claim: object = None                                 # (client, history) -> claimed ε
    mutate: object = None                                # (client, round, facts) -> None, before signing
    terms: dict = field(default_factory=dict)            # round -> model terms the server claims
    error_in: tuple = ()                                 # (client, round): a Flower error, no statement
    missing: tuple = ()                                  # (test client, round): no reply at all
    close: bool = False                                  # every client signs a closing statement


class Server:
    """Writes the ledger, the aggregate files and server.json as the recorder does."""

    def __init__(self, run: Path):
        self.run, self.lines, self.node = run, [], {}
        (run / "aggregates").mkdir(parents=True, exist_ok=True)

    def line(self, rec: dict) -> dict:
        self.lines.append(rec)
        return rec

    def store(self, name: str, data: bytes) -> str:
        (self.run / "aggregates" / name).write_bytes(data)
        return sha256_hex(data)

    def flush(self) -> None:
        write_chain(self.run, self.lines)


def _facts(c: Client, spec: RunSpec, kind: str, rnd: int, mech) -> dict:
    before = epsilon_of(c.history, DELTA) if c.history else 0.0
    c.history = c.history + [mech]
    claim = spec.claim or (lambda who, h: epsilon_of(h, DELTA))
    facts = {"history": [list(h) for h in c.history], "epsilon": claim(c.name, c.history), "delta": DELTA,
             "noise_multiplier": mech[0]}
    if kind == "train":
        facts.update(sample_rate=mech[1], steps=mech[2], epsilon_before=before,
                     total_steps=sum(s for *_, s in c.history), clipped_params=0)
    if spec.mutate:
        spec.mutate(c.name, rnd, facts)
    return facts


def _setup(srv: Server, clients: dict, spec: RunSpec) -> bytes:
    for node, name in enumerate(TRAIN, 1):
        c = clients[name]
        up = os.urandom(64)
        st = c.sign("stats", 0, _facts(c, spec, "stats", 0, STATS), stage=1, output=up)
        srv.line({"kind": "stats", "round": 0, "node_id": node, "country": name, "status": "accepted", "reason": "",
                  "bytes": len(up), "delta": DELTA, FIELD: st})
    stats = os.urandom(96)
    srv.store("stats.bin", stats)
    return stats


def _round(srv: Server, clients: dict, spec: RunSpec, rnd: int, model, stats: bytes, sigma: float) -> bytes:
    terms = spec.terms.get(rnd, len(TRAIN))
    eps = []
    for node, name in enumerate(TRAIN, 1):
        c = clients[name]
        base = {"kind": "train", "round": rnd, "node_id": node, "country": name, "delta": DELTA}
        if (name, rnd) in spec.error_in:
            c.history = c.history + [(spec.sigma.get(name, sigma), Q, STEPS)]     # charged, then it failed
            srv.line({**base, "status": "rejected", "reason": "client error: RuntimeError: boom"})
            continue
        up = os.urandom(64)
        facts = _facts(c, spec, "train", rnd, (spec.sigma.get(name, sigma), Q, STEPS))
        st = c.sign("train", rnd, facts, inputs=received(model, terms if model else None, [(stats, 3)]), output=up)
        srv.line({**base, "status": "accepted", "reason": "", "bytes": len(up), FIELD: st})
        eps.append(facts["epsilon"])
    new_model = os.urandom(128)
    manifest = {f"model_round_{rnd:03d}.bin": srv.store(f"model_round_{rnd:03d}.bin", new_model),
                "model.bin": srv.store("model.bin", new_model)}
    evaluated = 0
    for node, name in enumerate(TEST, len(TRAIN) + 1):
        base = {"kind": "evaluate", "round": rnd, "node_id": node, "country": name}
        if (name, rnd) in spec.missing:
            srv.line({**base, "status": "missing", "reason": "no reply within round-timeout=600.0s"})
            continue
        up = os.urandom(32)
        st = clients[name].sign("evaluate", rnd, {}, inputs=received(new_model, 3, [(stats, 3)]), output=up)
        srv.line({**base, "status": "accepted", "reason": "", "bytes": len(up), "delta": DELTA, FIELD: st})
        evaluated += 1
    if evaluated:
        manifest[f"metrics_round_{rnd:03d}.bin"] = srv.store(f"metrics_round_{rnd:03d}.bin", os.urandom(48))
    accepted = sum(1 for r in srv.lines if r.get("kind") == "train" and r["round"] == rnd and r["status"] == "accepted")
    srv.line({"kind": "round", "round": rnd, "seconds": 1.0, "accepted": accepted, "rejected": len(TRAIN) - accepted,
              "evaluated": evaluated, "epsilon_max": max(eps), "model_terms": accepted, "model_rounds": [rnd],
              "aggregates": manifest})
    return new_model


def write_run(run: Path, keys: dict, spec: RunSpec | None = None) -> Path:
    """A complete run folder of ``ROUNDS`` rounds under ``run``."""
    spec = spec or RunSpec()
    run.mkdir(parents=True, exist_ok=True)
    doc = seal_charter(CONFIG, keys, ROLES, he_fingerprint=HE_FP)
    (run / CHARTER_FILE).write_text(json.dumps(doc, indent=1))
    clients = {c: Client(c, k, doc["sha256"]) for c, k in keys.items()}
    srv, sigma = Server(run), planned_sigma()
    stats, model = _setup(srv, clients, spec), None
    for rnd in range(1, ROUNDS + 1):
        model = _round(srv, clients, spec, rnd, model, stats, sigma)
    if spec.close:
        for name, c in clients.items():
            facts = {"history": [list(h) for h in c.history], "epsilon": epsilon_of(c.history, DELTA),
                     "delta": DELTA} if c.history else {}
            st = c.sign("close", ROUNDS, facts)
            srv.line({"kind": "close", "round": ROUNDS, "country": name, "status": "accepted", FIELD: st})
    srv.flush()
    write_json(run / "server.json", {"config": CONFIG, "rounds_completed": ROUNDS, "he": {"key_fingerprint": HE_FP}})
    write_report(run)
    return run


def write_report(run: Path) -> None:
    """report.json as the key holders' report states the privacy of the run (from the signed facts)."""
    last = {}
    for rec in read_ledger(run / "ledger.jsonl"):
        st = rec.get(FIELD)
        if st and "epsilon" in st["facts"]:
            last[st["client"]] = st["facts"]["epsilon"]
    write_json(run / "report.json", {"privacy_mode": CONFIG["privacy"], "rounds": ROUNDS,
                                     "privacy": {"delta": DELTA, "epsilon_target": EPS, "epsilon_per_client": last,
                                                 "epsilon_max": max(last.values()) if last else None}})


# -- an attacker's tools: edit, then re-chain (the chain has no key) --------------------------------

def write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=1))


def write_chain(run: Path, records: list[dict]) -> None:
    """Write ``records`` as a ledger with a fresh, valid hash chain."""
    prev, out = GENESIS, []
    for i, rec in enumerate(records):
        rec = {k: v for k, v in rec.items() if k not in ("seq", "prev_hash", "hash")}
        rec.update(seq=i, prev_hash=prev)
        rec["hash"] = prev = line_hash(rec)
        out.append(json.dumps(rec, sort_keys=True) + "\n")
    (run / "ledger.jsonl").write_text("".join(out))


def records(run: Path) -> list[dict]:
    return read_ledger(run / "ledger.jsonl")


def line_no(run: Path, pred) -> int:
    """1-based number of the first ledger line matching ``pred``."""
    return next(i for i, rec in enumerate(records(run), 1) if pred(rec))


def is_line(kind: str, country: str, rnd: int):
    return lambda r: r.get("kind") == kind and r.get("country") == country and r.get("round") == rnd

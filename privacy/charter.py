"""The run's charter: what a verifier relies on, fixed before round 1 and endorsed by every client.

A charter (``charter.json`` in the run folder) holds a random ``run_id``, the run config without
its local paths (privacy mode, ε budget, δ, planned rounds, the DP-SGD and statistics-noise
settings, ``min-train-clients``: the clients' own minimum number of co-contributors), every
client with its role and public verification key, and in HE runs the fingerprint of the key
holders' public HE key. Its SHA-256 (:attr:`Charter.sha256`) is the run's identity: every
statement a client signs names it (:mod:`carbonfed.privacy.statements`), and so does every
check-slot tag of a stored aggregate (:mod:`carbonfed.privacy.binding`).

Who signs: every client, not one key holder
-------------------------------------------
Each client listed signs the charter's SHA-256 with its own key (:func:`endorse`), after checking
it (:func:`refusal` with its own config, and that the key listed under its name is its own). So

* a charter is what each of its clients agreed to: a client never endorses a budget, a number of
  rounds or a ``min-train-clients`` it would not enforce, and it refuses every request whose run
  config differs from the charter it endorsed (:func:`refusal`): an operator who passes
  ``--min-train-clients 0`` is refused by the clients, not trusted;
* nobody can change the charter afterwards: an edit changes its SHA-256 and breaks every
  endorsement (and every statement, which names the SHA-256);
* each listed key has proved possession, and no single party (a designated key holder colluding
  with the server) can re-issue a charter with keys of its own for everyone.

What no file in a run folder can prove is *who* holds each key: a party that rewrites the whole
folder can list keys of its own and sign everything with them. That anchor comes from outside:
the enrolment list (``clients.pub.json``, published by the clients) or the charter's SHA-256 as
the clients published it. :func:`check_charter` checks either when given, and says when neither
was (``anchored`` False).

Guarantees
----------
* :meth:`Charter.from_body` refuses a charter without a valid privacy mode, a finite positive ε
  (DP modes), δ in (0, 1), integer rounds, local epochs, batches per epoch and
  ``min-train-clients`` >= 1, ``stats-stages`` 1..3, or with two clients sharing a key.
* :func:`check_charter` names every problem: an edited body, a missing or invalid endorsement,
  a key or SHA-256 that differs from the anchor given.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from carbonfed.privacy.signing import digest, is_public_hex, public_hex, sign, signature_valid

CHARTER_FILE = "charter.json"
CHARTER_TYPE = "carbonfed.charter.v1"
ENDORSEMENT_TYPE = "carbonfed.charter-endorsement.v1"
PRIVACY_MODES = ("none", "dp", "he", "dp+he", "ddp+he")
ROLES = ("train", "test")
# Run-config keys that name local places or waits, not what the run computes: left out (``charter``:
# the path of the sealed charter itself).
LOCAL_KEYS = ("data-dir", "keys-dir", "out-dir", "state-dir", "min-nodes", "round-timeout", "charter")
_INTS = ("rounds", "min-train-clients", "local-epochs", "batches-per-epoch", "stats-stages")
_NUMS = ("epsilon", "delta", "stats-noise-multiplier", "max-grad-norm")


class CharterError(ValueError):
    """A charter body is malformed or states impossible settings."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _config_problems(cfg: dict) -> list[str]:
    errors = [f"config has no {k!r}" for k in ("privacy", *_INTS, *_NUMS) if k not in cfg]
    if errors:
        return errors
    errors += [f"config {k}={cfg[k]!r} is not an integer" for k in _INTS if not _is_int(cfg[k])]
    errors += [f"config {k}={cfg[k]!r} is not a finite number" for k in _NUMS if not _is_num(cfg[k])]
    if errors:
        return errors
    if cfg["privacy"] not in PRIVACY_MODES:
        errors.append(f"config privacy={cfg['privacy']!r} is not one of {PRIVACY_MODES}")
    if cfg["privacy"] in ("dp", "dp+he", "ddp+he") and not cfg["epsilon"] > 0:
        errors.append(f"config epsilon={cfg['epsilon']!r}: a DP run needs a positive ε budget")
    if not 0 < cfg["delta"] < 1:
        errors.append(f"config delta={cfg['delta']!r} is not in (0, 1)")
    errors += [f"config {k}={cfg[k]} is below 1" for k in _INTS if cfg[k] < 1]
    if cfg["stats-stages"] > 3:
        errors.append(f"config stats-stages={cfg['stats-stages']} is not 1, 2 or 3")
    if cfg["stats-noise-multiplier"] < 0 or cfg["max-grad-norm"] <= 0:
        errors.append("config stats-noise-multiplier must be >= 0 and max-grad-norm > 0")
    return errors


@dataclass(frozen=True)
class Charter:
    """A parsed, valid charter body and its SHA-256."""

    sha256: str
    body: dict = field(repr=False)

    @classmethod
    def from_body(cls, body) -> "Charter":
        if not isinstance(body, dict) or body.get("type") != CHARTER_TYPE:
            raise CharterError(f"not a charter (its type is not {CHARTER_TYPE!r})")
        errors = [] if isinstance(body.get("run_id"), str) and body["run_id"] else ["no run_id"]
        cfg, clients = body.get("config"), body.get("clients")
        errors += _config_problems(cfg) if isinstance(cfg, dict) else ["no config"]
        if not isinstance(clients, dict) or not clients:
            errors.append("no clients")
        else:
            for name, c in clients.items():
                if not (isinstance(c, dict) and is_public_hex(c.get("public_key")) and c.get("role") in ROLES):
                    errors.append(f"client {name!r}: expected a public_key (64 hex digits) and a role in {ROLES}")
            keys = [c.get("public_key") for c in clients.values() if isinstance(c, dict)]
            if len(set(keys)) != len(keys):
                errors.append("two clients share one public key: one party could sign for both")
        if errors:
            raise CharterError("invalid charter: " + "; ".join(errors))
        return cls(sha256=digest(body), body=body)

    @property
    def config(self) -> dict:
        return self.body["config"]

    @property
    def privacy(self) -> str:
        return self.config["privacy"]

    @property
    def epsilon(self) -> float:
        return float(self.config["epsilon"])

    @property
    def delta(self) -> float:
        return float(self.config["delta"])

    @property
    def rounds(self) -> int:
        return self.config["rounds"]

    @property
    def min_train_clients(self) -> int:
        return self.config["min-train-clients"]

    @property
    def stats_stages(self) -> int:
        return self.config["stats-stages"]

    @property
    def dp(self) -> bool:
        return self.config["privacy"] in ("dp", "dp+he", "ddp+he")

    @property
    def he(self) -> bool:
        return self.config["privacy"] in ("he", "dp+he", "ddp+he")

    @property
    def keys(self) -> dict[str, str]:
        return {name: c["public_key"] for name, c in self.body["clients"].items()}

    @property
    def roles(self) -> dict[str, str]:
        return {name: c["role"] for name, c in self.body["clients"].items()}

    @property
    def plan(self) -> tuple[float, int]:
        """(sample rate, steps) of one round of local DP-SGD, as the clients plan it."""
        bpe = self.config["batches-per-epoch"]
        return 1.0 / bpe, bpe * self.config["local-epochs"]


def draft_charter(config: Mapping, clients: Mapping[str, str], roles: Mapping[str, str],
                  he_fingerprint: str | None = None, run_id: str | None = None) -> dict:
    """A charter body from a run config (Flower's dashed keys; local paths dropped), the clients'
    public keys and roles; validated. ``run_id`` defaults to 128 random bits."""
    body = {"type": CHARTER_TYPE, "run_id": run_id or secrets.token_hex(16),
            "config": {k: v for k, v in sorted(config.items()) if k not in LOCAL_KEYS},
            "clients": {c: {"public_key": clients[c], "role": roles.get(c)} for c in sorted(clients)},
            "he_fingerprint": he_fingerprint}
    Charter.from_body(body)
    return body


def _endorsement(sha256: str, client: str) -> dict:
    return {"type": ENDORSEMENT_TYPE, "charter": sha256, "client": client}


def endorse(key: Ed25519PrivateKey, charter: Charter, client: str) -> str:
    """``client``'s endorsement of ``charter``; refused if the key listed for it is not ``key``'s."""
    if charter.keys.get(client) != public_hex(key):
        raise CharterError(f"the charter lists another public key for {client!r} than this client's own")
    return sign(key, _endorsement(charter.sha256, client))


def charter_document(body: dict, endorsements: Mapping[str, str]) -> dict:
    """What ``charter.json`` holds: the body, its SHA-256 (for reading; recomputed when checked)
    and every client's endorsement."""
    return {"charter": body, "sha256": digest(body), "endorsements": dict(sorted(endorsements.items()))}


def seal_charter(config: Mapping, keys: Mapping[str, Ed25519PrivateKey], roles: Mapping[str, str],
                 he_fingerprint: str | None = None, run_id: str | None = None) -> dict:
    """Draft a charter and have every client endorse it (a simulation holds every client's key)."""
    body = draft_charter(config, {c: public_hex(k) for c, k in keys.items()}, roles, he_fingerprint, run_id)
    charter = Charter.from_body(body)
    return charter_document(body, {c: endorse(k, charter, c) for c, k in keys.items()})


@dataclass
class CharterCheck:
    charter: Charter | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    anchored: bool = False     # the keys or the SHA-256 matched an anchor given from outside the folder


def check_charter(doc, trusted_keys: Mapping[str, str] | None = None,
                  expected_sha256: str | None = None, where: str = CHARTER_FILE) -> CharterCheck:
    """Parse ``charter.json``'s content and check every endorsement, and the anchor if given:
    ``trusted_keys`` (a ``clients.pub.json`` obtained from the clients) or ``expected_sha256``."""
    out = CharterCheck(None)
    try:
        charter = Charter.from_body(doc.get("charter") if isinstance(doc, dict) else None)
    except CharterError as exc:
        out.problems.append(f"{where}: {exc}")
        return out
    out.charter = charter
    if doc.get("sha256") != charter.sha256:
        out.problems.append(f"{where}: its sha256 field {doc.get('sha256')!r} is not the SHA-256 of its content "
                            f"({charter.sha256}): the charter was edited")
    given = doc.get("endorsements") if isinstance(doc.get("endorsements"), dict) else {}
    for client, key in sorted(charter.keys.items()):
        if not signature_valid(key, _endorsement(charter.sha256, client), given.get(client)):
            out.problems.append(f"{where}: {client}'s endorsement is {'missing' if client not in given else 'invalid'} "
                                "(the charter was changed after it was endorsed, or forged)")
    if expected_sha256 is not None:
        if expected_sha256.lower() != charter.sha256:
            out.problems.append(f"{where}: SHA-256 {charter.sha256} is not the published {expected_sha256}: "
                                "another charter than the one the clients published")
        else:
            out.anchored = True
    if trusted_keys is not None:
        bad = sorted(c for c, k in charter.keys.items() if trusted_keys.get(c) != k)
        for c in bad:
            out.problems.append(f"{where}: {c}'s public key differs from the trusted key list"
                                + ("" if c in trusted_keys else " (which does not list it)")
                                + ": a key that is not the client's")
        absent = sorted(set(trusted_keys) - set(charter.keys))
        if absent:
            out.notes.append(f"{len(absent)} enrolled client(s) are not in the charter: {', '.join(absent[:5])}")
        out.anchored = out.anchored or not bad
    return out


def refusal(charter: Charter, client: str, run_config: Mapping | None = None, rnd: int | None = None,
            model_terms: int | None = None, stats_terms=()) -> str | None:
    """Why ``client`` must refuse this request under the charter it endorsed, or None.

    ``run_config``: the request's run config (dashed keys, typed as the charter's); ``rnd``: the
    round asked for; ``model_terms`` / ``stats_terms``: how many contributions the aggregates it
    received sum, each of which must reach ``min-train-clients``."""
    if client not in charter.keys:
        return f"{client} is not a client of charter {charter.sha256[:12]}…"
    if run_config is not None:
        for k, v in sorted(charter.config.items()):
            if k not in run_config or run_config[k] != v or isinstance(run_config[k], bool) != isinstance(v, bool):
                return (f"run config {k}={run_config.get(k, '(missing)')!r} differs from the charter {client} "
                        f"endorsed ({k}={v!r}, charter {charter.sha256[:12]}…)")
    if rnd is not None and not 0 <= rnd <= charter.rounds:
        return f"round {rnd} is outside the charter's rounds 0..{charter.rounds}"
    low = [("model", model_terms)] * (model_terms is not None) + [("statistics", t) for t in stats_terms]
    for what, terms in low:
        if terms < charter.min_train_clients:
            return (f"refusing a {what} aggregate of {terms} contribution(s): the charter's min-train-clients is "
                    f"{charter.min_train_clients}, and fewer could expose a single client")
    return None

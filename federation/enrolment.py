"""The clients' signing keys and the run's charter, as the operator of a run prepares them.

Every run, in every privacy mode, is signed by its clients (:mod:`carbonfed.privacy.statements`)
under a charter they all endorsed before round 1 (:mod:`carbonfed.privacy.charter`). This module
makes both for a run of this package:

* :func:`seal_run` (``carbonfed run``, :func:`carbonfed.federation.simulation.run_simulation`):
  the operator of a simulation holds every client's key, as it holds the secret HE context. The
  keys live under :func:`signing_dir` (the run's keys folder, else its private client-state
  folder), one file per client (``signing/<slug>-<hash>.key``, mode 0600), made once and kept.
* :func:`seal_with_keys` (``carbonfed deploy local``): each node holds only its own key; the
  charter is drafted from their public keys and each node checks it (:func:`refusal` with the
  run config) and endorses it with its own key.
* :func:`publish` writes ``charter.json`` and ``clients.pub.json`` into the run folder: what a
  reviewer needs, and no secret.
* :func:`load_charter` is how the clients and the server read a charter: it must carry every
  client's valid endorsement, else :class:`~carbonfed.privacy.charter.CharterError`.

Guarantees
----------
* A charter is sealed from the run config exactly as the clients will read it back
  (``RunConfig.from_flower(...).to_flower()``, local paths dropped), so an honest run is never
  refused, and any later change of a setting the charter fixes (``--min-train-clients 0``) is.
* :func:`seal_run` on a config that already names an existing charter returns it unchanged (a
  resumed run keeps its charter, so its clients' chains go on under the same SHA-256).
* :func:`sealed_simulation` keeps a config's charter only if the simulation holds the signing
  key of every client it lists (:func:`holds_keys`); a config taken from another run's folder
  (``audit-attack``'s canary run) gets a charter of its own.
* ``min-train-clients`` below 1, or any other setting a charter cannot state, is refused here
  (:class:`~carbonfed.privacy.charter.CharterError`, a ValueError) before anything runs.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from carbonfed.data import split_countries
from carbonfed.federation.config import RunConfig
from carbonfed.federation.run_data import load_run_data
from carbonfed.privacy.charter import (CHARTER_FILE, Charter, CharterError, charter_document, check_charter,
                                       draft_charter, endorse, refusal)
from carbonfed.privacy.he import PUBLIC_CONTEXT_FILE, key_fingerprint, load_public_context
from carbonfed.privacy.signing import (PUBLIC_KEYS_FILE, key_file, keygen_clients, load_signing_key, public_hex,
                                       write_public_keys)


def signing_dir(cfg: RunConfig) -> Path | None:
    """Where a simulation keeps its clients' signing keys: ``keys-dir``, else ``state-dir``."""
    folder = cfg.keys_dir or cfg.state_dir
    return Path(folder) if folder else None


def run_roles(cfg: RunConfig, data_dir: str | None = None) -> dict[str, str]:
    """Client → ``"train"`` or ``"test"``, by the run's partition of its data set."""
    part = split_countries(load_run_data(cfg, data_dir).countries(), cfg.holdout_offset)
    return {**{c: "train" for c in part.train}, **{c: "test" for c in part.test}}


def charter_config(cfg: RunConfig) -> dict:
    """The run config as every client reads it back from Flower (typed, presets resolved)."""
    return RunConfig.from_flower(cfg.to_flower()).to_flower()


def he_fingerprint(cfg: RunConfig) -> str | None:
    """The key holders' public HE key fingerprint (HE runs), which the charter fixes."""
    if not cfg.he:
        return None
    return key_fingerprint(load_public_context(Path(cfg.keys_dir) / PUBLIC_CONTEXT_FILE))


def seal_with_keys(cfg: RunConfig, keys: dict[str, Ed25519PrivateKey], roles: dict[str, str]) -> dict:
    """The charter document of ``cfg`` for the clients holding ``keys``: drafted from their public
    keys, checked by each client against the run config, endorsed by each with its own key."""
    config = charter_config(cfg)
    body = draft_charter(config, {c: public_hex(k) for c, k in keys.items()}, roles, he_fingerprint(cfg))
    charter = Charter.from_body(body)
    endorsements = {}
    for client, key in sorted(keys.items()):
        why = refusal(charter, client, config)
        if why:
            raise CharterError(f"{client} refuses to endorse the charter: {why}")
        endorsements[client] = endorse(key, charter, client)
    return charter_document(body, endorsements)


def publish(out: str | os.PathLike, doc: dict) -> Path:
    """``out/charter.json`` and ``out/clients.pub.json`` (the charter's public keys); the charter's path."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHARTER_FILE
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    write_public_keys(folder / PUBLIC_KEYS_FILE, Charter.from_body(doc["charter"]).keys)
    return path


def publish_charter(charter: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A copy of the charter file ``charter`` as ``out/charter.json`` (the server's copy of what
    the clients endorsed; it proves itself by its endorsements). Refuses a run folder that holds
    another charter."""
    src, dst = Path(charter), Path(out) / CHARTER_FILE
    data = src.read_bytes()
    if dst.exists() and dst.resolve() != src.resolve() and dst.read_bytes() != data:
        if json.loads(dst.read_text()).get("sha256") != json.loads(data).get("sha256"):
            raise CharterError(f"{dst} holds another charter than {src}: another run's folder")
    if not dst.exists() or dst.resolve() != src.resolve():
        dst.write_bytes(data)
    return dst


def seal_run(cfg: RunConfig, out: str | os.PathLike | None = None) -> RunConfig:
    """``cfg`` with a sealed charter (``charter`` set to ``out/charter.json``, default the run's
    out-dir): every client's key made (or kept) under :func:`signing_dir`, the charter drafted,
    endorsed by every client and published. A config whose charter exists is returned as is."""
    if cfg.charter and Path(cfg.charter).is_file():
        return cfg
    folder = signing_dir(cfg)
    if folder is None:
        raise ValueError("no folder for the clients' signing keys: set keys-dir or state-dir")
    roles = run_roles(cfg)
    keygen_clients(folder, roles)
    keys = {c: load_signing_key(key_file(folder, c)) for c in roles}
    path = publish(out or cfg.out_dir or folder, seal_with_keys(cfg, keys, roles))
    return replace(cfg, charter=str(path.resolve()))


def holds_keys(cfg: RunConfig) -> bool:
    """Whether this simulation holds the signing key of every client of ``cfg``'s charter (a
    resumed run does; a config copied from another run's folder, whose keys are gone, does not)."""
    folder = signing_dir(cfg)
    if not (cfg.charter and Path(cfg.charter).is_file() and folder is not None):
        return False
    clients = json.loads(Path(cfg.charter).read_text()).get("charter", {}).get("clients", {})
    return all(key_file(folder, c).is_file() for c in clients)


@contextmanager
def sealed_simulation(cfg: RunConfig) -> Iterator[RunConfig]:
    """``cfg`` sealed for a simulation (:func:`seal_run`): its own charter if this simulation
    holds its clients' keys, else a new one; a config with no folder for the signing keys gets
    a private temporary one (its keys-dir) for the simulation's duration."""
    if cfg.charter and not holds_keys(cfg):
        cfg = replace(cfg, charter="")          # another run's charter: its clients are not here to sign
    if cfg.charter or signing_dir(cfg) is not None:
        yield seal_run(cfg)
        return
    with tempfile.TemporaryDirectory(prefix="carbonfed-signing-") as tmp:
        yield seal_run(replace(cfg, keys_dir=tmp))


def check_sealable(cfg: RunConfig) -> None:
    """Raise CharterError if no charter can state ``cfg`` (``min-train-clients`` 0, ...): called
    before a run creates anything."""
    draft_charter(charter_config(cfg), {"client": "0" * 64}, {"client": "train"}, run_id="check")


def charter_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 a charter file states (the anchor its clients publish)."""
    return str(json.loads(Path(path).read_text()).get("sha256"))


def load_charter(path: str | os.PathLike) -> Charter:
    """The charter in ``path``, every endorsement checked (no anchor: the reader is a party of the
    run, which knows its own key); CharterError naming the problems otherwise."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CharterError(f"cannot read the charter {p}: {exc}") from exc
    res = check_charter(doc, where=str(p))
    if res.charter is None or res.problems:
        raise CharterError("; ".join(res.problems) or f"{p}: not a charter")
    return res.charter

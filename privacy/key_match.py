"""Which HE keys belong to which run: the check made before a run's ciphertexts are decrypted.

A run's ``server.json`` records, under ``he.key_fingerprint``, the SHA-256 of the public key the
server aggregated under (:func:`carbonfed.privacy.he.key_fingerprint`). A key folder is this
run's if the secret context in it has that fingerprint.

Guarantees
----------
* :func:`check_run_keys` reads no ciphertext: it raises :class:`KeysMissing` if the folder holds
  no secret context, and :class:`NotThisRunsKeys` (naming both fingerprints) if the secret
  context is another key's, so a report or an audit never blames the clients, or lists every
  ciphertext as a mismatch, for a key mix-up.
* A run without HE (no ``he`` record in ``server.json``) needs no keys: the check passes.
"""

from __future__ import annotations

import json
from pathlib import Path

from carbonfed.privacy.he import SECRET_CONTEXT_FILE, key_fingerprint, load_secret_context


class RunKeysError(ValueError):
    """The keys given for a run cannot decrypt it; the message says why."""


class KeysMissing(RunKeysError):
    """The key folder holds no secret context."""


class NotThisRunsKeys(RunKeysError):
    """The secret context is not the one the run was encrypted under."""


def run_key_fingerprint(run_dir: str | Path) -> str | None:
    """The fingerprint of the key the run's server aggregated under (None: no HE, or no ``server.json``)."""
    path = Path(run_dir) / "server.json"
    if not path.is_file():
        return None
    he = json.loads(path.read_text()).get("he") or {}
    return he.get("key_fingerprint")


def check_run_keys(run_dir: str | Path, keys_dir: str | Path | None) -> None:
    """Raise :class:`RunKeysError` unless ``keys_dir`` holds the secret context of the HE run in
    ``run_dir`` (nothing to check for a run without HE)."""
    expected = run_key_fingerprint(run_dir)
    if expected is None:
        return
    secret = Path(keys_dir or "") / SECRET_CONTEXT_FILE
    if not keys_dir or not secret.is_file():
        raise KeysMissing(f"no secret context at {secret}: this HE run's ciphertexts need the secret context "
                          "it was encrypted under")
    found = key_fingerprint(load_secret_context(secret))
    if found != expected:
        raise NotThisRunsKeys(f"these are not this run's keys: {secret} has key fingerprint {found[:16]}…, but "
                              f"{run_dir} was encrypted under {expected[:16]}… (server.json); give the key folder "
                              "this run used")

"""The Flower command-line driver of a local deployment: ``flower-superlink``, ``flower-supernode``
and ``flwr`` (``run``, ``ls``, ``stop``, ``supernode register``/``ls``), and the files they read.

carbonfed drives Flower's deployment engine through Flower's public command line only (checked
against Flower 1.42.0), never through its internals.

Guarantees
----------
* Every command runs through :class:`~carbonfed.federation.deploy.processes.Processes`: marked,
  in the deployment's private folder, with its ``FLWR_HOME``; nothing reads or writes ``~/.flwr``.
* :func:`json_out` returns the JSON answer of a ``--format json`` command, or raises
  :class:`DeployError` with the command's output.
* :func:`write_app` copies the code into ``app_dir/carbonfed/<package>`` with a ``pyproject.toml``
  whose components and run-config defaults are :func:`~carbonfed.federation.config.flower_app_toml`'s:
  ``flwr run`` builds its FAB from that copy, never from (or into) the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import tomli_w

from carbonfed.federation.config import RunConfig, flower_app_toml
from carbonfed.federation.deploy.certs import write_private
from carbonfed.federation.deploy.processes import DeployError, Processes

CONNECTION = "carbonfed-local"          # the SuperLink connection's name in Flower's config
APP_PACKAGES = ("data", "models", "privacy", "federation")   # installed as carbonfed.<package>
REPO = Path(__file__).resolve().parents[2]


def flower_bin(name: str) -> str:
    """The path of a Flower console script: beside this Python, else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _toml_str(s: str) -> str:
    return json.dumps(str(s))      # a JSON string is a valid TOML basic string


def node_config_arg(country: str, data_dir: str, secret_context: str, state_dir: str, signing_key: str = "",
                    charter: str = "") -> str:
    """The ``--node-config`` value of one SuperNode (``signing-key``: its own Ed25519 key alone;
    ``charter``: the charter it endorsed)."""
    items = {"country": country, "data-dir": data_dir, "secret-context": secret_context, "state-dir": state_dir,
             "signing-key": signing_key, "charter": charter}
    return " ".join(f"{k}={_toml_str(v)}" for k, v in items.items() if v)


def write_app(cfg: RunConfig, app_dir: Path) -> Path:
    """A copy of the Flower app (code + a ``pyproject.toml`` whose defaults are ``cfg``) for
    ``flwr run`` to build its FAB from: the repository is neither read for connections nor
    rewritten by Flower's config migration."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for pkg in APP_PACKAGES:
        for src in (REPO / pkg).rglob("*.py"):
            if "__pycache__" in src.parts:
                continue
            dst = app_dir / "carbonfed" / src.relative_to(REPO)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    doc = {"build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
           "project": {"name": project["name"], "version": project["version"],
                       "dependencies": project.get("dependencies", [])},
           **flower_app_toml(cfg)}
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(doc))
    return app_dir


def write_flower_config(home: Path, address: str, ca: Path) -> None:
    """``FLWR_HOME/config.toml`` naming the SuperLink connection (TLS, verified against ``ca``)."""
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    doc = {"superlink": {"default": CONNECTION,
                         CONNECTION: {"address": address, "root-certificates": str(ca)}}}
    write_private(home / "config.toml", tomli_w.dumps(doc).encode())


def json_out(proc: subprocess.CompletedProcess, what: str) -> dict:
    """The JSON object the flwr CLI printed (``--format json``), after any notices."""
    text = proc.stdout
    dec = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch == "{":
            try:
                obj, _ = dec.raw_decode(text[i:])
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "success" in obj:
                return obj
    raise DeployError(f"{what} failed (exit {proc.returncode}): {text[-2000:]} {proc.stderr[-2000:]}")


def superlink_argv(port: int, tls: dict[str, Path], database: Path) -> list[str]:
    """A SuperLink on 127.0.0.1:``port`` with TLS and SuperNode authentication, its state in ``database``."""
    return [flower_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
            "--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]),
            "--ssl-keyfile", str(tls["key"]), "--enable-supernode-auth",
            "--database", str(database), "--disable-runtime-dependency-installation"]


def supernode_argv(superlink: str, ca: Path, key: Path, port: int, node_config: str) -> list[str]:
    """A SuperNode that connects to ``superlink`` (TLS verified against ``ca``) with the private ``key``."""
    return [flower_bin("flower-supernode"), "--superlink", superlink, "--root-certificates", str(ca),
            "--auth-supernode-private-key", str(key), "--host", "127.0.0.1", "--port", str(port),
            "--node-config", node_config]


class FlowerCLI:
    """The ``flwr`` commands against the SuperLink connection :data:`CONNECTION`."""

    ROLE = "flwr-cli"

    def __init__(self, procs: Processes):
        self.procs = procs

    def _flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.procs.run(self.ROLE, [flower_bin("flwr"), *args], timeout=timeout)

    def answers(self) -> bool:
        """The SuperLink's Control API answers ``flwr ls``."""
        r = self._flwr("ls", CONNECTION, "--format", "json", timeout=60)
        return r.returncode == 0 and '"success": true' in r.stdout

    def register(self, keys: list[tuple[str, Path]]) -> list[int]:
        """``flwr supernode register`` of each ``(name, public key file)`` (concurrently); their node ids."""
        done = self.procs.run_all(self.ROLE, [[flower_bin("flwr"), "supernode", "register", str(pub), CONNECTION,
                                               "--name", name, "--format", "json"] for name, pub in keys])
        return [int(json_out(r, f"flwr supernode register ({name})")["node-id"]) for (name, _), r in zip(keys, done)]

    def online_nodes(self) -> dict[int, str]:
        """Node id → status of every SuperNode the SuperLink knows."""
        r = self._flwr("supernode", "ls", CONNECTION, "--format", "json")
        return {int(n["node-id"]): n["status"] for n in json_out(r, "flwr supernode ls")["nodes"]}

    def submit(self, app_dir: Path, run_config: Path) -> int:
        """``flwr run``: the app in ``app_dir`` with the run config file ``run_config``; the run id."""
        res = json_out(self._flwr("run", str(app_dir), CONNECTION, "--run-config", str(run_config),
                                  "--format", "json"), "flwr run")
        if not res.get("success"):
            raise DeployError(f"flwr run failed: {res}")
        return int(res["run-id"])

    def run_status(self, run_id: int) -> str:
        """``flwr ls`` of one run: its status (``"finished:completed"``, ...), ``"unknown"`` if not answered."""
        try:
            runs = json_out(self._flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json"), "flwr ls")["runs"]
        except DeployError:
            return "unknown"
        return runs[0]["status"] if runs else "unknown"

    def stop_run(self, run_id: int) -> None:
        self._flwr("stop", str(run_id), CONNECTION, "--format", "json")

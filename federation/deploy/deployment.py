"""One local deployment: a SuperLink and its SuperNodes on 127.0.0.1, and the material they use.

:func:`local_deployment` makes the key material in a private temporary folder, starts a
SuperLink with TLS and SuperNode authentication, and yields a :class:`Deployment` that registers,
starts and watches SuperNodes and submits runs.

Guarantees
----------
* Key material (TLS, node keys, HE contexts, Flower's config, the app copy) lives in one
  temporary folder (mode 0700, files 0600) that :func:`local_deployment` deletes on exit, also on
  an error, Ctrl-C or SIGTERM; every process it started is stopped first. ``FLWR_HOME`` points
  into that folder.
* The ServerApp's keys-dir holds ``public.ctx`` only; ``secret.ctx`` is named, by absolute path,
  in the SuperNodes' node config only.
* Each SuperNode has its own Ed25519 signing key in its own folder, named in its node config
  only; :meth:`Deployment.seal` drafts the run's charter from their public keys, has each node
  check and endorse it with its own key (:func:`carbonfed.federation.enrolment.seal_with_keys`),
  publishes ``charter.json`` and ``clients.pub.json`` in the run folder and gives each node a
  copy of what it endorsed.
* :func:`choose_countries` picks at least one held-out and ``max(2, min-train-clients)``
  training countries, or raises ``ValueError``.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import tomli_w

from carbonfed.data import split_countries
from carbonfed.federation.config import RunConfig
from carbonfed.federation.deploy.certs import make_node_key, make_tls, split_he_keys, write_private
from carbonfed.federation.deploy.flower_cli import (FlowerCLI, node_config_arg, superlink_argv, supernode_argv,
                                                    write_flower_config)
from carbonfed.federation.deploy.processes import CWD_ENV, DeployError, Processes, free_port, signals_raise
from carbonfed.federation.enrolment import publish, seal_with_keys
from carbonfed.federation.keys import keygen_for
from carbonfed.federation.run_data import load_run_data
from carbonfed.privacy.he import PUBLIC_CONTEXT_FILE, SECRET_CONTEXT_FILE
from carbonfed.privacy.signing import load_signing_key, new_signing_key, save_signing_key


def roles(cfg: RunConfig) -> dict[str, str]:
    """Country → ``"train"`` or ``"test"`` (held out), by the run's partition."""
    part = split_countries(load_run_data(cfg).countries(), cfg.holdout_offset)
    return {**{c: "train" for c in part.train}, **{c: "test" for c in part.test}}


def choose_countries(cfg: RunConfig, n: int) -> list[str]:
    """``n`` countries of the partition, at least one held out and ``max(2, min-train-clients)``
    training: the first training and the first held-out countries in sorted order, about one
    held out in five (as the partition itself)."""
    ds = load_run_data(cfg)
    part = split_countries(ds.countries(), cfg.holdout_offset)
    need_train = max(2, cfg.min_train_clients)
    n_test = max(1, round(n / 5))
    if n - n_test < need_train:
        raise ValueError(f"--clients {n}: need at least {need_train + 1} SuperNodes "
                         f"({need_train} training for min-train-clients={cfg.min_train_clients}, 1 held out)")
    if n - n_test > len(part.train) or n_test > len(part.test):
        raise ValueError(f"--clients {n}: the {cfg.dataset} data set has only {len(part.countries)} parties")
    return sorted(part.train[:n - n_test] + part.test[:n_test])


def with_deployed_noise_floor(cfg: RunConfig, countries: list[str]) -> RunConfig:
    """``ddp+he`` with ``min-noise-clients`` unset: the floor of the training clients deployed
    (⌈0.8 · n⌉ of those in ``countries``), not of the whole data set's partition, since only
    they contribute noise shares (a floor above them would refuse every release). Otherwise
    ``cfg`` unchanged."""
    if not cfg.ddp or cfg.min_noise_clients:
        return cfg
    train = set(split_countries(load_run_data(cfg).countries(), cfg.holdout_offset).train)
    return replace(cfg, min_noise_clients=cfg.noise_floor(sum(1 for c in countries if c in train)))


@dataclass
class Node:
    country: str
    role: str               # "train" or "test"
    key: Path
    pub: Path
    port: int
    state_dir: Path
    node_id: int | None = None

    @property
    def signing_key(self) -> Path:
        """This node's own Ed25519 signing key (in its private folder)."""
        return self.state_dir.parent / "signing.key"

    @property
    def charter(self) -> Path:
        """The copy of the charter this node endorsed."""
        return self.state_dir.parent / "charter.json"

    @property
    def process(self) -> str:
        return f"supernode-{self.port}"


@dataclass
class Deployment:
    """One local deployment: the material in ``secret`` and the processes in ``procs``."""

    cfg: RunConfig
    out: Path
    secret: Path
    procs: Processes
    nodes: list[Node] = field(default_factory=list)
    port: int = 0
    tls: dict = field(default_factory=dict)
    run_ids: list[int] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def key_holders(self) -> Path | None:
        """The clients' keys folder (secret and public context), None without HE."""
        return self.secret / "clients" if self.cfg.he else None

    @property
    def flwr(self) -> FlowerCLI:
        return FlowerCLI(self.procs)

    # -- SuperLink ------------------------------------------------------------------------
    def start_superlink(self) -> None:
        (self.secret / "superlink").mkdir(mode=0o700, exist_ok=True)
        self.procs.start("superlink", superlink_argv(self.port, self.tls, self.secret / "superlink" / "state.db"))
        self._wait_superlink()

    def _wait_superlink(self, timeout: float = 90) -> None:
        """Until the SuperLink completes a TLS handshake verified against our CA (cheap, in
        process), then until its Control API answers."""
        deadline = time.monotonic() + timeout
        ctx = ssl.create_default_context(cafile=str(self.tls["ca"]))
        while time.monotonic() < deadline:
            if (code := self.procs.exited("superlink")) is not None:
                raise DeployError(f"the SuperLink exited with {code}; see {self.procs.log_dir / 'superlink.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                    with ctx.wrap_socket(sock, server_hostname="127.0.0.1"):
                        break
            except OSError:
                time.sleep(0.5)
        while time.monotonic() < deadline:
            if self.flwr.answers():
                return
            time.sleep(1)
        raise DeployError(f"the SuperLink did not answer within {timeout}s")

    def register(self, nodes: list[Node]) -> None:
        """``flwr supernode register`` of every node's public key (concurrently)."""
        for n, node_id in zip(nodes, self.flwr.register([(n.country, n.pub) for n in nodes])):
            n.node_id = node_id

    def online_nodes(self) -> dict[int, str]:
        return self.flwr.online_nodes()

    # -- SuperNodes -----------------------------------------------------------------------
    def add_nodes(self, countries: list[str]) -> None:
        """One :class:`Node` per country: its own key pair and private state folder."""
        role_of = roles(self.cfg)
        for i, c in enumerate(countries):
            folder = self.secret / "nodes" / f"{i:02d}"
            key, pub = make_node_key(folder)
            (folder / "state").mkdir(mode=0o700)
            self.nodes.append(Node(c, role_of[c], key, pub, free_port(), folder / "state"))
            save_signing_key(self.nodes[-1].signing_key, new_signing_key())

    def seal(self) -> None:
        """The run's charter, endorsed by every node with its own key; published in the run
        folder, a copy in each node's folder, and named in the server's run config."""
        doc = seal_with_keys(self.cfg, {n.country: load_signing_key(n.signing_key) for n in self.nodes},
                             {n.country: n.role for n in self.nodes})
        path = publish(self.out, doc)
        for n in self.nodes:
            write_private(n.charter, path.read_bytes())
        self.cfg = replace(self.cfg, charter=str(path))

    def supernode_argv(self, node: Node, key: Path | None = None, secret_context: str = "") -> list[str]:
        return supernode_argv(self.address, self.tls["ca"], key or node.key, node.port,
                              node_config_arg(node.country, self.cfg.data_dir, secret_context, str(node.state_dir),
                                              str(node.signing_key), str(node.charter)))

    def start_node(self, node: Node) -> None:
        secret_ctx = str(self.secret / "clients" / SECRET_CONTEXT_FILE) if self.cfg.he else ""
        self.procs.start(node.process, self.supernode_argv(node, secret_context=secret_ctx))

    def wait_clientapp(self, node: Node, timeout: float) -> bool:
        """Wait until a ClientApp process of ``node`` runs (it is handling a message)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid in self.procs.pids(node.process):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"flwr-clientapp" in cmd:
                    return True
            time.sleep(0.2)
        return False

    def wait_online(self, nodes: list[Node], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        want = {n.node_id for n in nodes}
        while time.monotonic() < deadline:
            status = self.online_nodes()
            if all(status.get(i) == "online" for i in want):
                return
            for n in nodes:
                if (code := self.procs.exited(n.process)) is not None:
                    raise DeployError(f"the SuperNode of {n.country} exited with {code}; "
                                      f"see {self.procs.log_dir / f'{n.process}.log'}")
            time.sleep(1)
        raise DeployError(f"SuperNodes not online after {timeout}s: {self.online_nodes()}")

    # -- the run --------------------------------------------------------------------------
    def submit(self, app_dir: Path) -> int:
        run_config = self.secret / "run-config.toml"
        run_config.write_text(tomli_w.dumps(self.cfg.to_flower()))
        run_id = self.flwr.submit(app_dir, run_config)
        self.run_ids.append(run_id)
        return run_id

    def run_status(self, run_id: int) -> str:
        return self.flwr.run_status(run_id)

    def stop_run(self, run_id: int) -> None:
        self.flwr.stop_run(run_id)


def _environment(secret: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": str(secret / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1", CWD_ENV: str(secret),
            # Flower's processes start flower-superexec, flwr-serverapp, flwr-clientapp by name
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def _he_keys(cfg: RunConfig, secret: Path, keys_dir: str | os.PathLike | None) -> RunConfig:
    """The key holders' contexts in ``secret/clients`` (a copy of ``keys_dir``, else fresh keys);
    ``cfg`` with the server's keys-dir, a folder holding ``public.ctx`` alone."""
    if not cfg.he:
        return replace(cfg, keys_dir="")
    clients = secret / "clients"
    if keys_dir:
        clients.mkdir(mode=0o700)
        for f in (SECRET_CONTEXT_FILE, PUBLIC_CONTEXT_FILE):
            write_private(clients / f, (Path(keys_dir) / f).read_bytes())
    else:
        keygen_for(cfg, clients)                  # the run's ring
    return replace(cfg, keys_dir=str(split_he_keys(clients, secret / "server-keys")))


@contextmanager
def local_deployment(cfg: RunConfig, out: Path, *, keys_dir: str | os.PathLike | None = None):
    """Key material in a private temporary folder, a SuperLink with TLS and SuperNode
    authentication on 127.0.0.1, and ``cfg`` rewritten for it (keys-dir: the server's public
    context only). Yields the :class:`Deployment`; on exit (also on an error, Ctrl-C or
    SIGTERM) stops every process it started and deletes the folder."""
    secret = Path(tempfile.mkdtemp(prefix="carbonfed-deploy-"))
    os.chmod(secret, 0o700)
    procs = Processes(uuid.uuid4().hex, _environment(secret), out / "deploy-logs")
    try:
        with signals_raise():
            tls = make_tls(secret / "tls")
            dep = Deployment(_he_keys(cfg, secret, keys_dir), out, secret, procs, tls=tls, port=free_port())
            write_flower_config(secret / "flwr-home", dep.address, tls["ca"])
            dep.start_superlink()
            yield dep
    finally:
        try:
            procs.close()
        finally:
            shutil.rmtree(secret, ignore_errors=True)

"""Run a federation on Flower's deployment engine, on this machine, as it would run across many.

``carbonfed deploy local --clients N --out DIR [every option of carbonfed run]`` (and
:func:`deploy_local`) starts, on the loopback interface only:

* one **SuperLink** with TLS (a fresh CA and a server certificate for 127.0.0.1/localhost) and
  SuperNode authentication (``--enable-supernode-auth``), its state in an SQLite file so that a
  restarted SuperLink still knows the registered nodes;
* N **SuperNodes**, one per country, each with its own EC P-384 key pair whose public half is
  registered with ``flwr supernode register`` before the node starts, the CA certificate
  (``--root-certificates``), and a node config naming its country, data folder, the clients'
  secret HE context and a private state folder (where its accountant survives restarts);
* the run, submitted with ``flwr run <app> <connection> --run-config <file>``. The ServerApp is
  given a keys folder that holds ``public.ctx`` only; ``secret.ctx`` lives elsewhere and is
  named, by absolute path, in the SuperNodes' node config only.

It follows the run through the ledger (one line per round) and ``flwr ls``, then stops every
process it started (also on Ctrl-C, SIGTERM or an error) and, as the key holder, builds
``report.json``, ``report.html`` and ``privacy_statement.md`` exactly as after a simulation,
the audit checking the clients' ledger attestations with the key holders' context.

Guarantees
----------
* Every process started here carries a private marker in its environment; on the way out every
  process with that marker (the SuperLink, the SuperNodes and what they spawned: SuperExec,
  ServerApp, ClientApps) is sent SIGTERM, then SIGKILL, by PID. Nothing is left running.
* Key material (CA key, server key, node keys, HE contexts, Flower's config) is written into a
  private temporary folder (mode 0700, files 0600) that is deleted at the end; nothing is
  written to ``~/.flwr`` (``FLWR_HOME`` points into that folder) nor into the repository (the
  app is copied into a temporary folder before ``flwr run`` builds its FAB, because ``flwr run``
  rewrites a ``pyproject.toml`` that still has a ``[tool.flwr.federations]`` table).
* Fault drills: ``kill_client_in_round=k`` SIGKILLs one training SuperNode and its ClientApp
  as soon as that ClientApp runs for round k, and starts the node again once round k is over
  (same key, same state folder: its ε continues, it is not reset). ``restart_server_after_round=k``
  SIGKILLs the SuperLink and the ServerApp right after round k is recorded, starts a new
  SuperLink on the same database, stops the dead run and submits the run again with the same
  out-dir: the ServerApp resumes from its checkpoint of round k.
* The processes' logs are in ``OUT/deploy-logs``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import tomli_w

from carbonfed.federation.config import PRIVACY_MODES, RunConfig

log = logging.getLogger("carbonfed.deploy")

CONNECTION = "carbonfed-local"          # the SuperLink connection's name in Flower's config
MARKER_ENV = "CARBONFED_DEPLOY_MARKER"  # environment marker of every process started here
APP_PACKAGES = ("data", "models", "privacy", "federation")
STATUS_EVERY_S = 30.0                   # `flwr ls` of the run (between, the ledger shows progress)
REPO = Path(__file__).resolve().parents[2]


class DeployError(RuntimeError):
    """The deployment could not be brought up or the run did not finish."""


# -- key material -------------------------------------------------------------------------------

def _write_private(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)
    return path


def make_tls(out: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 7) -> dict[str, Path]:
    """A fresh CA and a server certificate signed by it for ``hosts`` (IPs or DNS names).

    Returns the paths of ``ca.crt``, ``server.crt`` and ``server.key`` (all mode 0600; the CA's
    private key is not kept: nothing else will ever be signed with it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "carbonfed local CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    return {
        "ca": _write_private(out / "ca.crt", ca_cert.public_bytes(pem)),
        "cert": _write_private(out / "server.crt", cert.public_bytes(pem)),
        "key": _write_private(out / "server.key", key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
    }


def make_node_key(out: Path) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (EC P-384, OpenSSH format, as Flower expects):
    ``node.key`` (private, given to ``flower-supernode --auth-supernode-private-key``) and
    ``node.pub`` (public, registered with ``flwr supernode register``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    priv = _write_private(out / "node.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    pub = _write_private(out / "node.pub", key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return priv, pub


def split_he_keys(keys_dir: Path, server_dir: Path) -> Path:
    """Copy ``public.ctx`` alone into ``server_dir`` (the ServerApp's keys-dir): the server side
    never gets a path under which ``secret.ctx`` lies."""
    from carbonfed.privacy.he import PUBLIC_CONTEXT_FILE, load_public_context

    load_public_context(keys_dir / PUBLIC_CONTEXT_FILE)        # refuses a file with a secret key
    server_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(server_dir, 0o700)
    _write_private(server_dir / PUBLIC_CONTEXT_FILE, (keys_dir / PUBLIC_CONTEXT_FILE).read_bytes())
    return server_dir


# -- the countries ------------------------------------------------------------------------------

def choose_countries(cfg: RunConfig, n: int) -> list[str]:
    """``n`` countries of the partition, at least one held out and ``max(2, min-train-clients)``
    training: the first training and the first held-out countries in sorted order, about one
    held out in five (as the partition itself)."""
    from carbonfed.data import load_dataset, split_countries

    ds = load_dataset(cfg.dataset, cfg.data_dir or None)
    part = split_countries(ds.countries(), cfg.holdout_offset)
    need_train = max(2, cfg.min_train_clients)
    n_test = max(1, round(n / 5))
    if n - n_test < need_train:
        raise ValueError(f"--clients {n}: need at least {need_train + 1} SuperNodes "
                         f"({need_train} training for min-train-clients={cfg.min_train_clients}, 1 held out)")
    if n - n_test > len(part.train) or n_test > len(part.test):
        raise ValueError(f"--clients {n}: the {cfg.dataset} data set has only {len(part.countries)} countries")
    return sorted(part.train[:n - n_test] + part.test[:n_test])


# -- processes ----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_marker(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = fh.read().split(b"\0")
    except OSError:
        return None
    prefix = MARKER_ENV.encode() + b"="
    for item in env:
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace")
    return None


def _alive(pid: int) -> bool:
    """Running (a zombie, already dead and only waiting to be reaped, does not count)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def marked_pids(marker: str) -> list[int]:
    """PIDs of the live processes whose environment carries ``marker`` (exactly, or as
    ``marker/<role>``): every process a deployment started, including grandchildren."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            m = _proc_marker(int(entry))
            if m is not None and (m == marker or m.startswith(marker + "/")) and _alive(int(entry)):
                out.append(int(entry))
    return sorted(out)


class Processes:
    """The processes of one deployment, each tagged ``<marker>/<role>`` in its environment."""

    def __init__(self, marker: str, env: dict[str, str], log_dir: Path):
        self.marker, self.env, self.log_dir = marker, env, log_dir
        self.popen: dict[str, subprocess.Popen] = {}
        self._logs: list = []
        self._lock = threading.Lock()

    def start(self, role: str, argv: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.log_dir / f"{role}.log", "ab")
        self._logs.append(fh)
        env = {**self.env, MARKER_ENV: f"{self.marker}/{role}"}
        p = subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, cwd=self.env.get("CARBONFED_DEPLOY_CWD"))
        with self._lock:
            self.popen[role] = p
        log.debug("started %s (pid %d): %s", role, p.pid, " ".join(argv))
        return p

    def run(self, role: str, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        """A short-lived command (the flwr CLI), marked like the others."""
        env = {**self.env, MARKER_ENV: f"{self.marker}/{role}"}
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, cwd=self.env.get("CARBONFED_DEPLOY_CWD"))

    def pids(self, role: str | None = None) -> list[int]:
        tag = self.marker if role is None else f"{self.marker}/{role}"
        return [p for p in marked_pids(self.marker) if role is None or _proc_marker(p) == tag]

    def kill(self, role: str | None = None, sig: int = signal.SIGKILL, grace: float = 5.0) -> None:
        """Send ``sig`` to every live process of ``role`` (all roles if None), by PID; what is
        still alive ``grace`` seconds later gets SIGKILL. Reaps the direct children."""
        deadline = time.monotonic() + grace
        sent: set[int] = set()
        while pids := self.pids(role):
            late = time.monotonic() > deadline
            for pid in pids:
                if late or pid not in sent:
                    try:
                        os.kill(pid, signal.SIGKILL if late else sig)
                    except ProcessLookupError:
                        pass
                    sent.add(pid)
            self._reap()
            time.sleep(0.2)
            if time.monotonic() > deadline + 10:
                raise DeployError(f"processes {pids} survive SIGKILL")
        self._reap()

    def _reap(self) -> None:
        with self._lock:
            for p in self.popen.values():
                p.poll()

    def close(self) -> None:
        self.kill(None, signal.SIGTERM)
        for fh in self._logs:
            fh.close()


@contextmanager
def _signals_raise():
    """SIGTERM/SIGHUP raise SystemExit (SIGINT raises KeyboardInterrupt anyway), so that the
    ``finally`` that stops every process runs. Only possible in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- the deployment ------------------------------------------------------------------------------

def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _toml_str(s: str) -> str:
    return json.dumps(str(s))      # a JSON string is a valid TOML basic string


def node_config_arg(country: str, data_dir: str, secret_context: str, state_dir: str) -> str:
    """The ``--node-config`` value of one SuperNode."""
    items = {"country": country, "data-dir": data_dir, "secret-context": secret_context, "state-dir": state_dir}
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
           "tool": {"flwr": {"app": {
               "publisher": "carbonfed",
               "components": {"serverapp": "carbonfed.federation.server.app:app", "clientapp": "carbonfed.federation.client.app:app"},
               "config": cfg.to_flower()}}}}
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(doc))
    return app_dir


def _flower_config(home: Path, address: str, ca: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    doc = {"superlink": {"default": CONNECTION,
                         CONNECTION: {"address": address, "root-certificates": str(ca)}}}
    _write_private(home / "config.toml", tomli_w.dumps(doc).encode())


def _json_out(proc: subprocess.CompletedProcess, what: str) -> dict:
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


@dataclass
class Node:
    country: str
    role: str               # "train" or "test"
    key: Path
    pub: Path
    port: int
    state_dir: Path
    node_id: int | None = None


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

    # -- SuperLink ------------------------------------------------------------------------
    def start_superlink(self) -> None:
        (self.secret / "superlink").mkdir(mode=0o700, exist_ok=True)
        self.procs.start("superlink", [
            _bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
            "--ssl-ca-certfile", str(self.tls["ca"]), "--ssl-certfile", str(self.tls["cert"]),
            "--ssl-keyfile", str(self.tls["key"]), "--enable-supernode-auth",
            "--database", str(self.secret / "superlink" / "state.db"),
            "--disable-runtime-dependency-installation"])
        self._wait_superlink()

    def _wait_superlink(self, timeout: float = 90) -> None:
        """Until the SuperLink completes a TLS handshake verified against our CA (cheap, in
        process), then until its Control API answers."""
        import ssl

        deadline = time.monotonic() + timeout
        ctx = ssl.create_default_context(cafile=str(self.tls["ca"]))
        while time.monotonic() < deadline:
            p = self.procs.popen["superlink"]
            if p.poll() is not None:
                raise DeployError(f"the SuperLink exited with {p.returncode}; see {self.procs.log_dir / 'superlink.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                    with ctx.wrap_socket(sock, server_hostname="127.0.0.1"):
                        break
            except OSError:
                time.sleep(0.5)
        while time.monotonic() < deadline:
            r = self.procs.run("flwr-cli", [_bin("flwr"), "ls", CONNECTION, "--format", "json"], timeout=60)
            if r.returncode == 0 and '"success": true' in r.stdout:
                return
            time.sleep(1)
        raise DeployError(f"the SuperLink did not answer within {timeout}s")

    def register(self, nodes: list[Node]) -> None:
        """``flwr supernode register`` of every node's public key (concurrently)."""
        env = {**self.procs.env, MARKER_ENV: f"{self.procs.marker}/flwr-cli"}
        running = [(n, subprocess.Popen([_bin("flwr"), "supernode", "register", str(n.pub), CONNECTION,
                                         "--name", n.country, "--format", "json"], env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                        cwd=self.procs.env.get("CARBONFED_DEPLOY_CWD")))
                   for n in nodes]
        for n, p in running:
            stdout, stderr = p.communicate(timeout=120)
            res = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
            n.node_id = int(_json_out(res, f"flwr supernode register ({n.country})")["node-id"])

    def online_nodes(self) -> dict[int, str]:
        r = self.procs.run("flwr-cli", [_bin("flwr"), "supernode", "ls", CONNECTION, "--format", "json"])
        return {int(n["node-id"]): n["status"] for n in _json_out(r, "flwr supernode ls")["nodes"]}

    # -- SuperNodes -----------------------------------------------------------------------
    def supernode_argv(self, node: Node, key: Path | None = None, secret_context: str = "") -> list[str]:
        return [_bin("flower-supernode"), "--superlink", self.address, "--root-certificates", str(self.tls["ca"]),
                "--auth-supernode-private-key", str(key or node.key), "--host", "127.0.0.1", "--port", str(node.port),
                "--node-config", node_config_arg(node.country, self.cfg.data_dir, secret_context, str(node.state_dir))]

    def start_node(self, node: Node) -> None:
        secret_ctx = str(self.secret / "clients" / "secret.ctx") if self.cfg.he else ""
        self.procs.start(f"supernode-{node.port}", self.supernode_argv(node, secret_context=secret_ctx))

    def wait_clientapp(self, node: Node, timeout: float) -> bool:
        """Wait until a ClientApp process of ``node`` runs (it is handling a message)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid in self.procs.pids(f"supernode-{node.port}"):
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
                p = self.procs.popen.get(f"supernode-{n.port}")
                if p is not None and p.poll() is not None:
                    raise DeployError(f"the SuperNode of {n.country} exited with {p.returncode}; "
                                      f"see {self.procs.log_dir / f'supernode-{n.port}.log'}")
            time.sleep(1)
        raise DeployError(f"SuperNodes not online after {timeout}s: {self.online_nodes()}")

    # -- the run --------------------------------------------------------------------------
    def submit(self, app_dir: Path) -> int:
        run_config = self.secret / "run-config.toml"
        run_config.write_text(tomli_w.dumps(self.cfg.to_flower()))
        r = self.procs.run("flwr-cli", [_bin("flwr"), "run", str(app_dir), CONNECTION,
                                        "--run-config", str(run_config), "--format", "json"])
        res = _json_out(r, "flwr run")
        if not res.get("success"):
            raise DeployError(f"flwr run failed: {res}")
        run_id = int(res["run-id"])
        self.run_ids.append(run_id)
        return run_id

    def run_status(self, run_id: int) -> str:
        r = self.procs.run("flwr-cli", [_bin("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"])
        try:
            runs = _json_out(r, "flwr ls")["runs"]
        except DeployError:
            return "unknown"
        return runs[0]["status"] if runs else "unknown"

    def stop_run(self, run_id: int) -> None:
        self.procs.run("flwr-cli", [_bin("flwr"), "stop", str(run_id), CONNECTION, "--format", "json"])


def _round_lines(ledger: Path) -> list[dict]:
    if not ledger.exists():
        return []
    out = []
    for line in ledger.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue                # a line being written
        if rec.get("kind") == "round":
            out.append(rec)
    return out


def _show_rounds(rounds: list[dict], seen: int) -> int:
    for r in rounds[seen:]:
        _say(f"round {r['round']}: {r['accepted']} accepted, {r['rejected']} rejected, "
             f"{r['evaluated']} evaluated, {r['seconds']:.1f}s"
             + (f", ε_max={r['epsilon_max']:.3f}" if r.get("epsilon_max") is not None else ""))
    return len(rounds)


def _say(msg: str) -> None:
    print(f"[deploy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@contextmanager
def local_deployment(cfg: RunConfig, out: Path, *, keys_dir: str | os.PathLike | None = None):
    """Key material in a private temporary folder, a SuperLink with TLS and SuperNode
    authentication on 127.0.0.1, and ``cfg`` rewritten for it (keys-dir: the server's public
    context only). Yields the :class:`Deployment`; on exit (also on an error, Ctrl-C or
    SIGTERM) stops every process it started and deletes the folder."""
    from carbonfed.privacy.he import PUBLIC_CONTEXT_FILE, SECRET_CONTEXT_FILE, keygen

    secret = Path(tempfile.mkdtemp(prefix="carbonfed-deploy-"))
    os.chmod(secret, 0o700)
    env = {**os.environ, "FLWR_HOME": str(secret / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1",
           "CARBONFED_DEPLOY_CWD": str(secret),
           # Flower's processes start flower-superexec, flwr-serverapp, flwr-clientapp by name
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    procs = Processes(uuid.uuid4().hex, env, out / "deploy-logs")
    try:
        with _signals_raise():
            tls = make_tls(secret / "tls")
            if cfg.he:
                clients = secret / "clients"
                if keys_dir:
                    clients.mkdir(mode=0o700)
                    for f in (SECRET_CONTEXT_FILE, PUBLIC_CONTEXT_FILE):
                        _write_private(clients / f, (Path(keys_dir) / f).read_bytes())
                else:
                    keygen(clients)
                cfg = replace(cfg, keys_dir=str(split_he_keys(clients, secret / "server-keys")))
            else:
                cfg = replace(cfg, keys_dir="")
            dep = Deployment(cfg, out, secret, procs, tls=tls, port=_free_port())
            _flower_config(secret / "flwr-home", dep.address, tls["ca"])
            dep.start_superlink()
            yield dep
    finally:
        try:
            procs.close()
        finally:
            shutil.rmtree(secret, ignore_errors=True)


def deploy_local(cfg: RunConfig, n_clients: int, out_dir, *, kill_client_in_round: int | None = None,
                 restart_server_after_round: int | None = None, keys_dir: str | os.PathLike | None = None,
                 timeout: float | None = None, on_event=None) -> Path:
    """Run ``cfg`` on a local deployment of ``n_clients`` SuperNodes; returns ``out_dir`` (with
    ``report.json``). ``keys_dir``: the key holders' folder from ``carbonfed keygen`` (default:
    fresh keys in the private temporary folder). ``on_event(name, info)`` is called at
    ``"started"`` (SuperNodes online, before the run; ``info`` has the process marker, the
    address, the CA file and the server's keys folder), ``"killed"``, ``"restarted-server"``
    and ``"restarted-client"``."""
    from carbonfed.data import resolve_data_dir
    from carbonfed.federation.report.html import write_all
    from carbonfed.federation.report.build import build_report
    from carbonfed.privacy.audit.verify import verify_run

    out = Path(out_dir).resolve()
    if (out / "ledger.jsonl").exists():
        raise ValueError(f"{out} already holds a run (ledger.jsonl); choose another out folder")
    cfg = replace(cfg, data_dir=str(resolve_data_dir(cfg.data_dir or None)), out_dir=str(out))
    countries = choose_countries(cfg, n_clients)
    for what, k, last in (("kill-client-in-round", kill_client_in_round, cfg.rounds),
                          ("restart-server-after-round", restart_server_after_round, cfg.rounds - 1)):
        if k is not None and not 1 <= k <= last:
            raise ValueError(f"{what}={k}: must lie in 1..{last} for a run of {cfg.rounds} rounds")
    timeout = timeout or max(900.0, 3 * cfg.rounds * min(cfg.round_timeout, 300.0) + 300)
    emit = on_event or (lambda name, info: None)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    roles = _roles(cfg)
    with local_deployment(cfg, out, keys_dir=keys_dir) as dep:
        cfg = dep.cfg
        for i, c in enumerate(countries):
            key, pub = make_node_key(dep.secret / "nodes" / f"{i:02d}")
            state_dir = dep.secret / "nodes" / f"{i:02d}" / "state"
            state_dir.mkdir(mode=0o700)
            dep.nodes.append(Node(c, roles[c], key, pub, _free_port(), state_dir))
        _say(f"SuperLink on {dep.address} (TLS, SuperNode authentication); {len(dep.nodes)} SuperNodes: "
             + ", ".join(f"{n.country} ({n.role})" for n in dep.nodes) + f"; logs in {dep.procs.log_dir}")
        dep.register(dep.nodes)
        for n in dep.nodes:
            dep.start_node(n)
        dep.wait_online(dep.nodes)
        app_dir = write_app(cfg, dep.secret / "app")
        ledger = out / "ledger.jsonl"
        emit("started", {"marker": dep.procs.marker, "address": dep.address, "ca": str(dep.tls["ca"]),
                         "server_keys_dir": cfg.keys_dir, "nodes": {n.country: n.node_id for n in dep.nodes}})
        run_id = dep.submit(app_dir)
        _say(f"all SuperNodes online; run {run_id} submitted")

        victim = next((n for n in reversed(dep.nodes) if n.role == "train"), None)
        killed = back = restarted = False
        seen, last_check = 0, 0.0
        deadline = time.monotonic() + timeout
        while True:
            rounds = _round_lines(ledger)
            seen = _show_rounds(rounds, seen)
            done = {r["round"] for r in rounds}
            # drill: SIGKILL a training SuperNode while round k is under way (after round k-1's line)
            if kill_client_in_round and not killed and victim is not None and (
                    (kill_client_in_round - 1) in done or (kill_client_in_round == 1 and _setup_done(ledger))):
                working = dep.wait_clientapp(victim, timeout=60)   # its ClientApp got the round's message
                dep.procs.kill(f"supernode-{victim.port}", signal.SIGKILL)
                killed = True
                _say(f"SIGKILLed the SuperNode of {victim.country} (node {victim.node_id}) "
                     + ("and its running ClientApp " if working else "")
                     + f"during round {kill_client_in_round}")
                emit("killed", {"country": victim.country, "node_id": victim.node_id, "round": kill_client_in_round})
            # drill: kill the SuperLink and the ServerApp after round k; restart; resubmit (resume)
            if restart_server_after_round and not restarted and restart_server_after_round in done:
                dep.procs.kill("superlink", signal.SIGKILL)
                _say(f"SIGKILLed the SuperLink and the ServerApp after round {restart_server_after_round}")
                dep.start_superlink()
                dep.stop_run(run_id)            # it died with its ServerApp: no node should work for it
                dep.wait_online([n for n in dep.nodes if n is not victim or not killed or back], timeout=180)
                old, run_id = run_id, dep.submit(app_dir)
                restarted = True
                _say(f"SuperLink restarted on the same database; run {run_id} submitted (resumes from the "
                     f"checkpoint of round {restart_server_after_round})")
                emit("restarted-server", {"old_run": old, "run_id": run_id})
            # the killed node comes back once its round is over (same key, same state folder)
            if killed and not back and kill_client_in_round in done:
                dep.start_node(victim)
                back = True
                _say(f"restarted the SuperNode of {victim.country} (same key and state folder)")
                emit("restarted-client", {"country": victim.country, "node_id": victim.node_id})
            now = time.monotonic()
            if now - last_check > STATUS_EVERY_S or cfg.rounds in done:
                last_check = now
                status = dep.run_status(run_id)
                if status.startswith("finished"):
                    if status != "finished:completed" or not (out / "server.json").exists():
                        raise DeployError(f"run {run_id} ended as {status}; see {dep.procs.log_dir}")
                    break
            if now > deadline:
                raise DeployError(f"run {run_id} did not finish within {timeout:.0f}s; see {dep.procs.log_dir}")
            time.sleep(0.5)
        _show_rounds(_round_lines(ledger), seen)
        _say(f"run {run_id} finished, {time.time() - t_start:.1f}s after start; stopping every process")
        dep.procs.close()
        keys = dep.secret / "clients" if cfg.he else None
        # while the keys exist: the report decrypts with them and the audit checks the attestations
        audit = verify_run(out, keys_dir=keys)
        write_all(out, build_report(out, keys), audit)
    _say(f"report: {out / 'report.json'}; audit {'passed' if audit.ok else 'FAILED: ' + '; '.join(audit.problems)}")
    return out


def _roles(cfg: RunConfig) -> dict[str, str]:
    from carbonfed.data import load_dataset, split_countries

    part = split_countries(load_dataset(cfg.dataset, cfg.data_dir or None).countries(), cfg.holdout_offset)
    return {**{c: "train" for c in part.train}, **{c: "test" for c in part.test}}


def _setup_done(ledger: Path) -> bool:
    if not ledger.exists():
        return False
    return any('"kind": "stats"' in line for line in ledger.read_text().splitlines())


# -- command line --------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="carbonfed deploy",
                                 description="Run a federation on Flower's deployment engine (SuperLink + SuperNodes).")
    sub = ap.add_subparsers(dest="where", required=True)
    p = sub.add_parser("local", help="every role on this machine, on 127.0.0.1, with TLS and node authentication")
    defaults = RunConfig()
    p.add_argument("--clients", type=int, required=True, help="number of SuperNodes (countries), at least 3")
    p.add_argument("--dataset", choices=("seed", "owid"), default=defaults.dataset)
    p.add_argument("--data-dir", default=None, help="folder with the CSV files (else $CARBONFED_DATA_DIR, else ../shared/data)")
    p.add_argument("--privacy", choices=PRIVACY_MODES, default=defaults.privacy)
    p.add_argument("--out", default=None, help="output folder (default runs/deploy-<dataset>-<mode>-<time>)")
    p.add_argument("--keys", default=None, help="folder from `carbonfed keygen` (default: fresh keys in a private temp dir)")
    p.add_argument("--verbose", action="store_true", help="debug logging of this command (Flower's logs are "
                                                           "always in OUT/deploy-logs)")
    p.add_argument("--kill-client-in-round", type=int, default=None,
                   help="fault drill: SIGKILL one training SuperNode during this round (it restarts after it)")
    p.add_argument("--restart-server-after-round", type=int, default=None,
                   help="fault drill: kill the SuperLink and ServerApp after this round, restart, resume")
    for f in fields(RunConfig):
        if f.name in ("dataset", "data_dir", "privacy", "keys_dir", "out_dir"):
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)), default=None)
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(RunConfig)
                 if f.name not in ("dataset", "data_dir", "privacy", "keys_dir", "out_dir")
                 and getattr(args, f.name, None) is not None}
    out = Path(args.out or f"runs/deploy-{args.dataset}-{args.privacy.replace('+', '')}-{time.strftime('%Y%m%d-%H%M%S')}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    try:
        cfg = RunConfig(dataset=args.dataset, data_dir=args.data_dir or "", privacy=args.privacy, **overrides)
        out = deploy_local(cfg, args.clients, out, kill_client_in_round=args.kill_client_in_round,
                           restart_server_after_round=args.restart_server_after_round, keys_dir=args.keys)
    except (ValueError, OSError, DeployError) as exc:
        print(f"carbonfed deploy: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as exc:
        code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 130
        print("carbonfed deploy: interrupted; every process it started is stopped", file=sys.stderr)
        return code
    report = json.loads((out / "report.json").read_text())
    m, t, p = report["metrics"], report["timing"], report["privacy"]
    print(f"held-out accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}"
          + (f"; ε_max={p['epsilon_max']:.4f} at δ={p['delta']}" if p else "")
          + f"; {t['per_round_s']:.1f}s per round; report: {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

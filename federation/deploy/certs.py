"""Key material of a local deployment: a TLS CA and server certificate, SuperNode keys, the HE key split.

Guarantees
----------
* Every file is written with mode 0600 (:func:`write_private`), its folder created as needed.
* :func:`make_tls` keeps no CA private key: nothing else can ever be signed with that CA.
* :func:`split_he_keys` gives the server side a folder that holds ``public.ctx`` alone, after
  checking that the file holds no secret key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from carbonfed.privacy.he import PUBLIC_CONTEXT_FILE, load_public_context


def write_private(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` with mode 0600 (the folder is created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)
    return path


def _ca(now: dt.datetime, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Name, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "carbonfed local CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    return key, name, cert


def make_tls(out: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 7) -> dict[str, Path]:
    """A fresh CA and a server certificate signed by it for ``hosts`` (IPs or DNS names).

    Returns the paths of ``ca.crt``, ``server.crt`` and ``server.key`` (all mode 0600; the CA's
    private key is not kept: nothing else will ever be signed with it)."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, ca_name, ca_cert = _ca(now, days)
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
        "ca": write_private(out / "ca.crt", ca_cert.public_bytes(pem)),
        "cert": write_private(out / "server.crt", cert.public_bytes(pem)),
        "key": write_private(out / "server.key", key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
    }


def make_node_key(out: Path) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (EC P-384, OpenSSH format, as Flower expects):
    ``node.key`` (private, given to ``flower-supernode --auth-supernode-private-key``) and
    ``node.pub`` (public, registered with ``flwr supernode register``)."""
    key = ec.generate_private_key(ec.SECP384R1())
    priv = write_private(out / "node.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    pub = write_private(out / "node.pub", key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return priv, pub


def split_he_keys(keys_dir: Path, server_dir: Path) -> Path:
    """Copy ``public.ctx`` alone into ``server_dir`` (the ServerApp's keys-dir): the server side
    never gets a path under which ``secret.ctx`` lies."""
    load_public_context(keys_dir / PUBLIC_CONTEXT_FILE)        # refuses a file with a secret key
    server_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(server_dir, 0o700)
    write_private(server_dir / PUBLIC_CONTEXT_FILE, (keys_dir / PUBLIC_CONTEXT_FILE).read_bytes())
    return server_dir

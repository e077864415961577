"""TLS certificates and SuperNode keys for a deployment, made locally.

``make_credentials(folder, nodes=N, hosts=[...])`` writes:

- ``ca.crt`` / ``ca.key``: a self-signed certificate authority (keep the key
  off the federation's machines; only ``ca.crt`` is shared);
- ``server.crt`` / ``server.key``: the SuperLink's certificate, signed by the
  CA, valid for every name in ``hosts`` (DNS names or IP addresses: the
  addresses SuperNodes and ``flwr`` dial, e.g. ``127.0.0.1`` or the compose
  service name ``superlink``);
- ``node-<i>`` / ``node-<i>.pub``: one P-384 key pair per SuperNode, in the
  OpenSSH format Flower reads (``--auth-supernode-private-key``; the public
  key is what ``flwr supernode register`` records on the SuperLink).

Existing files are kept, so re-running adds nodes without invalidating the
keys already registered. This is the documented script of the deployment
guide (``fedmm credentials``); a consortium would use its own PKI instead.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 365


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only from the first byte on (never written first, chmodded after)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT; a new one gets 0600 whatever the umask
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an EC private key")
    return key


def _certificate(subject: str, public_key, issuer: x509.Name, signer, *, ca: bool,
                 hosts: Sequence[str] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer, hashes.SHA256())


def make_tls(folder: Path, hosts: list[str]) -> None:
    """CA plus a SuperLink certificate for ``hosts``; an existing server certificate
    is reissued when it does not cover every host asked for."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key_path, ca_crt_path = folder / "ca.key", folder / "ca.crt"
    if not ca_crt_path.exists():
        ca_key = ec.generate_private_key(ec.SECP384R1())
        _write_key(ca_key_path, ca_key)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmm federation CA")])
        ca_crt = _certificate("fedmm federation CA", ca_key.public_key(), name, ca_key, ca=True)
        ca_crt_path.write_bytes(ca_crt.public_bytes(serialization.Encoding.PEM))
    ca_crt = x509.load_pem_x509_certificate(ca_crt_path.read_bytes())
    crt_path = folder / "server.crt"
    if crt_path.exists() and set(hosts) <= set(certificate_hosts(crt_path)):
        return
    if not ca_key_path.exists():
        raise FileNotFoundError(f"{ca_key_path}: the CA key is needed to issue a server certificate")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_key(folder / "server.key", key)
    crt = _certificate(hosts[0], key.public_key(), ca_crt.subject, _load_key(ca_key_path), ca=False, hosts=hosts)
    crt_path.write_bytes(crt.public_bytes(serialization.Encoding.PEM))


def certificate_hosts(path: Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    crt = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        san = crt.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))]


def make_node_key(folder: Path, name: str) -> Path:
    """A SuperNode key pair ``<name>`` (private, OpenSSH) and ``<name>.pub``; kept if present."""
    folder.mkdir(parents=True, exist_ok=True)
    private = folder / name
    if not private.exists():
        key = ec.generate_private_key(ec.SECP384R1())
        write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                 serialization.NoEncryption()))
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        (folder / f"{name}.pub").write_bytes(public + f" fedmm-{name}\n".encode())
    return private


def make_credentials(folder: Path, nodes: int, hosts: list[str]) -> list[Path]:
    """TLS files for the SuperLink at ``hosts`` and keys ``node-0 .. node-<nodes-1>``."""
    if not hosts:
        raise ValueError("make_credentials: at least one SuperLink host name or address is needed")
    make_tls(folder, hosts)
    return [make_node_key(folder, f"node-{i}") for i in range(nodes)]

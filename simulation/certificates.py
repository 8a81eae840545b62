"""Certificates and SuperNode keys for a TLS deployment, made locally with `cryptography`.

Two kinds of credentials, with different owners:

- TLS (the consortium): a private certificate authority and a SuperLink server certificate
  signed by it. The SuperLink holds ``server.pem`` + ``server.key`` (+ ``ca.pem``); every
  hospital and every researcher's `flwr` CLI gets only ``ca.pem`` to verify the SuperLink.
  ``ca.key`` stays offline with whoever signs certificates.
- SuperNode authentication (each hospital): an ECDSA P-384 key pair in OpenSSH format, the
  format flwr 1.42 reads (``flower-supernode --auth-supernode-private-key`` loads an OpenSSH
  private key; ``flwr supernode register`` an OpenSSH public key on a NIST curve). The
  private key never leaves the hospital; the consortium registers the public key.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from omnifuse_model.site_config import host_problem
from simulation.safe_paths import check_name, create_private, create_public, inside

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class CertificatePaths:
    """Where `make_certificates` wrote the consortium's TLS files."""

    ca_cert: Path  # to every SuperNode (--root-certificates) and every flwr CLI
    ca_key: Path  # stays with the signer; never deployed
    server_cert: Path  # SuperLink --ssl-certfile
    server_key: Path  # SuperLink --ssl-keyfile


@dataclass(frozen=True)
class SuperNodeKeyPaths:
    """One hospital's SuperNode authentication key pair (OpenSSH format)."""

    private_key: Path  # flower-supernode --auth-supernode-private-key; stays at the site
    public_key: Path  # sent to the consortium: flwr supernode register <public_key>


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "OmniFuse-FL consortium"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _subject_alternative_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _validity(valid_days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=valid_days)


def _certificate_authority(
    valid_days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The consortium's self-signed CA (may sign leaf certificates only: path length 0)."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("OmniFuse-FL consortium CA")
    start, end = _validity(valid_days)
    usage = x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=True,
        crl_sign=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )
    return key, certificate


def _server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    valid_days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate for ``hosts``, signed by the CA."""
    key = ec.generate_private_key(ec.SECP384R1())
    start, end = _validity(valid_days)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_subject_alternative_names(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, certificate


def make_certificates(
    out_dir: Path,
    hosts: Sequence[str] = LOOPBACK_HOSTS,
    valid_days: int = 365,
    force: bool = False,
) -> CertificatePaths:
    """A CA and a SuperLink server certificate for ``hosts`` (IP addresses or DNS names).

    ``hosts`` must list every name SuperNodes and the CLI use in ``--superlink`` /
    ``address``: the certificate is checked against it (default: loopback only). Private
    keys are created 0600; existing files are a `FileExistsError` unless ``force``.
    """
    if not hosts:
        raise ValueError("make_certificates: hosts must name at least one IP address or DNS name")
    for host in hosts:
        problem = host_problem(host)
        if problem:
            raise ValueError(f"certificate host {problem}")
    out_dir = Path(out_dir)
    paths = CertificatePaths(
        ca_cert=out_dir / "ca.pem",
        ca_key=out_dir / "ca.key",
        server_cert=out_dir / "server.pem",
        server_key=out_dir / "server.key",
    )
    existing = [str(p) for p in asdict(paths).values() if p.exists() or p.is_symlink()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)}: already exist; not overwritten (--force)")
    ca_key, ca_cert = _certificate_authority(valid_days)
    server_key, server_cert = _server_certificate(ca_key, ca_cert, hosts, valid_days)
    pem = serialization.Encoding.PEM
    create_public(paths.ca_cert, ca_cert.public_bytes(pem), force)
    create_private(paths.ca_key, _key_pem(ca_key), force)
    create_public(paths.server_cert, server_cert.public_bytes(pem), force)
    create_private(paths.server_key, _key_pem(server_key), force)
    return paths


def make_supernode_keys(out_dir: Path, name: str, force: bool = False) -> SuperNodeKeyPaths:
    """An ECDSA P-384 key pair for SuperNode ``name``: ``{name}`` and ``{name}.pub``.

    Same files as ``ssh-keygen -t ecdsa -b 384 -N "" -f {name}``. ``name`` must be a site
    name (`simulation.safe_paths.SITE_NAME`: it becomes a file name in ``out_dir``); the
    private key is created 0600; existing files are a `FileExistsError` unless ``force``.
    """
    check_name(name, "SuperNode key name")
    out_dir = Path(out_dir)
    paths = SuperNodeKeyPaths(
        private_key=inside(out_dir, out_dir / name),
        public_key=inside(out_dir, out_dir / f"{name}.pub"),
    )
    existing = [str(p) for p in asdict(paths).values() if p.exists() or p.is_symlink()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)}: already exist; not overwritten (--force)")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    create_private(paths.private_key, private, force)
    create_public(paths.public_key, public + f" {name}\n".encode(), force)
    return paths

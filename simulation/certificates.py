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
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


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


def make_certificates(
    out_dir: Path, hosts: Sequence[str] = LOOPBACK_HOSTS, valid_days: int = 365
) -> CertificatePaths:
    """A CA and a SuperLink server certificate for ``hosts`` (IP addresses or DNS names).

    ``hosts`` must list every name SuperNodes and the CLI use in ``--superlink`` /
    ``address``: the certificate is checked against it (default: loopback only).
    """
    if not hosts:
        raise ValueError("make_certificates: hosts must name at least one IP address or DNS name")
    out_dir = Path(out_dir)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("OmniFuse-FL consortium CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
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

    pem = serialization.Encoding.PEM
    return CertificatePaths(
        ca_cert=_write(out_dir / "ca.pem", ca_cert.public_bytes(pem)),
        ca_key=_write(out_dir / "ca.key", _key_pem(ca_key), private=True),
        server_cert=_write(out_dir / "server.pem", server_cert.public_bytes(pem)),
        server_key=_write(out_dir / "server.key", _key_pem(server_key), private=True),
    )


def make_supernode_keys(out_dir: Path, name: str) -> SuperNodeKeyPaths:
    """An ECDSA P-384 key pair for SuperNode ``name``: ``{name}`` and ``{name}.pub``.

    Same files as ``ssh-keygen -t ecdsa -b 384 -N "" -f {name}``.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    out_dir = Path(out_dir)
    return SuperNodeKeyPaths(
        private_key=_write(out_dir / name, private, private=True),
        public_key=_write(out_dir / f"{name}.pub", public + f" {name}\n".encode()),
    )

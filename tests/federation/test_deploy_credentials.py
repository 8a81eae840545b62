"""Deployment credentials are what flwr 1.42 and a TLS client accept (no servers started)."""

from __future__ import annotations

import ipaddress
import ssl

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

from simulation.certificates import make_certificates, make_supernode_keys
from simulation.deploy import superlink_command, supernode_command


def test_server_certificate_is_signed_by_the_ca_for_loopback(tmp_path):
    certs = make_certificates(tmp_path)
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # the pair loads into a TLS server context; a client trusting only the CA accepts it
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(certs.server_cert, certs.server_key)
    ssl.create_default_context(cafile=str(certs.ca_cert))
    assert certs.ca_key.stat().st_mode & 0o077 == 0
    assert certs.server_key.stat().st_mode & 0o077 == 0


def test_certificate_names_other_hosts(tmp_path):
    certs = make_certificates(tmp_path, hosts=["superlink.consortium.example", "10.1.2.3"])
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["superlink.consortium.example"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]


def test_supernode_keys_are_in_the_format_flower_reads(tmp_path):
    keys = make_supernode_keys(tmp_path, "hospital_a")
    assert keys.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert try_load_public_key(keys.public_key)  # what `flwr supernode register` does
    private = load_ssh_private_key(keys.private_key.read_bytes(), None)  # flower-supernode
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    assert keys.private_key.stat().st_mode & 0o077 == 0


def test_command_lines_enable_tls_and_node_auth(tmp_path):
    certs = make_certificates(tmp_path)
    link = superlink_command(9443, certs, tmp_path / "state.db", tmp_path / "link.log")
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    assert link[link.index("--ssl-ca-certfile") + 1] == str(certs.ca_cert)
    node = supernode_command(
        "127.0.0.1:9443",
        9094,
        site_config=tmp_path / "site.toml",
        root_certificates=certs.ca_cert,
        private_key=tmp_path / "key",
    )
    assert "--insecure" not in node
    # quoted, or Flower would read a value ending in .toml as a node-config *file*
    site = (tmp_path / "site.toml").resolve()
    assert node[node.index("--node-config") + 1] == f'site-config="{site}"'

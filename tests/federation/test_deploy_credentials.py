"""Deployment credentials are what flwr 1.42 and a TLS client accept (no servers started)."""

from __future__ import annotations

import ipaddress
import ssl

import pytest
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


def _modes_at_creation(monkeypatch) -> int:
    """Files keep the mode they were created with: no later chmod, no umask narrowing."""
    import os

    monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: None)
    return os.umask(0)


def test_private_keys_are_created_0600_not_chmodded_later(tmp_path, monkeypatch):
    import os

    previous = _modes_at_creation(monkeypatch)
    try:
        keys = make_supernode_keys(tmp_path / "keys", "hospital_a")
        certs = make_certificates(tmp_path / "certs")
    finally:
        os.umask(previous)
    for private in (keys.private_key, certs.ca_key, certs.server_key):
        assert private.stat().st_mode & 0o777 == 0o600, private
    assert keys.public_key.stat().st_mode & 0o777 == 0o644


def test_existing_keys_are_never_overwritten_without_force(tmp_path, capsys):
    from simulation.cli import main

    keys = make_supernode_keys(tmp_path, "hospital_a")
    before = keys.private_key.read_bytes()
    with pytest.raises(FileExistsError, match="hospital_a"):
        make_supernode_keys(tmp_path, "hospital_a")
    assert keys.private_key.read_bytes() == before
    assert main(["deploy", "keys", "--out", str(tmp_path), "hospital_a"]) == 1
    assert "--force" in capsys.readouterr().err
    assert keys.private_key.read_bytes() == before
    assert main(["deploy", "keys", "--out", str(tmp_path), "--force", "hospital_a"]) == 0
    assert keys.private_key.read_bytes() != before
    assert keys.private_key.stat().st_mode & 0o077 == 0

    certs = make_certificates(tmp_path / "certs")
    ca_key = certs.ca_key.read_bytes()
    with pytest.raises(FileExistsError, match="ca.key"):
        make_certificates(tmp_path / "certs")
    assert certs.ca_key.read_bytes() == ca_key
    assert make_certificates(tmp_path / "certs", force=True).ca_key.read_bytes() != ca_key


@pytest.mark.parametrize("name", ["../../x", "..", "a/b", ".hidden", "x.pub"])
def test_key_names_cannot_leave_the_output_folder(tmp_path, capsys, name):
    from simulation.cli import main

    out = tmp_path / "a" / "b" / "keys"
    with pytest.raises(ValueError, match="SuperNode key name"):
        make_supernode_keys(out, name)
    assert main(["deploy", "keys", "--out", str(out), name]) == 1
    assert "SuperNode key name" in capsys.readouterr().err
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == []


def test_the_deployment_runner_fails_naming_the_site_the_server_app_named(tmp_path, monkeypatch):
    """`flwr run` exits 0 even when the ServerApp raised: the runner reads outcome.json."""
    import simulation.deploy as deploy
    from server.run_outcome import write_outcome

    class FakeDeployment:
        def __init__(self, work_dir):
            self.address = "127.0.0.1:1"

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            return None

        def start_superlink(self, node_auth):
            return None

        def run(self, run_config, timeout):
            run_dir = tmp_path / "work" / "run"
            run_dir.mkdir(parents=True)
            reason = (
                "sites failed or were rejected in every round: site_b (failed: training_failed)"
            )
            write_outcome(run_dir, "failed", reason, {"site_b": "failed: training_failed"})
            return 0

    monkeypatch.setattr(deploy, "LocalDeployment", FakeDeployment)
    monkeypatch.setattr(deploy, "scenario_sites", lambda _: {"site_a": None, "site_b": None})
    monkeypatch.setattr(deploy, "_start_sites", lambda *_: {"site_a": 1, "site_b": 2})
    with pytest.raises(deploy.DeploymentError, match=r"site_b \(failed: training_failed\)"):
        deploy.run_deployment_demo(tmp_path / "work", tmp_path, rounds=1)

"""`omnifuse deploy kit`: the consortium's and each site's folder, their permissions, a
site's private key in its own folder only, nothing written outside --out, no overwrite
without --force."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from omnifuse_model.site_config import load_site_config
from simulation.cli import main
from simulation.kit import KitOptions, write_kit
from simulation.safe_paths import UnsafePathError
from simulation.site_check import run_preflight
from tests.deployment.conftest import feature_scenario

SITES = ("site_0", "site_1")
SITE_FILES = {
    "ca.pem", "{s}", "{s}.pub", "site.toml", "approved_apps.toml", "start.sh",
    "omnifuse-{s}.service", "CHECKLIST.md",
}  # fmt: skip


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def kit(tmp_path) -> Path:
    scenario = feature_scenario(tmp_path / "scenario")
    out = tmp_path / "kit"
    options = KitOptions(superlink="fl.consortium.example:9092", extra_hosts=("127.0.0.1",))
    write_kit(scenario, out, options)
    return out


def test_layout_and_permissions(kit):
    consortium = kit / "consortium"
    assert {p.name for p in (consortium / "certs").iterdir()} == {
        "ca.pem", "ca.key", "server.pem", "server.key"
    }  # fmt: skip
    assert mode(consortium / "certs" / "ca.key") == 0o600
    assert mode(consortium / "certs" / "server.key") == 0o600
    for script in ("start_superlink.sh", "register_nodes.sh"):
        assert mode(consortium / script) == 0o755
        subprocess.run(["sh", "-n", str(consortium / script)], check=True)
    assert {p.name for p in (consortium / "node_keys").iterdir()} == {f"{s}.pub" for s in SITES}
    for site in SITES:
        folder = kit / "sites" / site
        assert {p.name for p in folder.iterdir()} == {n.format(s=site) for n in SITE_FILES}
        assert mode(folder / site) == 0o600
        assert mode(folder / "start.sh") == 0o755
        subprocess.run(["sh", "-n", str(folder / "start.sh")], check=True)
        assert (folder / f"{site}.pub").read_bytes() == (
            consortium / "node_keys" / f"{site}.pub"
        ).read_bytes()
        assert (folder / "ca.pem").read_bytes() == (consortium / "certs" / "ca.pem").read_bytes()


def test_a_site_private_key_lies_in_its_own_folder_only(kit):
    for site in SITES:
        secret = (kit / "sites" / site / site).read_bytes()
        holders = [p for p in kit.rglob("*") if p.is_file() and p.read_bytes() == secret]
        assert holders == [kit / "sites" / site / site]
    assert b"PRIVATE KEY" not in b"".join(
        p.read_bytes() for p in (kit / "consortium").rglob("*") if p.suffix == ".pub"
    )


def test_server_certificate_names_the_superlink_address(kit):
    pem = (kit / "consortium" / "certs" / "server.pem").read_bytes()
    names = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "fl.consortium.example" in names.value.get_values_for_type(x509.DNSName)
    script = (kit / "consortium" / "start_superlink.sh").read_text()
    assert "--enable-supernode-auth" in script and "--port 9092" in script
    register = (kit / "consortium" / "register_nodes.sh").read_text()
    assert all(f"node_keys/{s}.pub omnifuse --name {s}" in register for s in SITES)


def test_site_template_reads_back_and_passes_its_preflight(kit):
    folder = kit / "sites" / "site_0"
    site = load_site_config(folder / "site.toml")
    assert site.name == "site_0" and site.deployment is not None
    assert site.deployment.superlink == "fl.consortium.example:9092"
    assert site.deployment.root_certificates == folder / "ca.pem"
    assert site.deployment.auth_private_key == folder / "site_0"
    assert site.deployment.approved_apps == folder / "approved_apps.toml"
    assert run_preflight(site).ok
    unit = (folder / "omnifuse-site_0.service").read_text()
    assert "ExecStart=/opt/omnifuse-fl/site/start.sh" in unit and "KillMode=mixed" in unit
    assert "site start site.toml" in (folder / "start.sh").read_text()


def test_existing_files_are_kept_without_force(kit, tmp_path, capsys):
    key = kit / "sites" / "site_0" / "site_0"
    before = key.read_bytes()
    args = ["deploy", "kit", "--scenario", str(tmp_path / "scenario"), "--out", str(kit)]
    assert main(args) == 1
    assert "already exist" in capsys.readouterr().err
    assert key.read_bytes() == before
    assert main([*args, "--force"]) == 0
    assert key.read_bytes() != before and mode(key) == 0o600


def test_nothing_is_written_outside_out(tmp_path):
    scenario = feature_scenario(tmp_path / "scenario")
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "kit"
    out.mkdir()
    os.symlink(outside, out / "sites")  # a planted link that leads out of the kit
    with pytest.raises(UnsafePathError, match="outside the folder"):
        write_kit(scenario, out, KitOptions())
    assert list(outside.iterdir()) == []
    assert [p.name for p in out.iterdir()] == ["sites"]


def test_a_superlink_address_with_a_scheme_is_refused(tmp_path):
    scenario = feature_scenario(tmp_path / "scenario")
    with pytest.raises(ValueError, match="expected host:port"):
        write_kit(scenario, tmp_path / "kit", KitOptions(superlink="https://fl.example:9092"))
    assert not (tmp_path / "kit").exists()

"""The site config's [deployment] section: strict fields, paths relative to the file."""

from __future__ import annotations

import pytest

from omnifuse_model.site_config import SiteConfigError, load_site_config
from simulation.site_start import SiteStartError, deployment_of, supernode_command

SITE = """\
name = "hospital_a"
modalities = ["ehr"]

[data]
benchmark_dir = "data/in-hospital-mortality"

[deployment]
superlink = "fl.consortium.example:9092"
root_certificates = "ca.pem"
auth_private_key = "keys/hospital_a"
approved_apps = "approved_apps.toml"
"""


def test_paths_resolve_against_the_file_and_read_back(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text(SITE)
    site = load_site_config(path)
    deployment = site.deployment
    assert deployment.root_certificates == tmp_path / "ca.pem"
    assert deployment.auth_private_key == tmp_path / "keys" / "hospital_a"
    assert deployment.flwr_home == tmp_path / "flwr_home"
    assert deployment.approved_apps == tmp_path / "approved_apps.toml"
    assert (deployment.runtime_host, deployment.runtime_port) == ("127.0.0.1", 9094)
    again = tmp_path / "again.toml"
    again.write_text(site.to_toml())
    assert load_site_config(again) == site


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('superlink = "https://fl.example:9092"', "deployment.superlink"),
        ('superlink = "fl.example"', "deployment.superlink"),
        ('superlink = "fl.example:9092"\nruntime_port = 70000', "deployment.runtime_port"),
        ('superlink = "fl.example:9092"\nruntime_host = "10.0.0.5"', "deployment.runtime_host"),
        ('superlink = "fl.example:9092"\nsuperlnk = "x"', "deployment.superlnk"),
    ],
)
def test_bad_values_name_the_field(tmp_path, line, field):
    text = SITE.replace('superlink = "fl.consortium.example:9092"', line)
    path = tmp_path / "site.toml"
    path.write_text(text)
    with pytest.raises(SiteConfigError, match=f"field '{field}'"):
        load_site_config(path)


def test_supernode_command_carries_tls_auth_and_the_site(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text(SITE)
    site = load_site_config(path)
    command = supernode_command(path, deployment_of(site, path))
    flags = dict(zip(command[1::2], command[2::2], strict=False))
    assert flags["--superlink"] == "fl.consortium.example:9092"
    assert flags["--root-certificates"] == str(tmp_path / "ca.pem")
    assert flags["--auth-supernode-private-key"] == str(tmp_path / "keys" / "hospital_a")
    assert (flags["--host"], flags["--port"]) == ("127.0.0.1", "9094")
    assert flags["--node-config"] == f'site-config="{path}"'
    assert "--insecure" not in command


def test_start_without_a_deployment_section_is_refused(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text(SITE.split("[deployment]")[0])
    with pytest.raises(SiteStartError, match=r"no \[deployment\] section"):
        deployment_of(load_site_config(path), path)

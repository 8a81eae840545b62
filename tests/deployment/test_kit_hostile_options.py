"""Hostile values of `omnifuse deploy kit|certs` and of a site's [deployment] address: a
path, host or address that would be pasted into start.sh, the systemd unit, CHECKLIST.md or
a certificate is refused with one line naming the option, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulation.cli import main
from tests.deployment.conftest import feature_scenario


def _refused(capsys, argv: list[str], *needles: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--venv", "/opt/x$(touch /tmp/PWNED)"),
        ("--venv", "/opt/x`id`"),
        ("--venv", "/opt/x y"),
        ("--venv", "relative/venv"),
        ("--site-dir", "/opt/site;reboot"),
        ("--site-dir", "/opt/%h/site"),
        ("--site-dir", "/opt/../etc"),
        ("--superlink", "evil.com:99999"),
        ("--superlink", "evil.com:0"),
        ("--superlink", "bad-.example:9092"),
        ("--bind-host", "0.0.0.0 --evil"),
        ("--host", "bad host/../x"),
    ],
)
def test_kit_refuses_hostile_values(tmp_path, capsys, option, value):
    scenario = feature_scenario(tmp_path / "scenario")
    out = tmp_path / "kit"
    argv = ["deploy", "kit", "--scenario", str(scenario), "--out", str(out), f"{option}={value}"]
    _refused(capsys, argv, option, repr(value))
    assert not out.exists()


@pytest.mark.parametrize("host", ["", "bad host/../x", "a..b", "-x.example"])
def test_certs_refuse_a_host_that_is_no_name(tmp_path, capsys, host):
    out = tmp_path / "certs"
    _refused(capsys, ["deploy", "certs", "--out", str(out), f"--host={host}"], "--host")
    assert not out.exists()


@pytest.mark.parametrize("address", ["evil.com:99999", "evil.com:0", "[1:2:3]:9092"])
def test_validate_config_refuses_a_superlink_port_out_of_range(tmp_path, capsys, address):
    site = Path(feature_scenario(tmp_path / "scenario")) / "site_0.toml"
    site.write_text(
        site.read_text()
        + f'\n[deployment]\nsuperlink = "{address}"\nroot_certificates = "ca.pem"\n'
        + 'auth_private_key = "key"\n'
    )
    assert main(["validate-config", str(site)]) == 1
    out = capsys.readouterr().out
    assert "invalid" in out and "deployment.superlink" in out, out

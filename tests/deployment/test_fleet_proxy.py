"""The Control API out of the hospitals' reach: SuperLink on loopback, nginx exposing only
the Fleet API on the address hospitals dial.

flwr 1.42 serves the Fleet, Control and Runtime APIs from one port, so they cannot be bound
apart (checked below against the installed flwr). The loopback deployment plays the
consortium host on 127.0.0.1 and the "public" address on 127.0.0.2.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from server.audit_log import read_audit
from simulation.certificates import make_certificates
from simulation.cli import main as omnifuse
from simulation.deploy import (
    CONNECTION,
    LocalDeployment,
    completed_rounds,
    free_port,
    write_connection,
)
from simulation.fleet_proxy import (
    FLEET_PATHS,
    FleetProxy,
    ProxySettings,
    fleet_proxy_config,
)
from simulation.flower_processes import flower_bin

PUBLIC = "127.0.0.2"  # what a hospital (or anyone outside the consortium host) dials
needs_nginx = pytest.mark.skipif(
    shutil.which("nginx") is None and not Path("/usr/sbin/nginx").is_file(),
    reason="nginx is not installed (apt-get install nginx-light; .ci/run installs it)",
)


def _settings(tmp_path: Path, superlink: str = "127.0.0.1:9093", **changes) -> ProxySettings:
    certs = make_certificates(tmp_path / "certs", hosts=("127.0.0.1", "localhost", PUBLIC))
    values = dict(
        listen=f"{PUBLIC}:{free_port()}",
        superlink=superlink,
        certificate=certs.server_cert,
        certificate_key=certs.server_key,
        ca_certificate=certs.ca_cert,
        state_dir=tmp_path / "proxy",
    )
    return ProxySettings(**{**values, **changes})


def test_flwr_serves_every_api_from_one_port():
    """Why a proxy: flwr 1.42 has one --host/--port for all APIs; the old per-API address
    flags are deprecated; the Fleet API is exactly the paths the proxy forwards."""
    from flwr.superlink.routers.fleet.router import router as fleet

    assert {(r.path, tuple(sorted(r.methods))) for r in fleet.routes} == {
        (path, ("POST",)) for path in FLEET_PATHS
    }
    completed = subprocess.run(
        [flower_bin("flower-superlink"), "--help"], capture_output=True, text=True, check=False
    )
    help_text = " ".join(completed.stdout.split())
    assert "Deprecated. The Control API now operates over HTTP. Use `--host` and `--port`" in (
        help_text
    )
    assert "Deprecated. Use `--host` and `--port` for the Fleet HTTP API." in help_text


def test_config_forwards_only_fleet_paths_and_health(tmp_path):
    text = fleet_proxy_config(_settings(tmp_path))
    forwarded = [line.split()[2] for line in text.splitlines() if "location =" in line]
    assert forwarded == [*FLEET_PATHS, "/health"]
    assert "location / { return 404; }" in text
    assert "/v1/control" not in text and "/v1/runtime" not in text
    assert text.count("proxy_ssl_verify on;") == len(FLEET_PATHS) + 1


@needs_nginx
def test_nginx_accepts_the_config(tmp_path):
    FleetProxy(_settings(tmp_path)).check()  # `nginx -t`; raises FleetProxyError if not


def test_cli_writes_the_config_and_names_a_missing_file(tmp_path, capsys):
    settings = _settings(tmp_path)
    out = tmp_path / "kit" / "nginx.conf"
    args = ["deploy", "fleet-proxy", "--listen", "0.0.0.0:9092", "--out", str(out)]
    args += ["--cert", str(settings.certificate), "--key", str(settings.certificate_key)]
    args += ["--ca", str(settings.ca_certificate), "--state-dir", str(tmp_path / "state")]
    assert omnifuse([*args, "--user", "www-data"]) == 0
    assert "listen 0.0.0.0:9092 ssl;" in out.read_text()
    assert "user www-data;" in out.read_text()
    missing = [a if a != str(settings.certificate_key) else "/nope.key" for a in args]
    assert omnifuse(missing) == 1
    assert "--key /nope.key does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- on a real deployment


def _status(url: str, context: ssl.SSLContext, method: str = "POST") -> int:
    return httpx.request(method, url, content=b"", verify=context, timeout=10).status_code


def _assert_control_api_unreachable(deployment: LocalDeployment, proxy: FleetProxy) -> None:
    ca = ssl.create_default_context(cafile=str(deployment.certs.ca_cert))
    public = f"https://{proxy.settings.listen}"
    # 1. the SuperLink's own port is not open on the public address at all
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection((PUBLIC, deployment.port), timeout=5),
    ):
        pass
    # 2. through the proxy: Control and Runtime API, docs, tricks with dots -> nginx's 404
    blocked = [
        "/v1/control/start-run",
        "/v1/control/list-runs",
        "/v1/control/register-node",
        "/v1/control/list-nodes",
        "/v1/runtime/pull-messages",
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/%2e%2e/control/list-runs",
        "/v1/fleet/..%2Fcontrol/list-runs",
        "/v1/fleet//../control/list-runs",
        "/docs",
        "/openapi.json",
    ]
    for path in blocked:
        assert _status(public + path, ca) == 404, path
    assert _status(public + "/v1/fleet/get-run", ca, method="GET") == 403
    # ... while on the consortium host's loopback the same Control API path exists
    assert _status(f"https://{deployment.address}/v1/control/list-runs", ca) != 404
    # 3. the researcher's CLI pointed at the public address cannot list nodes or submit a run
    outside = deployment.work_dir / "outside_cli"
    write_connection(outside, proxy.settings.listen, deployment.certs.ca_cert)
    listed = deployment.flwr("supernode", "list", CONNECTION, flwr_home=outside)
    assert listed.returncode != 0, listed.stdout
    submitted = deployment.flwr("run", str(deployment.app_dir), CONNECTION, flwr_home=outside)
    assert submitted.returncode != 0, submitted.stdout


def _runs(deployment: LocalDeployment) -> list:
    completed = deployment.flwr("ls", CONNECTION, "--format", "json")
    text = completed.stdout
    assert completed.returncode == 0, text + completed.stderr
    return json.loads(text[text.index("{") :])["runs"]


@needs_nginx
@pytest.mark.slow
@pytest.mark.integration
def test_hospitals_reach_only_the_fleet_api_and_still_train(tmp_path, two_site_scenario):
    scenario = two_site_scenario
    run_dir = tmp_path / "deployment" / "run"
    with LocalDeployment(tmp_path / "deployment") as deployment:
        hosts = ("127.0.0.1", "localhost", PUBLIC)  # the public name is in the certificate
        deployment.certs = make_certificates(deployment.certs.ca_cert.parent, hosts, force=True)
        deployment.start_superlink(node_auth=True)
        settings = ProxySettings(
            listen=f"{PUBLIC}:{free_port()}",
            superlink=deployment.address,
            certificate=deployment.certs.server_cert,
            certificate_key=deployment.certs.server_key,
            ca_certificate=deployment.certs.ca_cert,
            state_dir=tmp_path / "proxy",
        )
        with FleetProxy(settings) as proxy:
            _assert_control_api_unreachable(deployment, proxy)
            nodes = {}
            for site in ("site_0", "site_1"):
                keys = deployment.make_keys(site)
                nodes[site] = deployment.register(keys.public_key, name=site)
                deployment.start_supernode(
                    site, scenario / f"{site}.toml", keys.private_key, superlink=settings.listen
                )
            deployment.wait_online(set(nodes.values()))
            returncode = deployment.run(
                {
                    "scenario-dir": str(scenario),
                    "run-dir": str(run_dir),
                    "num-server-rounds": 1,
                    "min-available-nodes": 2,
                    "min-train-nodes": 2,
                    "min-evaluate-nodes": 2,
                    "seed": 1,
                },
                timeout=900,
            )
            runs = _runs(deployment)
        access = (settings.state_dir / "access.log").read_text()
    run_log = (deployment.work_dir / "flwr_run.log").read_text(errors="replace")
    assert returncode == 0, run_log[-4000:]
    assert completed_rounds(run_dir) == 1
    assert sorted(row.site for row in read_audit(run_dir)) == ["site_0", "site_1"]
    assert len(runs) == 1  # the run submitted through the proxy was never created
    # the SuperNodes' traffic went through the proxy, and nginx forwarded Fleet API paths only
    forwarded = [_request_path(line) for line in access.splitlines() if "upstream=-" not in line]
    assert {"/v1/fleet/pull-messages", "/v1/fleet/push-object", "/v1/fleet/get-fab"} <= set(
        forwarded
    ), access[-3000:]
    assert set(forwarded) <= {*FLEET_PATHS, "/health"}, access[-3000:]


def _request_path(access_line: str) -> str:
    """The path of an access-log line: `ADDR "POST /path HTTP/1.1" STATUS upstream=...`."""
    return access_line.split('"')[1].split()[1]

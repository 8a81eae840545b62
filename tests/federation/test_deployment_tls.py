"""A real deployment on 127.0.0.1: TLS SuperLink, SuperNode authentication, `flwr run`.

One SuperLink (TLS on every API, ``--enable-supernode-auth``) and two registered SuperNodes
are shared by the tests of this module; ports are picked at runtime and everything started
is stopped in the fixture's teardown, also when a test fails.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.synthetic import SyntheticFeatureConfig, SyntheticModality
from server.audit_log import read_audit
from simulation.deploy import LocalDeployment, completed_rounds, write_connection
from simulation.scenarios import write_feature_scenario

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SITES = ("site_0", "site_1")
REFUSED_WITHIN_S = 90  # a refused SuperNode must have exited by then (loaded 2-core machine)


def _scenario(directory: Path) -> Path:
    data = SyntheticFeatureConfig(
        modalities=[
            SyntheticModality(name="ehr", dim=8, signal=1.5, noise=0.5, missing_rate=0.1),
            SyntheticModality(name="cxr", dim=8, signal=1.0, noise=1.0, missing_rate=0.3),
        ]
    )
    model = OmniFuseConfig(
        modalities=data.modality_specs(), task="binary", d=8, cra_hidden=(16, 8), num_blocks=1
    )
    write_feature_scenario(
        directory,
        data,
        model,
        site_modalities=[["ehr", "cxr"], ["ehr"]],
        site_sizes=[(80, 40), (60, 40)],
        test_size=100,
    )
    return directory


@dataclass
class Federation:
    link: LocalDeployment
    scenario_dir: Path
    node_ids: dict[str, int]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """SuperLink with TLS + node auth, two registered SuperNodes online; all stopped after."""
    root = tmp_path_factory.mktemp("deploy")
    scenario = _scenario(root / "scenario")
    link = LocalDeployment(root / "deployment")
    try:
        link.start_superlink(node_auth=True)
        node_ids = {}
        for site in SITES:
            keys = link.make_keys(site)
            node_ids[site] = link.register(keys.public_key, name=site)
            link.start_supernode(site, scenario / f"{site}.toml", keys.private_key)
        link.wait_online(set(node_ids.values()))
        yield Federation(link, scenario, node_ids)
    finally:
        link.stop_all()


def _refused(process) -> str:
    """Wait for a SuperNode that should be refused to exit; its log."""
    returncode = process.popen.wait(timeout=REFUSED_WITHIN_S)
    text = process.log_text()
    assert returncode != 0, text
    # flwr 1.42: "Exit Code: 305" = SUPERNODE_CONNECTION_ERROR, the node gave up for good
    assert "Exit Code: 305" in text, text
    return text


def test_one_round_over_tls_with_authenticated_supernodes(federation):
    deployment = federation.link
    run_dir = deployment.work_dir / "run"
    returncode = deployment.run(
        {
            "scenario-dir": str(federation.scenario_dir),
            "run-dir": str(run_dir),
            "num-server-rounds": 1,
            "min-available-nodes": 2,
            "min-train-nodes": 2,
            "min-evaluate-nodes": 2,
            "seed": 1,
        },
        timeout=600,
    )
    run_log = (deployment.work_dir / "flwr_run.log").read_text(errors="replace")
    assert returncode == 0, run_log[-4000:]
    assert completed_rounds(run_dir) == 1, run_log[-4000:]
    assert (run_dir / "checkpoints" / "round_0001" / "model.safetensors").is_file()
    history = json.loads((run_dir / "metrics.json").read_text())
    assert set(history) == {"1"}
    assert history["1"]["failed_or_rejected"] == []
    rows = read_audit(run_dir)
    assert sorted((row.round, row.site) for row in rows) == [(1, site) for site in SITES]
    assert all(row.update_status == "accepted" for row in rows)
    # both SuperNodes took part and are still the only (online) nodes of the federation
    assert deployment.list_nodes() == dict.fromkeys(federation.node_ids.values(), "online")
    assert "Uvicorn running on https://" in (deployment.work_dir / "superlink.out").read_text()


def test_supernode_with_an_unregistered_key_is_refused(federation):
    deployment = federation.link
    before = deployment.list_nodes()
    intruder = deployment.make_keys("intruder")  # valid key, never registered
    process = deployment.start_supernode(
        "intruder",
        federation.scenario_dir / "site_0.toml",
        intruder.private_key,
        max_retries=2,
    )
    text = _refused(process)
    assert "Failed to activate SuperNode" in text, text
    assert "SuperNode ID:" not in text  # it never got a node id
    assert deployment.list_nodes() == before  # and never appeared at the SuperLink
    superlink_log = (deployment.work_dir / "superlink.log").read_text(errors="replace")
    assert "No SuperNode found with the given public key" in superlink_log


def test_clients_without_the_ca_cannot_connect(federation):
    deployment = federation.link
    # A registered key does not help a node that cannot verify the SuperLink's certificate.
    keys = deployment.make_keys("site_without_ca")
    node_id = deployment.register(keys.public_key, name="site_without_ca")
    no_ca = deployment.start_supernode(
        "site_without_ca",
        federation.scenario_dir / "site_0.toml",
        keys.private_key,
        trust_ca=False,
        max_retries=2,
    )
    # Plain HTTP (`--insecure`) to the TLS port: Flower forbids node auth without TLS, so
    # this node carries no key; it must fail on the transport before any authentication.
    plain = deployment.start_supernode(
        "plain_http", federation.scenario_dir / "site_1.toml", insecure=True, max_retries=2
    )
    assert "CERTIFICATE_VERIFY_FAILED" in _refused(no_ca)
    _refused(plain)
    nodes = deployment.list_nodes()
    assert nodes[node_id] == "registered"  # registered, never online
    assert len(nodes) == len(SITES) + 1

    # The researcher's CLI without the CA in its connection is refused as well.
    cli_home = deployment.work_dir / "cli_without_ca"
    write_connection(cli_home, deployment.address, root_certificates=None)
    completed = deployment.flwr("supernode", "list", flwr_home=cli_home)
    assert completed.returncode != 0
    assert "Connection to the SuperLink is unavailable" in completed.stdout + completed.stderr

    # Any HTTPS client: the system CA store does not trust the consortium CA; plain HTTP
    # gets no answer; with the CA the same endpoint answers.
    url = f"https://{deployment.address}/health"
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(url, timeout=5)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{deployment.address}/health", timeout=5)
    trusted = ssl.create_default_context(cafile=str(deployment.certs.ca_cert))
    assert httpx.get(url, verify=trusted, timeout=5).is_success

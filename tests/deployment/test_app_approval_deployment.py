"""Code approval at the site, on a real loopback deployment (TLS SuperLink, node auth).

Two SuperNodes run `simulation.approved_supernode` with their own allowlists: site_0 approved
the app version the researcher submits, site_1 approved only another version. One `flwr run`
shows both sides: site_0 trains round 1; site_1 refuses the app before any of its code runs,
says why in its own log only, and the server sees Flower's generic refusal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.audit_log import read_audit
from simulation.app_approval import add_approval, fab_sha256
from simulation.approved_supernode import REFUSED_LOG_PREFIX
from simulation.deploy import LocalDeployment

pytestmark = [pytest.mark.slow, pytest.mark.integration]

GENERIC_REFUSAL = "The FAB could not be verified."
OTHER_VERSION = "b" * 64  # an app version site_1 approved; not the one submitted


def _server_side_text(deployment: LocalDeployment, run_dir: Path) -> str:
    """Everything the consortium side has: ServerApp output, SuperLink log, run files."""
    files = [deployment.work_dir / "flwr_run.log", deployment.work_dir / "superlink.log"]
    files += [deployment.work_dir / "superlink.out"]
    files += sorted(path for path in run_dir.rglob("*") if path.suffix in {".json", ".csv"})
    return "\n".join(path.read_text(errors="replace") for path in files if path.is_file())


def test_unapproved_app_is_refused_at_the_site_approved_one_trains(tmp_path, two_site_scenario):
    scenario = two_site_scenario
    run_dir = tmp_path / "deployment" / "run"
    with LocalDeployment(tmp_path / "deployment") as deployment:
        submitted = fab_sha256(app_dir=deployment.app_dir)  # what `flwr run` will send
        allowlists = {"site_0": submitted, "site_1": OTHER_VERSION}
        nodes, processes = {}, {}
        deployment.start_superlink(node_auth=True)
        for site, approved in allowlists.items():
            allowlist = tmp_path / site / "approved_apps.toml"
            add_approval(allowlist, approved, note=f"{site}'s reviewed version")
            keys = deployment.make_keys(site)
            nodes[site] = deployment.register(keys.public_key, name=site)
            processes[site] = deployment.start_supernode(
                site, scenario / f"{site}.toml", keys.private_key, approved_apps=allowlist
            )
        deployment.wait_online(set(nodes.values()))
        returncode = deployment.run(
            {
                "scenario-dir": str(scenario),
                "run-dir": str(run_dir),
                "num-server-rounds": 1,
                "min-available-nodes": 2,
                "min-train-nodes": 1,
                "min-evaluate-nodes": 1,
                "seed": 1,
                "round-timeout": 300.0,
            },
            timeout=900,
        )
        logs = {site: process.log_text() for site, process in processes.items()}
    server_text = _server_side_text(deployment, run_dir)
    run_log = (deployment.work_dir / "flwr_run.log").read_text(errors="replace")

    # site_1: refused for a named reason, in its own log, before any message was accepted
    refused = logs["site_1"]
    assert REFUSED_LOG_PREFIX in refused, refused[-4000:]
    assert f"FAB sha256 {submitted} is not in this site's approved apps" in refused
    assert str(tmp_path / "site_1" / "approved_apps.toml") in refused
    assert "FAB verification failed" in refused  # flwr's own verifier said no
    assert "Received successfully" not in refused  # no task was created: no ClientApp ran
    assert "App approved by this site" not in refused

    # site_0: approved the same bundle and trained round 1
    assert "App approved by this site: run" in logs["site_0"], logs["site_0"][-4000:]
    assert REFUSED_LOG_PREFIX not in logs["site_0"]
    rows = read_audit(run_dir)
    assert [(row.round, row.site, row.update_status) for row in rows if row.site == "site_0"] == [
        (1, "site_0", "accepted")
    ], run_log[-4000:]

    # the server: a generic refusal from site_1's node, none of the site's reasons
    assert GENERIC_REFUSAL in server_text, run_log[-4000:]
    # (the app's own hash is no secret: the server submitted that bundle)
    for private in (
        REFUSED_LOG_PREFIX,
        "approved apps",
        "approved_apps.toml",
        str(tmp_path / "site_1"),
    ):
        assert private not in server_text, private
    assert f"refused: error_reply:{GENERIC_REFUSAL}" in run_log
    history = json.loads((run_dir / "metrics.json").read_text())
    refusals = history["1"]["failed_or_rejected"]
    assert [(entry["status"], entry["reason"]) for entry in refusals] == [
        ("failed", GENERIC_REFUSAL)
    ]
    # a site that failed every round fails the run (issue #9). Read from outcome.json: the
    # exit code of `flwr run --stream` was 1 in one such run and 0 in another (flwr 1.42)
    outcome = json.loads((run_dir / "outcome.json").read_text())
    assert outcome["status"] == "failed", outcome
    assert list(outcome["failing"].values()) == [
        f"registration error_reply:{GENERIC_REFUSAL}; failed: {GENERIC_REFUSAL}"
    ]
    assert "SitesFailedError" in run_log, returncode

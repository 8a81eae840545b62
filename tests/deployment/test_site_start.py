"""`omnifuse site start`: refuses to start after a failed preflight; with a kit, two sites
join a real TLS SuperLink with SuperNode authentication on 127.0.0.1, a round completes, and
SIGTERM stops each launcher's whole process tree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from omnifuse_model.site_config import load_site_config
from simulation.app_approval import add_approval, fab_sha256
from simulation.certificates import CertificatePaths
from simulation.deploy import LocalDeployment, completed_rounds, free_port, write_connection
from simulation.flower_processes import REPO_ROOT, stop_process
from simulation.kit import KitOptions, write_kit
from simulation.site_start import SiteStartError, start_site
from tests.deployment.conftest import feature_scenario

SITES = ("site_0", "site_1")
STOPPED_WITHIN_S = 60


def test_a_failed_preflight_starts_nothing(tmp_path):
    scenario = feature_scenario(tmp_path / "scenario")
    port = free_port()  # nothing listens there
    write_kit(scenario, tmp_path / "kit", KitOptions(superlink=f"127.0.0.1:{port}"))
    path = tmp_path / "kit" / "sites" / "site_0" / "site.toml"
    with pytest.raises(SiteStartError, match=r"preflight failed \(deployment.superlink\)"):
        start_site(path)
    assert psutil.Process().children(recursive=True) == []


def _with_runtime_port(path: Path) -> None:
    """Give a kit's site its own free Runtime API port (two sites share this machine)."""
    site = load_site_config(path)
    deployment = site.deployment.model_copy(update={"runtime_port": free_port()})
    path.write_text(site.model_copy(update={"deployment": deployment}).to_toml())


def _launch(path: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "simulation.cli", "site", "start", str(path)],
            env=env,
            cwd=path.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _kit_deployment(root: Path) -> tuple[LocalDeployment, Path, Path]:
    """A loopback SuperLink that uses the kit's certificates; (deployment, kit, scenario)."""
    scenario = feature_scenario(root / "scenario")
    link = LocalDeployment(root / "consortium_host")
    kit = root / "kit"
    write_kit(scenario, kit, KitOptions(superlink=link.address, bind_host="127.0.0.1"))
    certs = kit / "consortium" / "certs"
    link.certs = CertificatePaths(
        certs / "ca.pem", certs / "ca.key", certs / "server.pem", certs / "server.key"
    )
    write_connection(link.flwr_home, link.address, link.certs.ca_cert)
    return link, kit, scenario


@pytest.mark.slow
@pytest.mark.integration
def test_two_sites_started_from_their_kits_train_and_stop_on_sigterm(tmp_path):
    link, kit, scenario = _kit_deployment(tmp_path)
    launchers: dict[str, subprocess.Popen] = {}
    try:
        link.start_superlink(node_auth=True)
        node_ids = {
            site: link.register(kit / "consortium" / "node_keys" / f"{site}.pub", name=site)
            for site in SITES
        }
        app_hash = fab_sha256(REPO_ROOT)  # the app `flwr run` submits below
        for site in SITES:
            add_approval(kit / "sites" / site / "approved_apps.toml", app_hash, note="test")
            path = kit / "sites" / site / "site.toml"
            _with_runtime_port(path)
            launchers[site] = _launch(path, tmp_path / f"{site}.log")
        link.wait_online(set(node_ids.values()), timeout=180)
        run_dir = tmp_path / "run"
        returncode = link.run(
            {
                "scenario-dir": str(scenario),
                "run-dir": str(run_dir),
                "num-server-rounds": 1,
                "min-available-nodes": 2,
                "min-train-nodes": 2,
                "min-evaluate-nodes": 2,
                "seed": 1,
            },
            timeout=600,
        )
        run_log = (link.work_dir / "flwr_run.log").read_text(errors="replace")
        assert returncode == 0 and completed_rounds(run_dir) == 1, run_log[-4000:]
        for site, launcher in launchers.items():
            log = (tmp_path / f"{site}.log").read_text(errors="replace")
            assert "can take part" in log and "SuperNode ID" in log, log[-3000:]
            tree = psutil.Process(launcher.pid).children(recursive=True)
            # the SuperNode runs behind the site's approval gate
            assert any("simulation.approved_supernode" in " ".join(p.cmdline()) for p in tree)
            started = time.monotonic()
            launcher.send_signal(signal.SIGTERM)
            assert launcher.wait(timeout=STOPPED_WITHIN_S) == 128 + signal.SIGTERM
            assert time.monotonic() - started < STOPPED_WITHIN_S
            assert not [p for p in tree if p.is_running() and p.status() != "zombie"], log
    finally:
        for launcher in launchers.values():
            stop_process(launcher)
        link.stop_all()

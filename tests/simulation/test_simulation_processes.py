"""The processes of a real simulation (`flwr run` -> SuperLink -> flower-superexec ->
flwr-simulation -> Ray GCS, raylet, ClientApp actors): loopback only, and all stopped when
`omnifuse federate` gets SIGTERM."""

from __future__ import annotations

import ipaddress
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.synthetic import SyntheticFeatureConfig, SyntheticModality
from simulation.federation import run_federation
from simulation.scenarios import write_feature_scenario

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]


def _scenario(directory: Path) -> Path:
    data = SyntheticFeatureConfig(
        modalities=[
            SyntheticModality(name="ehr", dim=8, signal=1.5, noise=0.5, missing_rate=0.1),
            SyntheticModality(name="cxr", dim=8, signal=1.0, noise=1.0, missing_rate=0.4),
        ]
    )
    model = OmniFuseConfig(
        modalities=data.modality_specs(), task="binary", d=8, cra_hidden=(16, 8), num_blocks=2
    )
    write_feature_scenario(
        directory,
        data,
        model,
        site_modalities=[["ehr", "cxr"], ["ehr"], ["ehr", "cxr"]],
        site_sizes=[(60, 30), (60, 30), (60, 30)],
        test_size=60,
    )
    return directory


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _listening(root: int) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening socket in ``root``'s process tree."""
    seen = set()
    try:
        tree = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return seen
    for process in tree:
        try:
            cmdline = process.cmdline()
            script = Path(cmdline[1]).name if len(cmdline) > 1 else ""
            name = f"{process.name()} {script[:40]}"
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN:
                    seen.add((name, connection.laddr.ip, connection.laddr.port))
        except psutil.Error:
            continue
    return seen


def test_every_process_of_a_simulation_listens_on_loopback_only(tmp_path):
    scenario = _scenario(tmp_path / "scenario")
    config = {"scenario-dir": str(scenario), "run-dir": str(tmp_path / "run")}
    config |= {"num-server-rounds": 2, "seed": 1, "local-epochs": 1}
    errors: list[BaseException] = []

    def federate() -> None:
        try:
            run_federation(config, 3, tmp_path / "flwr", http_port=39291, timeout=600)
        except BaseException as error:
            errors.append(error)

    runner = threading.Thread(target=federate)
    runner.start()
    seen: set[tuple[str, str, int]] = set()
    while runner.is_alive():
        seen |= _listening(psutil.Process().pid)
        time.sleep(0.3)
    runner.join()
    assert not errors, errors
    print("listening sockets seen:", *sorted(seen), sep="\n  ")
    names = " ".join(name for name, _, _ in seen)
    assert "raylet" in names and "gcs_server" in names, f"Ray never seen listening: {seen}"
    assert "flower-superlink" in names and "ClientAppActor" in names, seen
    exposed = sorted(s for s in seen if not _is_loopback(s[1]))
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_sigterm_to_federate_stops_every_process_it_started(tmp_path):
    scenario = _scenario(tmp_path / "scenario")
    command = [
        *(sys.executable, "-m", "simulation.cli", "federate", "--scenario", str(scenario)),
        *("--run-dir", str(tmp_path / "run"), "--rounds", "50", "--port", "39292"),
        *("--work-dir", str(tmp_path / "flwr")),
    ]
    cli = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    tree: list[psutil.Process] = []
    while time.monotonic() < deadline and cli.poll() is None:
        tree = psutil.Process(cli.pid).children(recursive=True)
        if any("raylet" in p.name() for p in tree if p.is_running()):
            break
        time.sleep(0.5)
    assert cli.poll() is None and tree, "the simulation engine never started"
    time.sleep(3)  # let the ClientApp actors start as well
    tree = psutil.Process(cli.pid).children(recursive=True)
    print("process tree at SIGTERM:", *sorted({p.name() for p in tree}), sep="\n  ")

    cli.send_signal(signal.SIGTERM)
    _, err = cli.communicate(timeout=120)

    assert cli.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err
    time.sleep(1)
    left = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"still running after SIGTERM: {[(p.pid, p.name()) for p in left]}"

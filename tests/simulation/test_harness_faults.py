"""Faults in the harness end cleanly: a held port is refused (never reused), a SuperLink left
by a killed run on the same work dir is stopped, process trees are stopped whole, and
`deploy demo` keys the sites of a partitioned scenario by their names."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.synthetic import SyntheticFeatureConfig, SyntheticModality
from simulation.cli import main
from simulation.deploy import scenario_sites
from simulation.federation import (
    DATABASE,
    OrphanSuperLinkError,
    check_port_free,
    stop_orphan_superlinks,
)
from simulation.flower_processes import stop_descendants, stop_process
from simulation.partition import PartitionConfig, default_site_plans, partition
from simulation.scenarios import write_feature_scenario
from simulation.synthetic_mimic.writer import SyntheticMimicConfig, write_synthetic_mimic


@pytest.fixture
def listener():
    """A socket listening on a free loopback port (a stand-in for a stray SuperLink)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def test_a_held_port_is_refused_naming_its_owner(listener):
    with pytest.raises(OrphanSuperLinkError, match=rf"127.0.0.1:{listener} is already in use"):
        check_port_free(listener)


def test_federate_refuses_a_held_port_before_starting_anything(listener, tmp_path, capsys):
    data = SyntheticFeatureConfig(
        modalities=[
            SyntheticModality(name=n, dim=2, signal=1.0, noise=1.0, missing_rate=0.1)
            for n in ("x", "y")
        ]
    )
    model = OmniFuseConfig(modalities=data.modality_specs(), task="binary", d=8)
    scenario = tmp_path / "scenario"
    write_feature_scenario(scenario, data, model, [["x", "y"]], [(10, 5)], test_size=10)
    work = tmp_path / "work"
    code = main(
        [
            *("federate", "--scenario", str(scenario), "--run-dir", str(tmp_path / "run")),
            *("--work-dir", str(work), "--port", str(listener)),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and f"127.0.0.1:{listener} is already in use" in err
    assert "--port" in err and len(err.strip().splitlines()) == 1, err
    assert not (work / "superlink.log").exists()


def _fake_superlink(folder: Path, database: Path) -> subprocess.Popen:
    """A process whose command line looks like `flower-superlink --database DATABASE`,
    with a child of its own (as the SuperLink has flower-superexec)."""
    script = folder / "flower-superlink"
    script.write_text(
        f"#!{sys.executable}\n"
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "time.sleep(120)\n"
    )
    script.chmod(0o755)
    process = subprocess.Popen([str(script), "--database", str(database)])
    deadline = time.monotonic() + 10
    while not psutil.Process(process.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return process


def test_an_orphan_superlink_on_our_work_dir_is_stopped_with_its_tree(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    orphan = _fake_superlink(ours, ours / DATABASE)
    stranger = _fake_superlink(theirs, theirs / DATABASE)
    orphan_child = psutil.Process(orphan.pid).children()[0]
    try:
        assert stop_orphan_superlinks(ours) == [orphan.pid]
        assert orphan.wait(timeout=10) is not None
        assert not orphan_child.is_running() or orphan_child.status() == psutil.STATUS_ZOMBIE
        assert stranger.poll() is None, "a SuperLink of another work dir was stopped"
    finally:
        stop_process(stranger)
        stop_process(orphan)


def test_stop_descendants_stops_grandchildren_in_other_sessions():
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time;"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
            " start_new_session=True); time.sleep(120)",
        ]
    )
    deadline = time.monotonic() + 10
    while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = psutil.Process(parent.pid).children()[0]
    assert grandchild.pid != parent.pid and os.getsid(grandchild.pid) != os.getsid(parent.pid)
    try:
        assert stop_descendants(parent.pid) == 1
        assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE
    finally:
        stop_process(parent)
    assert parent.poll() is not None


def test_deploy_demo_keys_partitioned_sites_by_name(tmp_path):
    data = tmp_path / "data"
    write_synthetic_mimic(
        SyntheticMimicConfig(num_stays=40, seed=2, image_size=32), data, progress=False
    )
    partition(PartitionConfig(data_dir=data, sites=default_site_plans(3)), tmp_path / "scenario")
    sites = scenario_sites(tmp_path / "scenario")
    assert list(sites) == ["hospital_a", "hospital_b", "hospital_c"]
    assert all(path.name == "site.toml" for path in sites.values())
    assert sites["hospital_b"] == tmp_path / "scenario" / "hospital_b" / "site.toml"

    twin = tmp_path / "scenario" / "hospital_a2"
    twin.mkdir()
    (twin / "site.toml").write_text((sites["hospital_a"]).read_text())
    scenario = json.loads((tmp_path / "scenario" / "scenario.json").read_text())
    scenario["site_configs"].append("hospital_a2/site.toml")
    (tmp_path / "scenario" / "scenario.json").write_text(json.dumps(scenario))
    with pytest.raises(ValueError, match="'hospital_a' is also the name in"):
        scenario_sites(tmp_path / "scenario")

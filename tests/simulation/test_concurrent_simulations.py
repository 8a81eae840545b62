"""Two `omnifuse federate` runs started at the same moment on one machine both finish with
their own results: each picks a free SuperLink port and keeps its Flower state (FLWR_HOME,
SuperLink database, logs) under its own run directory."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.synthetic import SyntheticFeatureConfig, SyntheticModality
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
        modalities=data.modality_specs(), task="binary", d=8, cra_hidden=(16, 8), num_blocks=1
    )
    write_feature_scenario(
        directory, data, model, [["ehr", "cxr"], ["ehr"]], [(40, 20), (40, 20)], test_size=40
    )
    return directory


def test_two_simulations_at_once_both_finish_with_their_own_results(tmp_path):
    scenario = _scenario(tmp_path / "scenario")
    runs = {name: tmp_path / name for name in ("first", "second")}
    processes = {
        name: subprocess.Popen(
            [
                *(sys.executable, "-m", "simulation.cli", "federate"),
                *("--scenario", str(scenario), "--run-dir", str(run_dir), "--rounds", "2"),
                *("--run-config", f"seed={index}"),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index, (name, run_dir) in enumerate(runs.items())
    }
    outputs = {name: process.communicate(timeout=900)[0] for name, process in processes.items()}
    for name, process in processes.items():
        assert process.returncode == 0, f"{name}:\n{outputs[name]}"
        assert "round 2 of 2" in outputs[name] and "Federation summary" in outputs[name]
    ports = set()
    for name, run_dir in runs.items():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert sorted(metrics) == ["1", "2"], (name, sorted(metrics))
        flwr_home = tomllib.loads((run_dir / "flwr" / "flwr_home" / "config.toml").read_text())
        (connection,) = [v for k, v in flwr_home["superlink"].items() if isinstance(v, dict)]
        ports.add(connection["address"])
        assert (run_dir / "flwr" / "superlink_state.db").exists()
    assert len(ports) == 2, f"both runs used {ports}"
    first = json.loads((runs["first"] / "metrics.json").read_text())
    second = json.loads((runs["second"] / "metrics.json").read_text())
    assert first != second, "the two runs (different seeds) wrote identical metrics"

"""Whole federations through the real Flower simulation engine (`flwr run`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.synthetic import SyntheticFeatureConfig, SyntheticModality
from server.audit_log import read_audit
from simulation.federation import FederationError, run_federation
from simulation.scenarios import write_feature_scenario

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _scenario(directory: Path) -> Path:
    data = SyntheticFeatureConfig(
        modalities=[
            SyntheticModality(name="ehr", dim=8, signal=1.5, noise=0.5, missing_rate=0.1),
            SyntheticModality(name="cxr", dim=8, signal=1.0, noise=1.0, missing_rate=0.4),
            SyntheticModality(name="rep", dim=8, signal=0.2, noise=3.0, missing_rate=0.3),
        ]
    )
    model = OmniFuseConfig(
        modalities=data.modality_specs(), task="binary", d=8, cra_hidden=(16, 8), num_blocks=2
    )
    write_feature_scenario(
        directory,
        data,
        model,
        site_modalities=[["ehr", "cxr", "rep"], ["ehr", "cxr"], ["ehr", "rep"]],
        site_sizes=[(200, 80), (150, 60), (12, 60)],  # the last site is tiny: suppression
        test_size=300,
    )
    return directory


def _run(tmp: Path, name: str, rounds: int, resume: bool = False) -> Path:
    run_dir = tmp / "run"
    config: dict[str, object] = {
        "scenario-dir": str(tmp / "scenario"),
        "run-dir": str(run_dir),
        "num-server-rounds": rounds,
        "resume": resume,
        "seed": 3,
    }
    run_federation(config, num_supernodes=3, work_dir=tmp / name, timeout=600)
    return run_dir


def _final(run_dir: Path) -> dict:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


def test_three_sites_two_rounds_then_resume_matches_uninterrupted(tmp_path):
    straight = tmp_path / "straight"
    _scenario(straight / "scenario")
    run_dir = _run(straight, "flwr", rounds=2)

    history = json.loads((run_dir / "metrics.json").read_text())
    assert set(history) == {"1", "2"}
    assert 0.0 <= history["2"]["server"]["test-auroc"] <= 1.0
    # val sizes 80 + 60 + 60, less samples whose only modality a site does not hold
    assert 150 < history["2"]["evaluate_clients"]["num-examples"] <= 200
    assert history["1"]["bytes"]["sent"] > 0 and history["1"]["bytes"]["received"] > 0
    rows = read_audit(run_dir)
    assert sorted((r.round, r.site) for r in rows) == [
        (r, f"site_{i}") for r in (1, 2) for i in range(3)
    ]
    tiny = [r for r in rows if r.site == "site_2"]
    assert all(r.num_examples is not None and r.num_examples >= 5 for r in tiny)
    assert all(c is None or c == 0 or c >= 5 for r in rows for c in r.availability_counts.values())
    no_cxr = next(r for r in rows if r.site == "site_2")
    assert no_cxr.availability_counts["cxr"] == 0
    assert (run_dir / "audit.csv").read_text().startswith("round,site,")
    # the engine's start-up was timed before round 1, every node answering the warm-up
    startup = json.loads((run_dir / "startup.json").read_text())
    assert startup["nodes"] == startup["answered"] == 3
    assert startup["startup_seconds"] > 0

    # interrupted after round 1, then resumed to round 2, with the same seed
    interrupted = tmp_path / "interrupted"
    _scenario(interrupted / "scenario")
    _run(interrupted, "flwr_a", rounds=1)
    resumed_dir = _run(interrupted, "flwr_b", rounds=2, resume=True)
    a, b = _final(run_dir), _final(resumed_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key
    assert [r.model_dump() for r in read_audit(resumed_dir)] == [r.model_dump() for r in rows]


def test_a_site_failing_every_round_does_not_stop_the_rounds_but_fails_the_run(tmp_path):
    _scenario(tmp_path / "scenario")
    broken = tmp_path / "scenario" / "site_1.toml"  # its data folder does not exist
    broken.write_text(
        'name = "site_1"\nmodalities = ["ehr"]\n[data]\nbenchmark_dir = "missing_folder"\n'
    )
    # every round runs with the other sites; then the run fails, naming the site
    with pytest.raises(FederationError, match="site_1"):
        _run(tmp_path, "flwr", rounds=2)
    run_dir = tmp_path / "run"
    history = json.loads((run_dir / "metrics.json").read_text())
    for round_ in ("1", "2"):
        problems = history[round_]["failed_or_rejected"]
        assert [p["status"] for p in problems] == ["failed"]
        assert problems[0]["reason"]  # Flower's error text of the site's exception
    assert {r.site for r in read_audit(run_dir)} == {"site_0", "site_2"}
    outcome = json.loads((run_dir / "outcome.json").read_text())
    assert outcome["status"] == "failed" and "site_1" in outcome["reason"]


def test_central_dp_at_the_sites_with_a_failing_site_still_aggregates(tmp_path):
    """Central DP with clipping at the sites (Flower's fixedclipping_mod): the honest sites'
    clipped updates pass the server's clipping check, and a failing site no longer makes
    Flower's wrapper skip the round; the noise is calibrated to the two accepted updates."""
    _scenario(tmp_path / "scenario")
    (tmp_path / "scenario" / "site_1.toml").write_text(
        'name = "site_1"\nmodalities = ["ehr"]\n[data]\nbenchmark_dir = "missing_folder"\n'
    )
    run_dir = tmp_path / "run"
    config = {
        "scenario-dir": str(tmp_path / "scenario"),
        "run-dir": str(run_dir),
        "num-server-rounds": 1,
        "seed": 3,
        "central-dp": "client",
        "dp-clipping-norm": 0.1,
        "dp-noise-multiplier": 0.5,
    }
    with pytest.raises(FederationError, match="site_1"):
        run_federation(config, num_supernodes=3, work_dir=tmp_path / "flwr", timeout=600)
    round_1 = json.loads((run_dir / "metrics.json").read_text())["1"]
    assert [p["status"] for p in round_1["failed_or_rejected"]] == ["failed"]
    assert round_1["train"]["central-dp-updates"] == 2
    assert round_1["train"]["central-dp-noise-std"] == pytest.approx(0.5 * 0.1 / 2)
    assert (run_dir / "checkpoints" / "round_0001").is_dir()


def test_an_interrupted_server_resumes_from_its_last_checkpoint(tmp_path):
    """Kill the process running the ServerApp (SIGKILL to flwr-simulation) once round 1 is
    checkpointed, then resume: the run finishes with every round exactly once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from simulation.flower_processes import _descendants

    _scenario(tmp_path / "scenario")
    run_dir = tmp_path / "run"
    script = (
        "import sys; from pathlib import Path; from simulation.federation import run_federation;"
        f"run_federation({{'scenario-dir': {str(tmp_path / 'scenario')!r}, "
        f"'run-dir': {str(run_dir)!r}, 'num-server-rounds': 3, 'seed': 3, "
        "'local-epochs': 3}, 3, "
        f"Path({str(tmp_path / 'first')!r}), timeout=600)"
    )
    harness = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.is_file() and time.monotonic() < deadline and harness.poll() is None:
        time.sleep(0.5)
    assert latest.is_file(), "round 1 never checkpointed"
    servers = [
        pid
        for pid in _descendants(harness.pid)
        if b"flwr-simulation" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert servers, "no flwr-simulation process found under the harness"
    for pid in servers:
        os.kill(pid, signal.SIGKILL)
    os.kill(harness.pid, signal.SIGINT)  # the harness then stops the SuperLink it started
    harness.wait(timeout=120)
    done = int(latest.read_text().split("_")[-1])
    assert done < 3, "interrupted too late to test a resume"
    _run(tmp_path, "second", rounds=3, resume=True)
    history = json.loads((run_dir / "metrics.json").read_text())
    assert set(history) == {"1", "2", "3"}
    rows = read_audit(run_dir)
    assert sorted((r.round, r.site) for r in rows) == [
        (r, f"site_{i}") for r in (1, 2, 3) for i in range(3)
    ]

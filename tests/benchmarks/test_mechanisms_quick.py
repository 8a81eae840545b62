"""The mechanism suite's runner, report and federated seam; one real quick central pass."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from simulation.benchmarks import mechanisms, mechanisms_central_dwfuse
from simulation.benchmarks.mechanism_result import MechanismResult, paired_result
from simulation.benchmarks.mechanisms import central_scenarios, run_suite, write_outputs
from simulation.benchmarks.mechanisms_central import suite_settings
from simulation.benchmarks.mechanisms_progress import SilentProgress


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the suite's CLI default: on a shared 2-core machine two threads
    per process make small models many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fake(name: str, expected: str, method: list[float], reference: list[float]):
    def source(quick: bool, seeds: list[int], progress) -> list[MechanismResult]:
        progress.plan(len(seeds))
        for seed in seeds:
            progress.advance(f"{name} seed {seed}")
        return [
            paired_result(
                name=name, mechanism="fake", control=expected != "positive",
                expected_sign=expected, method="m", reference="r", metric="auroc",
                method_values=method[: len(seeds)], reference_values=reference[: len(seeds)],
                details={"oracle_auroc": 0.9, "method_oracle_distance": 0.1,
                         "reference_oracle_distance": 0.2},
            )
        ]  # fmt: skip

    return source


def test_runner_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    progress = SilentProgress()
    sources = {
        "central": _fake("gain", "positive", [0.8, 0.82], [0.7, 0.71]),
        "federated": _fake("leak", "non-positive", [0.8, 0.85], [0.7, 0.71]),
    }
    payload, results = run_suite(True, [0, 1], progress, sources=sources, command="cmd")
    paths = write_outputs(payload, results, tmp_path)

    assert progress.planned == 4 and len(progress.done) == 4
    assert [p.name for p in paths] == [
        "mechanisms.json", "mechanisms.md", "mechanisms_ci.png", "mechanisms_oracle.png",
    ]  # fmt: skip
    assert all(p.stat().st_size > 0 for p in paths)
    decoded = json.loads((tmp_path / "mechanisms.json").read_text())
    assert decoded["federated"]["status"] == "included"
    assert decoded["command"] == "cmd"
    assert {"wall_seconds", "cpu_seconds", "loadavg_start"} <= set(decoded["timing"])
    verdicts = {r["name"]: r["holds"] for r in decoded["results"]}
    assert verdicts == {"gain": True, "leak": False}  # the control gained: it must fail
    report = (tmp_path / "mechanisms.md").read_text()
    assert "| gain | fake | no | > 0 | +0.105 [+0.100, +0.110] | **yes** | 0.900 |" in report
    assert "| leak | fake | yes | <= 0 |" in report and "**no**" in report


def test_missing_federated_module_is_reported_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mechanisms, "FEDERATED_MODULE", "simulation.benchmarks.no_such_module")
    assert mechanisms.federated_source() is None
    payload, _ = run_suite(
        True, [0], SilentProgress(),
        sources={"central": _fake("x", "zero", [0.5], [0.5]), "federated": None},
    )  # fmt: skip
    assert payload["federated"]["status"].startswith("not run")


def test_federated_seam_resolves_an_existing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    module = types.ModuleType("fake_federated")
    module.federated_scenarios = _fake("fed", "positive", [1.0], [0.0])  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_federated", module)
    monkeypatch.setattr(mechanisms.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(mechanisms, "FEDERATED_MODULE", "fake_federated")
    assert mechanisms.federated_source() is module.federated_scenarios


def test_quick_dwfuse_scenario_on_one_seed() -> None:
    """A real pass of one central scenario module (5 small models, a few seconds)."""
    progress = SilentProgress()
    progress.plan(mechanisms_central_dwfuse.planned_cells([0]))
    values = mechanisms_central_dwfuse.measure(suite_settings(True, [0]), progress)
    results = mechanisms_central_dwfuse.summarise(values)

    assert progress.planned == len(progress.done) == 5
    by_name = {r.name: r for r in results}
    assert set(by_name) == {
        "dwfuse/corrupted/b_dwfuse-vs-b_beta0",
        "dwfuse/corrupted/b_dwfuse-vs-a_concat",
        "dwfuse/clean/b_dwfuse-vs-b_beta0",
        "dwfuse/corrupted/omega_share-of-corrupted-modality-falls",
        "dwfuse/corrupted/omega-of-corrupted-modality-falls",
    }
    for result in results:
        assert result.n_seeds == 1 and math.isfinite(result.paired_diff), result.name
        assert result.ci_low == pytest.approx(result.paired_diff)  # one seed: a point
    assert by_name["dwfuse/clean/b_dwfuse-vs-b_beta0"].control
    oracle = by_name["dwfuse/corrupted/b_dwfuse-vs-a_concat"].details["oracle_auroc"]
    assert 0.5 < oracle <= 1.0


@pytest.mark.slow
def test_workers_give_the_same_results_as_one_process() -> None:
    serial = central_scenarios(True, [0], SilentProgress())
    progress = SilentProgress()
    parallel = central_scenarios(True, [0], progress, jobs=2)
    assert progress.planned == len(progress.done)
    assert [r.model_dump() for r in parallel] == [r.model_dump() for r in serial]


@pytest.mark.slow
def test_quick_central_pass_on_one_seed() -> None:
    progress = SilentProgress()
    results = central_scenarios(True, [0], progress)

    assert progress.planned == len(progress.done) > 0
    names = [r.name for r in results]
    assert len(names) == len(set(names))
    assert {r.mechanism for r in results} == {"imputation", "dwfuse", "tla", "tla-premise"}
    for result in results:
        assert result.n_seeds == 1
        assert math.isfinite(result.paired_diff), result.name
    controls = {r.name: r.expected_sign for r in results if r.control}
    assert controls["imputation/noise/n=small/f_all-vs-c_dwfuse_tla"] == "non-positive"
    assert controls["tla/noise_c/concat_tla-vs-a_concat/all"] == "non-positive"
    oracle = [r.details["oracle_auroc"] for r in results if "oracle_auroc" in r.details]
    assert oracle and all(0.5 < value <= 1.0 for value in oracle)


@pytest.mark.slow
def test_quick_cli_end_to_end(tmp_path: Path) -> None:
    assert mechanisms.main(["--quick", "--out", str(tmp_path)]) == 0
    decoded = json.loads((tmp_path / "mechanisms.json").read_text())
    assert decoded["quick"] is True and decoded["seeds"] == [0, 1]
    assert all(r["n_seeds"] == 2 for r in decoded["results"])


def test_report_reads_federated_oracle_distances() -> None:
    from simulation.benchmarks.mechanisms_report import oracle_distances

    result = paired_result(
        name="fed", mechanism="m", control=False, expected_sign="positive",
        method="aware: modality-aware FedAvg", reference="plain: plain FedAvg", metric="auroc",
        method_values=[0.8], reference_values=[0.7],
        details={"aware_distance_to_oracle": 0.1, "plain_distance_to_oracle": 0.2},
    )  # fmt: skip
    assert oracle_distances(result) == (0.1, 0.2)

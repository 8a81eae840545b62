"""The site-loading benchmark: a measuring child per site, the table and the JSON; and
(slow: synth -> partition -> prepare with the frozen backbones) its --quick form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulation.benchmarks.scale import site_scenario
from simulation.benchmarks.site_loading import REPOSITORY, main, measure_site

TINY_MODEL = {"d": 8, "num_blocks": 1, "cra_hidden": [8]}


def test_measure_site_times_a_cold_then_warm_loads(tmp_path: Path) -> None:
    scenario = site_scenario(tmp_path / "scenario", 1, 12, 6, TINY_MODEL)
    row = measure_site(scenario, scenario / "site_0.toml", repeats=3, threads=1)
    assert row["site"] == "site_0" and (row["train_stays"], row["val_stays"]) == (12, 6)
    assert row["cold_seconds"] > 0 and len(row["warm_seconds"]) == 3
    assert row["warm_seconds_min"] <= row["warm_seconds_median"] <= max(row["warm_seconds"])
    assert row["torch_threads"] == 1
    assert Path(row["omnifuse_model"]) == REPOSITORY


def test_each_site_is_measured_in_a_fresh_process_and_written(tmp_path: Path, capsys) -> None:
    scenario = site_scenario(tmp_path / "scenario", 2, 12, 6, TINY_MODEL)
    out = tmp_path / "loading.json"
    argv = ["--scenario", str(scenario), "--sites", "site_1", "--repeats", "2"]
    assert main([*argv, "--code", str(REPOSITORY), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["sites"]
    assert row["site"] == "site_1" and len(row["warm_seconds"]) == 2
    assert result["repeats"] == 2 and result["threads"] == 1
    assert set(result["load_average_1min"]) == {"before", "after"}
    assert "site_1" in capsys.readouterr().out
    assert main(["--scenario", str(scenario), "--sites", "nowhere"]) != 0


@pytest.mark.slow
def test_quick_builds_a_prepared_scenario_and_loads_every_site(tmp_path: Path) -> None:
    out = tmp_path / "loading.json"
    assert main(["--quick", "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["site"] for row in result["sites"]] == ["hospital_a", "hospital_b"]
    for row in result["sites"]:
        assert row["train_stays"] > 0 and len(row["warm_seconds"]) == 3
        assert row["rss_increase_bytes"] is not None

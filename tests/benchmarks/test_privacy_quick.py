"""The privacy benchmark end to end at toy sizes: its JSON is valid and holds every budget."""

from __future__ import annotations

import json

import pytest

from simulation.benchmarks.privacy import main


@pytest.mark.slow
def test_privacy_benchmark_writes_a_table_of_budgets_and_step_costs(tmp_path):
    out = tmp_path / "privacy.json"
    argv = ["--seeds", "1", "--epochs", "1", "--n-train", "128", "--n-test", "64"]
    argv += ["--epsilons", "inf", "8", "--report-tokens", "16", "--steps", "1", "--threads", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    summary = result["utility"]["summary"]
    assert set(summary) == {"inf", "8.0"}
    assert summary["inf"]["epsilon_spent_mean"] == "inf"
    assert 0 < summary["8.0"]["epsilon_spent_mean"] <= 8.0
    assert set(result["step_cost"]) == {"plain", "dp variant, no Opacus", "DP-SGD (Opacus)"}
    assert result["step_cost"]["plain"]["cost_vs_plain"] == 1.0

"""The strategy-cost benchmark at toy sizes (``--quick``): it runs and writes a well-formed
JSON (timings per site count and transport, the fitted line) and a plot."""

from __future__ import annotations

import json

from simulation.benchmarks.strategy_cost import main


def test_quick_strategy_cost_benchmark_writes_json_and_plot(tmp_path):
    out = tmp_path / "strategy_cost.json"
    main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {(r["transport"], r["sites"]) for r in result["rows"]} == {
        (t, s) for t in ("float16", "bfloat16", "float32") for s in (1, 2)
    }
    assert all(r["ms"] > 0 and r["received_bytes"] > 0 for r in result["rows"])
    for fit in result["fits"].values():
        assert set(fit) == {"slope_ms_per_site", "intercept_ms", "r2"}
    assert set(result["meets_target"]) == {"float16", "bfloat16", "float32"}
    assert len(result["loadavg_before"]) == 3
    assert out.with_suffix(".png").stat().st_size > 0

"""The transport benchmark at toy sizes (``--quick``): its byte table meets the 50% target
for every held-modality set, and the paired AUROC comparison is well-formed."""

from __future__ import annotations

import json
import math

from simulation.benchmarks.transport import main


def test_quick_transport_benchmark_bytes_and_paired_auroc(tmp_path):
    out = tmp_path / "transport.json"
    main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["bytes"]
    held_sets = {r["held"] for r in rows}
    assert len(held_sets) == 7  # every non-empty subset of ehr, cxr, rep
    for row in rows:
        if row["format"] == "float32":
            assert row["down_pct"] == row["up_pct"] == 100.0
        else:
            assert row["down_pct"] <= 50.0 and row["up_pct"] <= 50.0, row
        if "omission" in row["format"] and row["held"] != "ehr+cxr+rep":
            plain = next(r for r in rows if r["held"] == row["held"] and r["format"] == "float16")
            assert row["up"] < plain["up"] and row["down"] == plain["down"]
    assert {r["transport"] for r in result["runs"]} == {"float32", "float16"}
    [comparison] = result["paired"]
    assert comparison["transport"] == "float16" and comparison["seeds"] == [0, 1]
    low, high = comparison["ci95"]
    assert low <= comparison["mean"] <= high and math.isfinite(high - low)
    assert all(0.0 <= r["test_auroc"] <= 1.0 for r in result["runs"])

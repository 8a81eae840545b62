"""The fixed-cost breakdown benchmark at toy sizes (``--quick``): it answers real train and
evaluate messages with the ClientApp's own functions, runs the server's round steps and
writes a well-formed JSON."""

from __future__ import annotations

import json

from simulation.benchmarks.client_overhead import main


def test_quick_client_overhead_benchmark_writes_json(tmp_path):
    out = tmp_path / "client_overhead.json"
    main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    client = {row["name"]: row for row in result["client"]}
    assert client["train(): whole message"]["ms"] > 0
    assert client["evaluate(): whole message"]["ms"] > 0
    assert client["train(): outside train-seconds"]["cpu_ms"] is None  # derived from walls
    assert set(result["pickled_bytes"]) == {"train message", "train reply", "evaluate message"}
    server = {row["name"] for row in result["server"]["2"]}
    assert {"configure_train", "configure_evaluate", "aggregate_evaluate"} <= server
    assert {"  server-eval", "  checkpoint", "  audit.csv + audit.json"} <= server
    summary = result["summary"]
    assert summary["client_fixed_ms_per_site_round"] > 0
    assert summary["server_ms_per_client"]["2"] == summary["server_ms_per_round"]["2"] / 2
    assert len(result["loadavg_before"]) == 3

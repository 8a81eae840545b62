"""The scale benchmark's pieces: the process-tree memory sampler, the per-round table, the
federation config, and (slow, starts Flower) its --quick form end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulation.benchmarks.scale import concurrent_clients, main, round_rows
from simulation.benchmarks.scale_memory import TreeMemorySampler
from simulation.federation import federation_config

_HOLD = "import sys, time; b = bytearray(int(sys.argv[1]) * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ok', flush=True); time.sleep(30)"  # noqa: E501


def _child(megabytes: int) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(megabytes)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "ok"
    return child


def test_the_sampler_sums_the_anonymous_memory_of_the_tree() -> None:
    children = [_child(150), _child(100)]
    try:
        with TreeMemorySampler(interval=0.1) as sampler:
            time.sleep(0.3)
        summary = sampler.summary()
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert summary["max_processes"] == 2
    assert 250 * 2**20 <= summary["peak_anonymous_bytes"] <= summary["peak_rss_bytes"]
    assert summary["peak_rss_bytes"] < 600 * 2**20  # only the two children, not the driver
    assert summary["samples"] >= 2 and summary["load_1min_max"] >= 0
    with TreeMemorySampler(interval=0.1) as after:
        pass
    assert after.summary()["peak_rss_bytes"] == 0  # the children are gone
    with pytest.raises(ValueError, match="interval"):
        TreeMemorySampler(interval=0)


def test_round_rows_derive_load_share_and_fixed_cost() -> None:
    history = {
        "2": {"wall_seconds": 12.0, "train": {"train-seconds-sum": 10.0, "load-seconds-sum": 0.5,
              "train-seconds-max": 4.0, "load-seconds-max": 0.2}, "bytes": {"sent": 7}},
        "1": {"wall_seconds": 20.0, "train": {"train-seconds-sum": 10.0}},
    }  # fmt: skip
    rows = round_rows(history, sites=4, concurrent=1)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["load_share"] == 0.0 and rows[0]["fixed_seconds_per_client"] == 2.5
    assert rows[1]["load_share"] == pytest.approx(0.5 / 10.5)
    assert rows[1]["fixed_seconds_per_client"] == pytest.approx(0.5)
    assert rows[1]["bytes_sent"] == 7 and rows[1]["wall_over_train_sum"] == pytest.approx(1.2)
    two = round_rows(history, sites=4, concurrent=2)
    assert two[1]["fixed_seconds_per_client"] == pytest.approx((12.0 - 5.0) / 4)


def test_federation_config_and_concurrency() -> None:
    assert federation_config(3) == "num-supernodes=3"
    assert federation_config(100, 1) == "num-supernodes=100 client-resources-num-cpus=1"
    for bad in (0, 1.5, -1):
        with pytest.raises(ValueError, match="client_cpus"):
            federation_config(3, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_supernodes"):
        federation_config(0)
    assert concurrent_clients(1, 100) >= 1 and concurrent_clients(2, 1) == 1


@pytest.mark.slow
def test_quick_scale_benchmark_runs_flower_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    assert main(["sites", "--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["sites"] for r in result["runs"]] == [2, 3]
    for run in result["runs"]:
        assert run["memory"]["peak_rss_bytes"] > 0 and run["rounds_table"]
        assert run["rounds_table"][0]["load_seconds_sum"] > 0

"""The GPU round script at tiny size on CPU (the same code path, device cpu; slow: it runs
synth, partition and prepare with the frozen backbones, ~30 s of CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulation.benchmarks.gpu_round import main


@pytest.mark.slow
def test_gpu_round_quick_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_round.json"
    assert (
        main(["--quick", "--device", "cpu", "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    )
    result = json.loads(out.read_text())
    assert result["sites"] == 2 and result["device"] == "cpu"
    assert set(result["step_seconds"]) == {"synth", "partition", "prepare"}
    (row,) = result["rounds"]
    assert row["train_samples"] > 0 and row["wall_seconds"] >= row["train_seconds"] > 0
    assert row["peak_allocated_bytes"] is None  # CUDA counters only on a GPU
    # a second run reuses the data and the caches
    assert (
        main(["--quick", "--device", "cpu", "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    )
    assert set(json.loads(out.read_text())["step_seconds"]) == {"prepare"}


def test_gpu_round_refuses_cuda_without_a_gpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["--work", str(tmp_path), "--device", "cuda"]) == 2

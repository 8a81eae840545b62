"""Fast checks of the fidelity benchmark: a tiny missing-rate sweep end to end, and the
benchmark's own missingness rule (at least one modality kept, nested rates)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from omnifuse_model.config import TrainConfig
from simulation.benchmarks.fidelity import FidelityConfig, run_fidelity
from simulation.benchmarks.fidelity_data import default_scenario, draw_complete, restrict

TINY_SIZES = {"train": 160, "val": 80, "test": 120}


@pytest.fixture
def tiny_config() -> FidelityConfig:
    return FidelityConfig(
        seeds=[0, 1],
        sizes=TINY_SIZES,
        model={"d": 8, "num_blocks": 2, "cra_hidden": (16, 8)},
        train=TrainConfig(epochs=2, patience=0, batch_size=64, bootstrap_samples=0),
        missing_rates=[0.0, 0.6],
    )


def test_missing_rate_sweep_writes_finite_json(tiny_config: FidelityConfig) -> None:
    result = run_fidelity(tiny_config, ["missing_rate"])
    decoded = json.loads(json.dumps(result, allow_nan=False))  # NaN/inf would raise here

    assert decoded["benchmark"] == "fidelity"
    assert decoded["config"]["sizes"] == TINY_SIZES
    assert set(decoded["experiments"]) == {"missing_rate"}
    cells = decoded["experiments"]["missing_rate"]["cells"]
    labels = sorted((c["labels"]["rate"], c["labels"]["imputation"]) for c in cells)
    assert labels == [(0.0, "with"), (0.0, "without"), (0.6, "with"), (0.6, "without")]
    for cell in cells:
        assert cell["n_seeds"] == 2
        assert [run["seed"] for run in cell["runs"]] == [0, 1]
        for metric in ("auroc", "auprc"):
            values = [run[metric] for run in cell["runs"]]
            assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values)
            assert cell[metric]["mean"] == pytest.approx(sum(values) / 2)
            assert math.isfinite(cell[metric]["std"]) and cell[metric]["std"] >= 0.0
        imputes = cell["labels"]["imputation"] == "with"
        assert cell["model_config"]["use_forward_imputation"] is imputes
        assert cell["model_config"]["use_backward_imputation"] is imputes
        assert cell["model_config"]["fusion"] == "dwfuse"
        assert cell["model_config"]["d"] == 8
    claim = decoded["claims"]["flat_missing_rate_curve"]
    assert isinstance(claim["holds"], bool) and "with" in claim["measured"]
    assert len(claim["evidence"]["drop"]["with"]["per_seed"]) == 2


def test_restrict_keeps_one_modality_and_nests_rates() -> None:
    scenario = default_scenario()
    names = [m.name for m in scenario.modalities]
    split = draw_complete(scenario, {"train": 2000, "val": 1, "test": 1}, seed=3)["train"]
    subset = ["cxr", "rep"]
    low = restrict(split, subset, names, dict.fromkeys(names, 0.3))
    high = restrict(split, subset, names, dict.fromkeys(names, 0.9))

    assert list(high.inputs) == subset
    assert bool(high.availability.any(dim=1).all())
    assert not bool((high.availability & ~low.availability).any())  # nested in the rate
    # P(absent) = r - r^2 / 2 for two modalities: the rescue re-adds one of each empty pair
    missing = 1.0 - low.availability.float().mean().item()
    assert missing == pytest.approx(0.3 - 0.3**2 / 2, abs=0.03)
    rescued = high.availability[~(split.uniforms[:, 1:] >= 0.9).any(dim=1)]
    assert rescued[:, 0].float().mean().item() == pytest.approx(0.5, abs=0.05)  # uniform pick
    for i, name in enumerate(subset):
        absent = ~high.availability[:, i]
        assert torch.count_nonzero(high.inputs[name][absent]) == 0

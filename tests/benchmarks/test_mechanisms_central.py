"""Helpers of the central mechanism scenarios: probes, omega drops, arms, per-seed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnifuse_model.batch import InMemoryMultimodalDataset
from simulation.benchmarks.mechanisms_central import (
    SeedValues,
    auroc_on,
    draw_design,
    hide_modality,
    only_modalities,
    suite_settings,
    train_arm,
)
from simulation.benchmarks.mechanisms_central_dwfuse import DESIGNS, _omega_drops
from simulation.benchmarks.mechanisms_central_tla import tla_design


def _dataset() -> InMemoryMultimodalDataset:
    availability = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1]], dtype=torch.bool)
    inputs = {"a": torch.ones(4, 3), "b": 2 * torch.ones(4, 2)}
    inputs = {k: v * availability[:, i : i + 1] for i, (k, v) in enumerate(inputs.items())}
    return InMemoryMultimodalDataset(
        inputs, availability, torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    )


def test_only_modalities_keeps_holders_and_hides_the_rest() -> None:
    probe, rows = only_modalities(_dataset(), [1])
    assert rows.tolist() == [True, False, True, True]
    assert probe.availability.tolist() == [[False, True]] * 3
    assert probe.inputs["a"].abs().sum() == 0  # hidden inputs are zeroed
    assert torch.equal(probe.inputs["b"], 2 * torch.ones(3, 2))
    assert probe.labels.squeeze(1).tolist() == [0.0, 0.0, 1.0]


def test_hide_modality_drops_samples_left_empty() -> None:
    alone = hide_modality(_dataset(), 0)
    assert alone.availability.tolist() == [[False, True]] * 3  # sample 1 held only 'a'
    assert alone.inputs["a"].abs().sum() == 0


def test_omega_drops_by_hand() -> None:
    # clean rows: omega (0.2, 0.2) -> share 0.5 each; A-corrupted: (0.2, 0.6) -> A's share 0.25;
    # B-corrupted: (0.6, 0.2) -> B's share 0.25. Share drop 0.25 for both; own omega drop 0.
    omega = np.array([[0.2, 0.2], [0.2, 0.6], [0.6, 0.2]])
    share, own = _omega_drops(omega, np.array([-1, 0, 1]))
    assert share == pytest.approx(0.25)
    assert own == pytest.approx(0.0)
    assert all(np.isnan(_omega_drops(omega, np.array([0, 0, 1]))))  # no clean samples


def test_auroc_on_rows_and_one_class() -> None:
    labels = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    scores = np.array([0.1, 0.9, 0.8, 0.2])
    assert auroc_on(labels, scores) == pytest.approx(0.75)  # 3 of 4 (pos, neg) pairs ordered
    assert auroc_on(labels, scores, torch.tensor([True, True, False, False])) == 1.0
    assert np.isnan(auroc_on(labels, scores, torch.tensor([True, False, True, False])))


def test_train_arm_rejects_unknown_arm_and_designs_are_valid() -> None:
    settings = suite_settings(True, [0])
    data = draw_design(DESIGNS["clean"], 50, settings, 0)
    with pytest.raises(ValueError, match="arm: expected one of"):
        train_arm(data, "z_unknown", 0, settings)
    assert [m.name for m in tla_design(True).modalities] == ["a", "b", "c"]


def test_seed_values_difference_and_missing_key() -> None:
    values = SeedValues()
    for a, b in ((0.8, 0.7), (0.9, 0.6)):
        values.add("m", a)
        values.add("r", b)
    assert values.difference("m", "r") == pytest.approx([0.1, 0.3])
    assert values.mean("m") == pytest.approx(0.85)
    with pytest.raises(KeyError, match="no measurement 'x'"):
        values["x"]

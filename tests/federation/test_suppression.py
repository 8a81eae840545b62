"""Complementary suppression: the 9-sample example, and a brute-force check over small count
vectors that no suppressed cell takes a single value in every table the server could infer."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from client.local_training import RoundInstructions, evaluate_global, train_round
from omnifuse_model.config import TrainConfig
from omnifuse_model.federation_schema import exact_combination_counts
from omnifuse_model.model import OmniFuse
from omnifuse_model.site_data import load_site_datasets
from omnifuse_model.suppression import protect_combination_counts, statistic_or_none
from tests.federation.conftest import make_site

THREE = ["ehr", "cxr", "rep"]
TWO = ["ehr", "cxr"]


def _cells(names: list[str], values) -> dict[str, int]:
    return dict(zip(exact_combination_counts([], names), values, strict=True))


def feasible_values(
    counts: dict[str, int], reported: dict[str, int | None], names: list[str], margins: bool
) -> dict[str, set[int]]:
    """Brute force: every value each suppressed cell takes over all integer tables that match
    the published cells, the total and (``margins``) every num-present margin, with
    suppressed cells >= 1."""
    hidden = [label for label, value in reported.items() if value is None]
    total = sum(counts.values())
    rest = total - sum(v for v in reported.values() if v is not None)

    def present(table: dict[str, int], name: str) -> int:
        return sum(v for label, v in table.items() if name in label.split("+"))

    seen: dict[str, set[int]] = {label: set() for label in hidden}
    for values in _compositions(rest, len(hidden)):
        table = {
            **{k: v for k, v in reported.items() if v is not None},
            **dict(zip(hidden, values, strict=True)),
        }
        if margins and any(present(table, n) != present(counts, n) for n in names):
            continue
        for label, value in zip(hidden, values, strict=True):
            seen[label].add(value)
    return seen


def _compositions(total: int, parts: int):
    """Every tuple of ``parts`` integers >= 1 summing to ``total``."""
    if parts == 0:
        if total == 0:
            yield ()
        return
    for first in range(1, total - parts + 2):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def _check(counts: dict[str, int], names: list[str], threshold: int, margins: bool) -> None:
    result = protect_combination_counts(counts, names, threshold, public_margins=margins)
    for label, count in counts.items():
        if 0 < count < threshold:
            assert result.reported[label] is None, (counts, label)
        assert result.reported[label] in (None, count)
        if count == 0:
            assert result.reported[label] == 0
    if sum(counts.values()) < threshold and not margins:
        return  # the audit hides the total too: nothing can be derived
    seen = feasible_values(counts, result.reported, names, margins)
    for label, values in seen.items():
        assert counts[label] in values
        if label in result.exposed:
            assert values == {counts[label]}, (counts, label, values)
        else:
            assert len(values) > 1, (counts, result, label, values)


def test_the_nine_sample_example():
    counts = _cells(THREE, [3, 0, 0, 6, 0, 0, 0])  # ehr 3, ehr+cxr 6
    audit_only = protect_combination_counts(counts, THREE, 5, public_margins=False)
    assert audit_only.primary == ("ehr",) and audit_only.complementary == ("ehr+cxr",)
    assert audit_only.reported["ehr"] is None and audit_only.reported["ehr+cxr"] is None
    assert feasible_values(counts, audit_only.reported, THREE, margins=False)["ehr"] == set(
        range(1, 9)
    )
    # num-present.cxr = 6 and num-present.rep = 0 are sent for weighting: ehr = 9 - 6 whatever
    # the audit hides. The cell is reported suppressed but flagged as exposed.
    deployed = protect_combination_counts(counts, THREE, 5)
    assert deployed.exposed == ("ehr",) and deployed.reported["ehr"] is None
    every_cell_hidden = {k: (None if v else 0) for k, v in counts.items()}
    assert feasible_values(counts, every_cell_hidden, THREE, margins=True)["ehr"] == {3}


def test_with_two_modalities_the_margins_determine_every_cell():
    result = protect_combination_counts(_cells(TWO, [3, 40, 60]), TWO, 5)
    assert result.exposed == ("ehr",) and result.complementary == ()
    audit_only = protect_combination_counts(_cells(TWO, [3, 40, 60]), TWO, 5, public_margins=False)
    assert audit_only.exposed == () and audit_only.complementary == ("cxr",)


def test_complementary_cells_are_chosen_smallest_first_and_deterministically():
    counts = _cells(THREE, [40, 3, 7, 50, 60, 7, 300])
    first = protect_combination_counts(counts, THREE, 5)
    assert first == protect_combination_counts(dict(counts), THREE, 5)
    assert first.primary == ("cxr",) and first.complementary[0] == "rep"  # 7, before cxr+rep
    assert [counts[c] for c in first.complementary] == sorted(
        counts[c] for c in first.complementary
    )


def test_no_small_cell_no_suppression():
    counts = _cells(THREE, [40, 0, 7, 50, 60, 7, 300])
    result = protect_combination_counts(counts, THREE, 5)
    assert result.reported == counts and not result.complementary


@pytest.mark.parametrize("margins", [True, False])
def test_brute_force_two_modalities(margins):
    for values in itertools.product(range(6), repeat=3):
        _check(_cells(TWO, values), TWO, 3, margins)


@pytest.mark.parametrize("margins", [True, False])
def test_brute_force_three_modalities(margins):
    rng = random.Random(0)
    checked = 0
    while checked < 150:
        values = [rng.choice([0, 0, 1, 2, 3, 4, 6]) for _ in range(7)]
        if sum(values) > 18 or not any(0 < v < 3 for v in values):
            continue
        _check(_cells(THREE, values), THREE, 3, margins)
        checked += 1


def test_statistics_over_too_few_samples_are_withheld_and_bad_input_is_named():
    assert statistic_or_none(0.8, 4, 5) is None and statistic_or_none(0.8, 5, 5) == 0.8
    with pytest.raises(ValueError, match="threshold 0"):
        protect_combination_counts(_cells(TWO, [1, 2, 3]), TWO, 0)
    with pytest.raises(ValueError, match="'cxr': -1"):
        protect_combination_counts(_cells(TWO, [1, -1, 3]), TWO, 5)
    with pytest.raises(ValueError, match="not in"):
        protect_combination_counts({"ehr": 1, "pet": 2}, TWO, 5)


def test_a_round_at_a_small_site_withholds_what_too_few_samples_give(model_config, caplog):
    """A site with 4 validation samples (threshold 8) sends no validation statistics; its
    small availability cells are suppressed, and (two modalities: the weighting counts
    determine every cell) logged as exposed."""
    site = make_site("tiny", ["ehr", "cxr"], 3).model_copy(deep=True)
    site.data.synthetic_sizes = (40, 4)
    datasets = load_site_datasets(site, model_config)
    torch.manual_seed(0)
    state = OmniFuse(model_config).state_dict()
    train = TrainConfig(epochs=1, batch_size=16, progress=False, bootstrap_samples=0)
    instructions = RoundInstructions(model_config, train, global_round=1, audit_min_count=8)
    with caplog.at_level("WARNING", logger="client.local_training"):
        result = train_round(site.name, datasets, instructions, state)
    assert result.metrics["val-auroc"] == -1.0 and result.metrics["val-auprc"] == -1.0
    assert result.metrics["train-loss"] != -1.0  # 40 training samples
    audit = result.audit
    assert audit.val_auroc is None
    assert set(audit.mean_dwfuse_weight.values()) == {None}
    assert set(audit.imputation_error.values()) == {None}
    availability = datasets.train.availability
    counts = exact_combination_counts(availability.tolist(), ["ehr", "cxr"])
    small = [label for label, count in counts.items() if 0 < count < 8]
    assert small, counts  # the fixture must exercise suppression
    for label, count in counts.items():
        assert audit.availability_counts[label] == (None if label in small else count)
    assert all(label in caplog.text for label in small)
    assert result.metrics["num-present.cxr"] == int(availability[:, 1].sum())  # sent exactly
    metrics = evaluate_global(datasets, model_config, state, train, min_count=8)
    assert metrics["val-auroc"] == -1.0 and metrics["num-examples"] == 4
    assert evaluate_global(datasets, model_config, state, train, min_count=4)["val-auroc"] != -1.0

"""Traceable Laziness Activation (Eq. 15-17): combinations, mining and the activation loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from omnifuse_model.config import ModalitySpec, OmniFuseConfig
from omnifuse_model.laziness import (
    LazinessMiner,
    LazinessReport,
    combination_masks,
    modality_combinations,
    tla_loss,
)
from omnifuse_model.model import OmniFuse

# -- combinations -----------------------------------------------------------------------------


def test_combination_order_for_three_names():
    assert modality_combinations(["a", "b", "c"]) == [
        ("a",),
        ("b",),
        ("c",),
        ("a", "b"),
        ("a", "c"),
        ("b", "c"),
        ("a", "b", "c"),
    ]


def test_combination_order_follows_the_given_names_not_the_alphabet():
    assert modality_combinations(("rep", "ehr")) == [("rep",), ("ehr",), ("rep", "ehr")]


@pytest.mark.parametrize("num_modalities", [2, 3, 4, 5])
def test_there_are_two_to_the_m_minus_one_distinct_combinations(num_modalities):
    names = [f"m{i}" for i in range(num_modalities)]
    combos = modality_combinations(names)
    assert len(combos) == 2**num_modalities - 1
    assert len(set(combos)) == len(combos)
    assert all(combo and set(combo) <= set(names) for combo in combos)
    sizes = [len(combo) for combo in combos]
    assert sizes == sorted(sizes)
    masks = combination_masks(names)
    assert masks.shape == (2**num_modalities - 1, num_modalities)
    for row, combo in zip(masks, combos, strict=True):
        assert [names[i] for i in row.nonzero().flatten().tolist()] == list(combo)


@pytest.mark.parametrize("names", [["a", "a"], ["a", "b", "a"]])
def test_duplicate_names_raise(names):
    with pytest.raises(ValueError, match="unique"):
        modality_combinations(names)


# -- the miner (Eq. 15) -----------------------------------------------------------------------

# names (a, b): combinations a, b, a+b (columns 0, 1, 2)
DISTANCES = torch.tensor(
    [
        [0.2, 0.9, 0.1],
        [0.4, 1.0e6, 0.3],  # b is absent in this row: its huge distance must not count
        [0.6, 0.5, 0.2],
    ]
)
ELIGIBLE = torch.tensor(
    [
        [True, True, True],
        [True, False, False],
        [True, True, True],
    ]
)


def test_miner_picks_the_planted_combination_and_ignores_ineligible_rows():
    miner = LazinessMiner(["a", "b"])
    miner.update(DISTANCES, ELIGIBLE)
    report = miner.report()
    # a: (0.2 + 0.4 + 0.6) / 3 = 0.4; b: (0.9 + 0.5) / 2 = 0.7; a+b: (0.1 + 0.2) / 2 = 0.15
    assert report.lazy_combination == ("b",)
    assert report.counts == {"a": 3, "b": 2, "a+b": 2}
    assert report.scores == pytest.approx({"a": 0.4, "b": 0.7, "a+b": 0.15})
    assert report.distance_sums == pytest.approx({"a": 1.2, "b": 1.4, "a+b": 0.3})


def test_non_finite_distances_of_ineligible_rows_are_ignored():
    distances = DISTANCES.clone()
    distances[1, 1] = float("inf")
    distances[1, 2] = float("nan")
    miner = LazinessMiner(["a", "b"])
    miner.update(distances, ELIGIBLE)
    report = miner.report()
    assert report.lazy_combination == ("b",)
    assert all(math.isfinite(score) for score in report.scores.values())


def test_sum_and_mean_reductions_differ_as_expected():
    # a is held by four samples at distance 1 (sum 4, mean 1); b by one at 3 (sum 3, mean 3)
    distances = torch.tensor([[1.0, 3.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    eligible = torch.tensor(
        [
            [True, True, True],
            [True, False, False],
            [True, False, False],
            [True, False, False],
        ]
    )
    by_mean, by_sum = LazinessMiner(["a", "b"], "mean"), LazinessMiner(["a", "b"], "sum")
    by_mean.update(distances, eligible)
    by_sum.update(distances, eligible)
    assert by_mean.report().lazy_combination == ("b",)
    assert by_sum.report().lazy_combination == ("a",)
    assert by_sum.report().scores == pytest.approx({"a": 4.0, "b": 3.0, "a+b": 0.0})


def test_combinations_nobody_holds_are_left_out():
    miner = LazinessMiner(["a", "b"])
    miner.update(torch.tensor([[0.5, 9.0, 9.0]]), torch.tensor([[True, False, False]]))
    report = miner.report()
    assert report.lazy_combination == ("a",)
    assert set(report.scores) == {"a"}
    assert LazinessMiner(["a", "b"]).report().lazy_combination is None


def test_bad_reduction_raises():
    with pytest.raises(ValueError, match="reduction"):
        LazinessMiner(["a", "b"], reduction="max")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_merge_of_two_halves_equals_one_update(reduction):
    generator = torch.Generator().manual_seed(0)
    names = ["a", "b", "c"]
    distances = torch.rand(10, 7, generator=generator)
    eligible = torch.rand(10, 7, generator=generator) > 0.3
    whole = LazinessMiner(names, reduction)
    whole.update(distances, eligible)
    first, second = LazinessMiner(names, reduction), LazinessMiner(names, reduction)
    first.update(distances[:6], eligible[:6])
    second.update(distances[6:], eligible[6:])
    half = second.report()

    first.merge(half.distance_sums, half.counts)

    merged, expected = first.report(), whole.report()
    assert merged.lazy_combination == expected.lazy_combination
    assert merged.counts == expected.counts
    assert merged.scores == pytest.approx(expected.scores)
    assert merged.distance_sums == pytest.approx(expected.distance_sums)


def test_report_round_trips_through_a_dict():
    report = LazinessReport(("a", "c"), {"a+c": 0.5}, {"a+c": 3}, {"a+c": 1.5})
    assert LazinessReport.from_dict(report.to_dict()) == report
    assert LazinessReport.from_dict(LazinessReport(None).to_dict()) == LazinessReport(None)


# -- TLA loss (Eq. 16-17) ---------------------------------------------------------------------


def test_tla_loss_is_the_mean_over_masked_samples():
    losses = torch.tensor([1.0, 2.0, 30.0, 4.0])
    mask = torch.tensor([True, True, False, True])
    torch.testing.assert_close(tla_loss(losses, mask), torch.tensor(7.0 / 3.0))
    assert tla_loss(losses, torch.zeros(4, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="shape"):
        tla_loss(losses, mask[:3])


def test_set_laziness_rejects_unknown_modalities(make_config):
    model = OmniFuse(make_config(2))
    with pytest.raises(ValueError, match="bogus"):
        model.set_laziness(LazinessReport(lazy_combination=("bogus",)))


def test_tla_is_zero_when_no_sample_holds_the_lazy_combination(make_config, make_batch):
    torch.manual_seed(0)
    config = make_config(3)
    model = OmniFuse(config).eval()
    availability = torch.tensor([[True, False, True], [True, True, False], [False, True, True]])
    batch = make_batch(config, availability)
    without = model(**batch.forward_kwargs()).losses

    model.set_laziness(LazinessReport(lazy_combination=tuple(config.modality_names)))
    with_lazy = model(**batch.forward_kwargs()).losses

    assert with_lazy["tla"].item() == 0.0
    torch.testing.assert_close(with_lazy["total"], without["total"])


def test_tla_is_the_loss_of_the_lazy_combination_alone(make_config, make_batch):
    torch.manual_seed(0)
    config = make_config(3, lambda3=0.5)
    model = OmniFuse(config).eval()
    availability = torch.tensor(
        [[True, True, True], [True, False, True], [False, True, True], [True, True, False]]
    )
    batch = make_batch(config, availability, seed=3)
    lazy = (config.modality_names[0], config.modality_names[2])
    without = model(**batch.forward_kwargs()).losses
    model.set_laziness(LazinessReport(lazy_combination=lazy))

    losses = model(**batch.forward_kwargs()).losses

    holders = torch.tensor([0, 1])  # the rows holding modalities 0 and 2
    only_lazy = torch.tensor([[True, False, True]]).expand(2, -1)
    alone = model(
        {k: v[holders] for k, v in batch.inputs.items()},
        only_lazy,
        {k: v[holders] for k, v in batch.masks.items()},
    )
    expected = F.binary_cross_entropy_with_logits(alone.logits, batch.labels[holders])
    torch.testing.assert_close(losses["tla"], expected)
    torch.testing.assert_close(losses["total"], without["total"] + 0.5 * expected)


def test_use_tla_false_ignores_the_lazy_combination(make_config, make_batch, all_patterns):
    config = make_config(2, use_tla=False)
    model = OmniFuse(config)
    model.set_laziness(LazinessReport(lazy_combination=(config.modality_names[0],)))
    losses = model(**make_batch(config, all_patterns(2)).forward_kwargs()).losses
    assert "tla" not in losses


# -- combination distances ---------------------------------------------------------------------


def test_eligibility_matches_availability_by_hand(make_config, make_batch):
    torch.manual_seed(0)
    config = make_config(3)
    model = OmniFuse(config).eval()
    availability = torch.tensor(
        [
            [True, False, True],
            [False, False, False],
            [True, True, True],
            [False, True, False],
            [True, True, False],
        ]
    )
    batch = make_batch(config, availability)

    distances, eligible = model.combination_distances(
        batch.inputs, availability, batch.labels, batch.masks
    )

    # columns: 0, 1, 2, 0+1, 0+2, 1+2, 0+1+2
    expected = torch.tensor(
        [
            [True, False, True, False, True, False, False],
            [False, False, False, False, False, False, False],
            [True, True, True, True, True, True, True],
            [False, True, False, False, False, False, False],
            [True, True, False, True, False, False, False],
        ]
    )
    assert torch.equal(eligible, expected)
    assert distances.shape == (5, 7)
    assert torch.isfinite(distances).all()


@pytest.mark.parametrize("distance", ["ce", "mae"])
def test_distances_are_predictions_from_each_combination_alone(
    make_config, make_batch, all_patterns, distance
):
    torch.manual_seed(0)
    config = make_config(3, "multiclass", tla_distance=distance)
    model = OmniFuse(config).eval()
    batch = make_batch(config, torch.ones(4, 3, dtype=torch.bool), seed=2)

    distances, eligible = model.combination_distances(
        batch.inputs, batch.availability, batch.labels, batch.masks
    )

    assert eligible.all()
    for column, row in enumerate(combination_masks(config.modality_names)):
        logits = model(batch.inputs, row.expand(4, -1), batch.masks).logits
        if distance == "ce":
            expected = F.cross_entropy(logits, batch.labels, reduction="none")
        else:
            one_hot = F.one_hot(batch.labels, config.num_classes).float()
            expected = (torch.softmax(logits, dim=1) - one_hot).abs().mean(dim=1)
        torch.testing.assert_close(distances[:, column], expected)


def test_mining_finds_a_planted_lazy_modality():
    """Two modalities carry the label, one is pure noise: after brief training the noise
    alone predicts worst, so mining must name it the lazy combination."""
    generator = torch.Generator().manual_seed(0)
    n, width = 256, 4
    labels = torch.randint(0, 2, (n, 1), generator=generator).float()
    sign = 2 * labels - 1
    inputs = {
        "signal_a": torch.randn(n, width, generator=generator) * 0.5 + sign,
        "signal_b": torch.randn(n, width, generator=generator) * 0.5 + sign,
        "noise": torch.randn(n, width, generator=generator),
    }
    config = OmniFuseConfig(
        modalities=[ModalitySpec(name=k, kind="vector", input_dim=width) for k in inputs],
        task="binary",
        d=16,
        num_blocks=2,
        cra_hidden=(16, 8),
        dropout=0.0,
    )
    torch.manual_seed(0)
    model = OmniFuse(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    availability = torch.ones(n, 3, dtype=torch.bool)
    for _ in range(150):
        drop = torch.rand(n, 3, generator=generator) < 0.5  # train every input subset
        loss = model(inputs, availability, labels=labels, drop=drop).losses["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    distances, eligible = model.combination_distances(inputs, availability, labels)
    miner = LazinessMiner(config.modality_names, config.tla_reduction)
    miner.update(distances, eligible)
    report = miner.report()

    assert report.lazy_combination == ("noise",)
    assert report.scores["noise"] > 0.5  # near chance, ln 2 = 0.69
    assert max(v for k, v in report.scores.items() if k != "noise") < 0.1
    assert report.counts == {key: n for key in report.scores}

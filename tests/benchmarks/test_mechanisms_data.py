"""The mechanism generator: name-seeded structure, links, Bayes probability, corruption and
per-split missingness."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from simulation.benchmarks.mechanisms_data import (
    CorruptionRegime,
    MechanismDataConfig,
    MechanismModality,
    label_weights,
    make_mechanism_split,
    modality_signal,
    stable_seed,
)


def _config(order: tuple[str, ...] = ("a", "b", "c"), **extra) -> MechanismDataConfig:
    modalities = {
        "a": MechanismModality(name="a", dim=12, link="linear", latent_columns=[0, 1, 2, 3]),
        "b": MechanismModality(
            name="b",
            dim=10,
            link="mlp",
            latent_columns=[4, 5, 6, 7],
            missing_train=0.2,
            missing_test=0.8,
        ),
        "c": MechanismModality(name="c", dim=6, link="noise", missing_train=0.3),
    }
    return MechanismDataConfig(modalities=[modalities[n] for n in order], latent_dim=8, **extra)


def _r_squared(inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of the targets' variance a least-squares linear map of the inputs explains."""
    design = torch.cat([inputs, torch.ones(inputs.shape[0], 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, targets.double()).solution
    residual = targets.double() - design @ solution
    return float(1 - residual.pow(2).sum() / (targets - targets.mean(0)).double().pow(2).sum())


def test_reordering_modalities_gives_identical_per_modality_features() -> None:
    regime = CorruptionRegime(rate=0.3, modalities=["a", "b"])
    first = make_mechanism_split(_config(corruption=regime), 300, seed=4, split="test")
    second = make_mechanism_split(
        _config(("c", "b", "a"), corruption=regime), 300, seed=4, split="test"
    )
    for name in ("a", "b", "c"):
        i, j = first.modality_names.index(name), second.modality_names.index(name)
        assert torch.equal(first.dataset.inputs[name], second.dataset.inputs[name])
        assert torch.equal(first.dataset.availability[:, i], second.dataset.availability[:, j])
        assert torch.equal(first.corrupted == i, second.corrupted == j)
    assert torch.equal(first.dataset.labels, second.dataset.labels)
    assert torch.equal(first.bayes_probability, second.bayes_probability)


def test_same_arguments_same_data_and_splits_differ() -> None:
    one = make_mechanism_split(_config(), 200, seed=1, split="train")
    two = make_mechanism_split(_config(), 200, seed=1, split="train")
    other = make_mechanism_split(_config(), 200, seed=1, split="val")
    assert torch.equal(one.dataset.inputs["a"], two.dataset.inputs["a"])
    assert not torch.equal(one.latent, other.latent)
    assert stable_seed(1, "x") == stable_seed(1, "x") != stable_seed(1, "y")


def test_labels_follow_the_bayes_probability() -> None:
    split = make_mechanism_split(_config(), 20_000, seed=0, split="train")
    probability, labels = split.bayes_probability, split.dataset.labels.squeeze(1)
    for low, high in ((0.0, 0.2), (0.4, 0.6), (0.8, 1.0)):
        band = (probability >= low) & (probability < high)
        assert labels[band].mean().item() == pytest.approx(
            probability[band].mean().item(), abs=0.02
        )


def test_links_linear_mlp_and_noise() -> None:
    config = _config()
    split = make_mechanism_split(config, 4000, seed=0, split="train")
    z, data = split.latent, split.dataset
    # Noiseless views: 'a' is exactly linear in its factors, 'b' (a tanh network) is not.
    linear = modality_signal(config, config.modalities[0], z)
    mlp = modality_signal(config, config.modalities[1], z)
    assert _r_squared(z[:, :4], linear) == pytest.approx(1.0, abs=1e-6)
    assert _r_squared(z[:, 4:], mlp) < 0.85
    assert mlp.std(0).mean().item() == pytest.approx(1.0, abs=0.15)  # 'signal' = unit scale
    # Each view reads only its own factors.
    assert _r_squared(z[:, 4:], linear) < 0.01 and _r_squared(z[:, :4], mlp) < 0.01
    # With noise of std 0.5 on unit-scale features, 'a' keeps R^2 ~ 1 / 1.25 = 0.8.
    assert _r_squared(z[:, :4], data.inputs["a"]) == pytest.approx(0.8, abs=0.05)
    # 'c' is pure noise: z explains nothing.
    keep_c = data.availability[:, 2]
    assert _r_squared(z[keep_c], data.inputs["c"][keep_c]) < 0.01


def test_missing_rates_differ_between_train_and_test_and_one_modality_stays() -> None:
    train = make_mechanism_split(_config(), 5000, seed=0, split="train")
    test = make_mechanism_split(_config(), 5000, seed=0, split="test")
    assert 1 - train.dataset.availability[:, 1].float().mean().item() == pytest.approx(
        0.2, abs=0.02
    )
    assert 1 - test.dataset.availability[:, 1].float().mean().item() == pytest.approx(0.8, abs=0.02)
    assert test.dataset.availability.any(dim=1).all()
    absent = ~test.dataset.availability[:, 1]
    assert test.dataset.inputs["b"][absent].abs().sum() == 0


def test_corruption_replaces_one_available_modality_per_flagged_sample() -> None:
    regime = CorruptionRegime(rate=0.4, modalities=["a", "b"], scale=3.0)
    clean = make_mechanism_split(_config(), 4000, seed=2, split="train")
    dirty = make_mechanism_split(_config(corruption=regime), 4000, seed=2, split="train")
    flags = dirty.corrupted
    assert (flags >= 0).float().mean().item() == pytest.approx(0.4, abs=0.03)
    assert set(flags.unique().tolist()) == {-1, 0, 1}
    hit_a = flags == 0
    assert torch.equal(dirty.dataset.inputs["a"][~hit_a], clean.dataset.inputs["a"][~hit_a])
    assert not torch.equal(dirty.dataset.inputs["a"][hit_a], clean.dataset.inputs["a"][hit_a])
    assert dirty.dataset.inputs["a"][hit_a].std().item() == pytest.approx(3.0, rel=0.05)
    assert _r_squared(dirty.latent[hit_a][:, :4], dirty.dataset.inputs["a"][hit_a]) < 0.05
    assert torch.equal(dirty.dataset.availability, clean.dataset.availability)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="needs latent_columns"):
        MechanismModality(name="x", link="mlp")
    with pytest.raises(ValidationError, match=r"latent_columns \[9\] outside"):
        MechanismDataConfig(
            modalities=[
                MechanismModality(name="x", latent_columns=[9]),
                MechanismModality(name="y", link="noise"),
            ],
            latent_dim=8,
        )
    with pytest.raises(ValidationError, match="unknown \\['z'\\]"):
        _config(corruption=CorruptionRegime(rate=0.1, modalities=["z"]))
    with pytest.raises(ValueError, match="positive sample count"):
        make_mechanism_split(_config(), 0, seed=0, split="train")


def test_explicit_label_weights_are_normalised_and_checked() -> None:
    config = _config(label_weights=[1.0] * 8)
    weights = label_weights(config)
    assert torch.allclose(weights, torch.full((8,), 8**-0.5))
    with pytest.raises(ValidationError, match="label_weights: expected 8 numbers"):
        _config(label_weights=[1.0, 2.0])

"""Behaviour of the training loop: learning, determinism, modality dropping, run outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from omnifuse_model.config import OmniFuseConfig, TrainConfig
from omnifuse_model.model import OmniFuse
from omnifuse_model.synthetic import (
    SyntheticFeatureConfig,
    SyntheticModality,
    make_synthetic_features,
)
from omnifuse_model.training import evaluate, fit, mine_laziness, sample_training_drop

SMALL = {"d": 16, "cra_hidden": (32, 16, 8), "num_blocks": 2}


def _data(task: str = "binary", num_classes: int = 1, seed: int = 0, n: int = 600):
    config = SyntheticFeatureConfig(
        modalities=[
            SyntheticModality(name="a", dim=12, signal=1.5, noise=0.5, missing_rate=0.2),
            SyntheticModality(name="b", dim=12, signal=1.0, noise=0.8, missing_rate=0.3),
            SyntheticModality(name="c", dim=12, signal=0.1, noise=3.0, missing_rate=0.3),
        ],
        task=task,
        num_classes=num_classes,
        seed=seed,
    )
    return config, make_synthetic_features(config, n)


def _model(config: SyntheticFeatureConfig, **overrides) -> OmniFuse:
    model_config = OmniFuseConfig(
        modalities=config.modality_specs(),
        task=config.task,
        num_classes=config.num_classes,
        **{**SMALL, **overrides},
    )
    return OmniFuse(model_config)


@torch.no_grad()
def _joint_loss(model: OmniFuse, data) -> float:
    model.eval()
    batch = data.subset(torch.arange(len(data)))
    output = model(batch.inputs, batch.availability, batch.masks, batch.labels)
    return float(output.losses["rs"])


def _train(**overrides) -> TrainConfig:
    base = {"epochs": 6, "batch_size": 64, "progress": False, "bootstrap_samples": 0, "lr": 3e-3}
    return TrainConfig(**{**base, **overrides})


@pytest.mark.parametrize(
    ("task", "num_classes", "epochs"),
    [("binary", 1, 6), ("multilabel", 4, 20), ("multiclass", 3, 6)],
)
def test_learning_loss_falls_and_auroc_well_above_chance(task, num_classes, epochs):
    torch.manual_seed(0)
    data_config, train = _data(task, num_classes, seed=0)
    _, test = _data(task, num_classes, seed=5, n=400)
    model = _model(data_config)
    before = _joint_loss(model, test)
    fit(model, train, None, _train(patience=0, epochs=epochs))
    assert _joint_loss(model, test) < 0.8 * before
    assert evaluate(model, test, _train()).metrics["auroc"] > 0.8


def test_fit_is_deterministic_under_a_seed():
    data_config, train = _data()
    _, val = _data(seed=1, n=200)
    outcomes = []
    for _ in range(2):
        torch.manual_seed(123)  # model init
        model = _model(data_config)
        result = fit(model, train, val, _train(epochs=2, seed=7))
        outcomes.append((result.history[-1].losses, evaluate(model, val, _train()).probabilities))
    assert outcomes[0][0] == outcomes[1][0]
    assert (outcomes[0][1] == outcomes[1][1]).all()


def test_early_stopping_restores_the_best_epoch(tmp_path):
    data_config, train = _data(n=300)
    _, val = _data(seed=1, n=200)
    model = _model(data_config)
    result = fit(model, train, val, _train(epochs=30, patience=2, lr=2e-2), run_dir=tmp_path)
    aurocs = [record.val_metrics["auroc"] for record in result.history]
    assert result.best_epoch == 1 + max(range(len(aurocs)), key=aurocs.__getitem__)
    assert result.stopped_early == (len(result.history) < 30)
    restored = evaluate(model, val, _train()).metrics["auroc"]
    assert restored == pytest.approx(result.best_val_auroc, abs=1e-9)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["fit"]["best_epoch"] == result.best_epoch
    assert json.loads((tmp_path / "config.json").read_text())["train"]["patience"] == 2
    reloaded = OmniFuse.from_checkpoint(tmp_path / "checkpoint")
    assert evaluate(reloaded, val, _train()).metrics["auroc"] == pytest.approx(restored)


def test_tla_mining_runs_every_epoch_and_finds_the_noisy_modality():
    data_config, train = _data(n=800)
    model = _model(data_config)
    result = fit(model, train, None, _train(epochs=6, patience=0))
    assert all(record.laziness is not None for record in result.history)
    assert result.history[-1].laziness["lazy_combination"] == ["c"]
    assert model.lazy_combination == ("c",)


def test_no_mining_without_tla():
    data_config, train = _data(n=200)
    model = _model(data_config, use_tla=False)
    result = fit(model, train, None, _train(epochs=1))
    assert result.history[0].laziness is None and model.lazy_combination is None


def test_training_drop_keeps_a_proper_nonempty_subset_of_present_modalities():
    generator = torch.Generator().manual_seed(0)
    patterns = torch.tensor(
        [[a, b, c, d] for a in (0, 1) for b in (0, 1) for c in (0, 1) for d in (0, 1)],
        dtype=torch.bool,
    )
    availability = patterns.repeat(200, 1)
    drop = sample_training_drop(availability, 1.0, generator)
    kept = availability & ~drop
    assert not (drop & ~availability).any(), "only present modalities may be hidden"
    multi = availability.sum(1) >= 2
    assert (kept[multi].sum(1) >= 1).all()
    assert (kept[multi].sum(1) < availability[multi].sum(1)).all()
    assert not drop[~multi].any(), "a lone modality is never hidden"
    # every proper non-empty subset occurs for complete samples (M = 4: 14 of them)
    full = availability.all(1)
    assert len({tuple(row.tolist()) for row in kept[full]}) == 14


def test_training_drop_rate_is_respected():
    generator = torch.Generator().manual_seed(1)
    availability = torch.ones(4000, 3, dtype=torch.bool)
    rate = sample_training_drop(availability, 0.3, generator).any(1).float().mean()
    assert rate == pytest.approx(0.3, abs=0.03)
    assert not sample_training_drop(availability, 0.0, generator).any()


def test_evaluate_reports_audit_aggregates():
    data_config, data = _data(n=200)
    model = _model(data_config)
    result = evaluate(model, data, _train(bootstrap_samples=20))
    assert set(result.mean_dwfuse_weight) == {"a", "b", "c"}
    assert all(0.0 <= w <= 1.0 for w in result.mean_dwfuse_weight.values())
    assert all(e >= 0 and not math.isnan(e) for e in result.imputation_error.values())
    assert result.availability_counts == {
        name: int(data.availability[:, i].sum()) for i, name in enumerate("abc")
    }
    assert result.metrics["auroc_low"] <= result.metrics["auroc"] <= result.metrics["auroc_high"]


def test_evaluation_batch_size_and_skipped_imputation_error_change_no_metric():
    data_config, data = _data(n=300)
    model = _model(data_config)
    full = evaluate(model, data, _train(eval_batch_size=7))
    large = evaluate(model, data, _train(eval_batch_size=512))
    metrics_only = evaluate(model, data, _train(), imputation_error=False)

    for result in (large, metrics_only):
        assert result.metrics == pytest.approx(full.metrics, abs=1e-12)
        assert result.mean_dwfuse_weight == pytest.approx(full.mean_dwfuse_weight, abs=1e-6)
        torch.testing.assert_close(
            torch.from_numpy(result.probabilities), torch.from_numpy(full.probabilities)
        )
    assert large.imputation_error == pytest.approx(full.imputation_error, rel=1e-5)
    assert all(math.isnan(e) for e in metrics_only.imputation_error.values())


def test_mining_does_not_depend_on_the_evaluation_batch_size():
    data_config, data = _data(n=300)
    model = _model(data_config)
    small = mine_laziness(model, data, _train(eval_batch_size=5))
    large = mine_laziness(model, data, _train(eval_batch_size=1000))
    assert small.lazy_combination == large.lazy_combination
    assert small.counts == large.counts
    assert small.scores == pytest.approx(large.scores, rel=1e-5)


def _cpu_bfloat16(_config: TrainConfig):
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16)


def test_evaluation_is_float32_even_with_mixed_precision(monkeypatch):
    """bfloat16 logits tie across samples and move AUROC; evaluation must score in float32
    when training runs in mixed precision (forced here on CPU) and inside a caller's
    autocast region."""
    import omnifuse_model.training as training
    from omnifuse_model.metrics import classification_report

    config, data = _data(n=600)
    torch.manual_seed(0)
    model = _model(config)
    train = _train(mixed_precision=True)
    reference = evaluate(model, data, train)
    # the premise: in bfloat16 this model's scores tie, and AUROC moves
    with torch.no_grad(), _cpu_bfloat16(train):
        batch = data.subset(torch.arange(len(data)))
        low = torch.sigmoid(model.eval()(batch.inputs, batch.availability).logits.float())
    assert len(torch.unique(low)) < len(low) * 0.9
    low_auroc = classification_report(reference.labels, low.numpy(), "binary", 0, 0)["auroc"]
    assert low_auroc != reference.metrics["auroc"]

    monkeypatch.setattr(training, "autocast", _cpu_bfloat16)  # mixed precision "on" on CPU
    with _cpu_bfloat16(train):  # and a caller's autocast region around the call
        result = evaluate(model, data, train)
    assert len(set(result.probabilities.ravel().tolist())) == len(
        set(reference.probabilities.ravel().tolist())
    )
    assert result.probabilities.dtype == reference.probabilities.dtype
    assert (result.probabilities == reference.probabilities).all()
    assert result.metrics["auroc"] == reference.metrics["auroc"]
    for name, value in reference.mean_dwfuse_weight.items():
        assert result.mean_dwfuse_weight[name] == value


def test_without_validation_fit_keeps_the_lowest_training_loss_less_tla(monkeypatch):
    """No validation split: the restored epoch is the one of the lowest mean training loss
    without its TLA term (epoch 1 has no L_TLA, so raw totals would favour it), as fit's
    docstring and METHOD.md say."""
    import omnifuse_model.training as training

    config, data = _data(n=64)
    model = _model(config, lambda3=0.5)
    # per epoch: (total, tla); total less 0.5 * tla = 1.0, 0.95, 0.85, 0.9
    script = [(1.0, None), (1.2, 0.5), (1.1, 0.5), (1.15, 0.5)]

    def scripted_epoch(epoch, model, *_args):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(float(epoch))  # the weights say which epoch they are from
        total, tla = script[epoch - 1]
        losses = {"total": total} if tla is None else {"total": total, "tla": tla}
        return training.EpochRecord(epoch, losses, {}, None, 0.0, 0.0)

    monkeypatch.setattr(training, "_run_epoch", scripted_epoch)
    result = fit(model, data, None, _train(epochs=4, patience=0))
    assert result.best_epoch == 3
    assert math.isnan(result.best_val_auroc)
    assert all(bool((p == 3.0).all()) for p in model.parameters())

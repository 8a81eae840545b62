"""The DP-SGD variant of the model (``dp_compatible``): Opacus can train it, and its
per-sample gradients are those of each sample run alone."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import GradSampleModule
from opacus.layers import DPLSTM
from opacus.validators import ModuleValidator

from omnifuse_model.laziness import LazinessReport
from omnifuse_model.model import OmniFuse

FUSIONS = ["dwfuse", "lstm"]


def _dp_model(make_config, fusion: str, **overrides) -> OmniFuse:
    torch.manual_seed(0)
    config = make_config(4, fusion=fusion, dp_compatible=True, **overrides)
    model = OmniFuse(config)
    names = config.modality_names
    model.set_laziness(LazinessReport(lazy_combination=(names[1], names[2])))
    return model


@pytest.mark.parametrize("fusion", FUSIONS)
def test_dp_variant_is_finite_for_every_availability_pattern(
    make_config, make_batch, all_patterns, fusion
):
    model = _dp_model(make_config, fusion)
    model.train()
    availability = all_patterns(4)[1:]  # every non-empty pattern
    batch = make_batch(model.config, availability)
    output = model(**batch.forward_kwargs())
    assert torch.isfinite(output.logits).all()
    assert {"forward", "backward", "fusion", "tla", "total"} <= set(output.losses)
    assert all(torch.isfinite(v) for v in output.losses.values())
    output.losses["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_dp_variant_predicts_what_the_default_model_predicts(
    make_config, make_batch, all_patterns, fusion
):
    """Same weights, same function: DPLSTM for nn.LSTM, placeholders per sample."""
    dp_model = _dp_model(make_config, fusion)
    default = OmniFuse(dp_model.config.model_copy(update={"dp_compatible": False}))
    assert list(dp_model.state_dict()) == list(default.state_dict())  # same keys, same order
    default.load_state_dict(dp_model.state_dict())
    dp_model.load_state_dict(default.state_dict())
    assert isinstance(dp_model.encoders.encoders["timeseries_0"].lstm, DPLSTM)
    assert isinstance(default.encoders.encoders["timeseries_0"].lstm, torch.nn.LSTM)
    batch = make_batch(dp_model.config, all_patterns(4)[1:])
    dp_model.eval(), default.eval()
    with torch.no_grad():
        ours = dp_model(batch.inputs, batch.availability, batch.masks)
        theirs = default(batch.inputs, batch.availability, batch.masks)
        distances = dp_model.combination_distances(
            batch.inputs, batch.availability, batch.labels, batch.masks
        )[0]
        expected = default.combination_distances(
            batch.inputs, batch.availability, batch.labels, batch.masks
        )[0]
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(distances, expected, atol=1e-5, rtol=1e-4)


def test_opacus_refuses_the_default_model_and_accepts_the_dp_variant(make_config):
    default = OmniFuse(make_config(4))
    assert any("LSTM" in str(error) for error in ModuleValidator.validate(default))
    assert ModuleValidator.validate(_dp_model(make_config, "lstm")) == []


@pytest.mark.parametrize(
    ("fusion", "overrides"),
    [
        ("dwfuse", {}),
        ("lstm", {}),
        ("dwfuse", {"use_backward_imputation": False, "use_forward_imputation": False}),
    ],
)
def test_per_sample_gradients_equal_each_sample_run_alone(
    make_config, make_batch, fusion, overrides
):
    """Opacus' per-sample gradient of sample i (loss reduction 'mean') is the gradient of
    the model on sample i alone: every module call sees the batch, and every loss is a
    mean of per-sample terms. Dropout is off; dropping and TLA are on."""
    model = _dp_model(make_config, fusion, dropout=0.0, **overrides)
    reference = OmniFuse(model.config)
    reference.load_state_dict(model.state_dict())
    reference.set_laziness(model.laziness)
    availability = torch.tensor(
        [[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1], [0, 0, 0, 1], [1, 1, 1, 0]],
        dtype=torch.bool,
    )
    batch = make_batch(model.config, availability, seed=3)
    drop = torch.zeros_like(availability)
    drop[0, 1] = drop[5, 0] = True  # hidden at training time: imputation targets
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook")
        wrapped = GradSampleModule(model)
        model.train()
        wrapped(**batch.forward_kwargs(), drop=drop).losses["total"].backward()
    reference.train()
    for i in range(len(availability)):
        reference.zero_grad()
        alone = reference(
            {k: v[i : i + 1] for k, v in batch.inputs.items()},
            availability[i : i + 1],
            {k: v[i : i + 1] for k, v in batch.masks.items()},
            batch.labels[i : i + 1],
            drop[i : i + 1],
        )
        alone.losses["total"].backward()
        for (name, parameter), (_, single) in zip(
            model.named_parameters(), reference.named_parameters(), strict=True
        ):
            assert parameter.grad_sample is not None, name
            torch.testing.assert_close(
                parameter.grad_sample[i],
                single.grad,
                atol=1e-6,
                rtol=1e-4,
                msg=lambda m, n=name, s=i: f"{n}, sample {s}: {m}",
            )
    wrapped._close()

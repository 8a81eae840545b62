"""Config validation: a bad value is a ValidationError that names the offending field."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from omnifuse_model.config import ModalitySpec, OmniFuseConfig, TrainConfig


def _modalities() -> list[dict]:
    return [
        {"name": "ehr", "kind": "timeseries", "input_dim": 76, "seq_len": 24},
        {"name": "cxr", "kind": "image_features", "input_dim": 512},
        {"name": "rep", "kind": "token_states", "input_dim": 768, "seq_len": 150},
    ]


def _assert_names(error: ValidationError, field: str) -> None:
    """The message names ``field``, as a location part or as a word of an error message."""
    assert field in str(error)
    word = re.compile(rf"\b{re.escape(field)}\b")
    hits = [
        e
        for e in error.errors()
        if field in [str(part) for part in e["loc"]] or word.search(e["msg"])
    ]
    assert hits, f"no error names {field!r}: {error.errors()}"


def _config(**changes) -> dict:
    values = {"modalities": _modalities(), "task": "binary"}
    values.update(changes)
    return values


def test_valid_config_and_paper_defaults():
    config = OmniFuseConfig(**_config())
    assert config.num_modalities == 3
    assert config.modality_names == ["ehr", "cxr", "rep"]
    assert (config.num_blocks, config.alpha, config.beta) == (5, 0.1, 0.5)
    assert (config.lambda1, config.lambda2, config.lambda3) == (1.0, 10.0, 0.5)
    assert config.modalities[0].input_shape == (24, 76)
    assert config.modalities[1].input_shape == (512,)
    # a dumped config validates back to an equal one (checkpoints rely on it)
    assert OmniFuseConfig.model_validate(config.model_dump(mode="json")) == config


def _modality(index: int, **changes) -> list[dict]:
    modalities = _modalities()
    modalities[index].update(changes)
    return modalities


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_classes": 2}, "num_classes"),  # binary needs 1
        ({"task": "multiclass", "num_classes": 1}, "num_classes"),
        ({"num_classes": 0}, "num_classes"),
        ({"d": 0}, "d"),
        ({"d": -4}, "d"),
        ({"num_blocks": 0}, "num_blocks"),
        ({"cra_hidden": ()}, "cra_hidden"),
        ({"dropout": 1.0}, "dropout"),
        ({"beta": -0.5}, "beta"),
        ({"lambda2": -1.0}, "lambda2"),
        ({"fusion": "bogus"}, "fusion"),
        ({"task": "regression"}, "task"),
        ({"tla_distance": "l2"}, "tla_distance"),
        ({"tla_reduction": "max"}, "tla_reduction"),
        ({"modalities": _modalities()[:1]}, "modalities"),  # one modality only
        ({"modalities": [*_modalities(), _modalities()[0]]}, "ehr"),  # duplicate name
        ({"modalities": _modality(0, seq_len=None)}, "seq_len"),  # timeseries without it
        ({"modalities": _modality(2, seq_len=None)}, "seq_len"),  # token_states without it
        ({"modalities": _modality(1, seq_len=7)}, "seq_len"),  # image features with it
        ({"modalities": _modality(1, kind="video")}, "kind"),
        ({"modalities": _modality(1, input_dim=0)}, "input_dim"),
        ({"modalities": _modality(1, name="")}, "name"),
        ({"modalities": _modality(1, extra_key=1)}, "extra_key"),
        ({"lamda1": 1.0}, "lamda1"),  # misspelt key: extra="forbid"
        ({"use_forward_imputation": False}, "use_backward_imputation"),
    ],
)
def test_bad_model_config_names_the_field(changes, field):
    with pytest.raises(ValidationError) as excinfo:
        OmniFuseConfig(**_config(**changes))
    _assert_names(excinfo.value, field)


def test_duplicate_modality_names_are_named_as_such():
    with pytest.raises(ValidationError) as excinfo:
        OmniFuseConfig(**_config(modalities=[*_modalities(), _modalities()[1]]))
    _assert_names(excinfo.value, "modalities")
    _assert_names(excinfo.value, "cxr")
    assert "unique" in str(excinfo.value)


def test_vector_with_seq_len_names_the_modality():
    with pytest.raises(ValidationError) as excinfo:
        ModalitySpec(name="labs", kind="vector", input_dim=5, seq_len=3)
    _assert_names(excinfo.value, "seq_len")
    _assert_names(excinfo.value, "labs")


def test_ablation_without_any_imputation_is_valid():
    config = OmniFuseConfig(**_config(use_forward_imputation=False, use_backward_imputation=False))
    assert not config.use_forward_imputation


def test_assignment_is_validated():
    config = OmniFuseConfig(**_config())
    with pytest.raises(ValidationError) as excinfo:
        config.d = 0
    _assert_names(excinfo.value, "d")
    with pytest.raises(ValidationError) as excinfo:
        config.fusion = "bogus"
    _assert_names(excinfo.value, "fusion")


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"drop_rate": 1.5}, "drop_rate"),
        ({"drop_rate": -0.1}, "drop_rate"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"seed": -1}, "seed"),
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"patience": -1}, "patience"),
        ({"epoch": 3}, "epoch"),  # misspelt key
    ],
)
def test_bad_train_config_names_the_field(values, field):
    with pytest.raises(ValidationError) as excinfo:
        TrainConfig(**values)
    _assert_names(excinfo.value, field)


def test_train_config_edges_are_valid():
    assert TrainConfig(drop_rate=0.0).drop_rate == 0.0
    assert TrainConfig(drop_rate=1.0).drop_rate == 1.0
    assert TrainConfig(grad_clip=None).grad_clip is None

"""Self-describing checkpoints: weights + config + laziness round-trip exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from omnifuse_model.laziness import LazinessReport
from omnifuse_model.model import CONFIG_FILE, WEIGHTS_FILE, OmniFuse


def _trained_a_little(model: OmniFuse, batch) -> None:
    """One optimiser step, so the saved weights differ from any fresh initialisation."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(**batch.forward_kwargs()).losses["total"].backward()
    optimizer.step()


@pytest.mark.parametrize(("fusion", "task"), [("dwfuse", "multilabel"), ("lstm", "multiclass")])
def test_round_trip_gives_identical_predictions(
    make_config, make_batch, all_patterns, tmp_path, fusion, task
):
    torch.manual_seed(0)
    config = make_config(4, task, fusion, cra_hidden=(16, 8, 4))
    model = OmniFuse(config)
    batch = make_batch(config, all_patterns(4))
    _trained_a_little(model, batch)
    report = LazinessReport(
        lazy_combination=tuple(config.modality_names[1:3]),
        scores={"a": 0.25, "b+c": 1.5},
        counts={"a": 4, "b+c": 2},
        distance_sums={"a": 1.0, "b+c": 3.0},
    )
    model.set_laziness(report)
    model.eval()

    directory = model.save_checkpoint(tmp_path / "ckpt", extra={"round": 3})
    torch.manual_seed(123)  # a different initialisation that loading must overwrite
    restored = OmniFuse.from_checkpoint(directory).eval()

    assert restored.config == config
    assert restored.laziness == report
    assert restored.lazy_combination == tuple(config.modality_names[1:3])
    expected, actual = model(**batch.forward_kwargs()), restored(**batch.forward_kwargs())
    assert torch.equal(actual.logits, expected.logits)
    assert torch.equal(actual.completed, expected.completed)
    if fusion == "dwfuse":
        assert torch.equal(actual.modality_logits, expected.modality_logits)
    assert torch.equal(actual.losses["total"], expected.losses["total"])  # includes L_TLA
    meta = json.loads((directory / CONFIG_FILE).read_text())
    assert meta["extra"] == {"round": 3}


def test_round_trip_without_laziness(make_config, make_batch, all_patterns, tmp_path):
    torch.manual_seed(0)
    config = make_config(2, use_forward_imputation=False, use_backward_imputation=False)
    model = OmniFuse(config).eval()
    restored = OmniFuse.from_checkpoint(model.save_checkpoint(tmp_path)).eval()
    assert restored.laziness is None
    assert restored.forward_cra is None
    batch = make_batch(config, all_patterns(2))
    assert torch.equal(
        restored(**batch.forward_kwargs()).logits, model(**batch.forward_kwargs()).logits
    )


@pytest.mark.parametrize("missing", [WEIGHTS_FILE, CONFIG_FILE])
def test_missing_file_raises_and_names_it(make_config, tmp_path, missing):
    OmniFuse(make_config(2)).save_checkpoint(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        OmniFuse.from_checkpoint(tmp_path)


def test_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE.replace(".", r"\.")):
        OmniFuse.from_checkpoint(tmp_path / "nowhere")


def test_weights_that_do_not_match_the_config_are_refused_naming_the_tensor(make_config, tmp_path):
    """load_state_dict casts a wrong dtype silently: a float64 tensor was accepted."""
    OmniFuse(make_config(2)).save_checkpoint(tmp_path)
    weights = load_file(str(tmp_path / WEIGHTS_FILE))
    key = sorted(weights)[0]
    weights[key] = weights[key].double()
    save_file(weights, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=f"{WEIGHTS_FILE}.*{key} is .* torch.float64, expected"):
        OmniFuse.from_checkpoint(tmp_path)

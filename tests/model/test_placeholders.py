"""The missing-modality placeholder e_m(0): the same in training and evaluation, and never
one dropout mask shared by a batch's missing rows (encoder dropout hits real inputs only)."""

from __future__ import annotations

import pytest
import torch

from omnifuse_model.encoders import ModalityEncoders, dropout_off


def _encoders(make_config, dp_compatible: bool) -> ModalityEncoders:
    torch.manual_seed(0)
    config = make_config(4, dropout=0.5, dp_compatible=dp_compatible)
    return ModalityEncoders(config.modalities, config.d, config.dropout, dp_compatible)


@pytest.mark.parametrize("dp_compatible", [False, True])
def test_training_placeholder_is_the_evaluation_placeholder(make_config, dp_compatible):
    encoders = _encoders(make_config, dp_compatible)
    batch = 6 if dp_compatible else None
    with torch.no_grad():
        reference = encoders.eval().placeholders(torch.device("cpu"), batch)
        encoders.train()
        for _ in range(3):  # dropout 0.5 would change it on every draw
            torch.testing.assert_close(encoders.placeholders(torch.device("cpu"), batch), reference)
    assert all(layer.training for layer in encoders.modules())  # modes restored


@pytest.mark.parametrize("dp_compatible", [False, True])
def test_missing_rows_hold_the_evaluation_placeholder_and_present_rows_keep_dropout(
    make_config, make_batch, dp_compatible
):
    encoders = _encoders(make_config, dp_compatible)
    config = make_config(4, dropout=0.5)
    availability = torch.zeros(8, 4, dtype=torch.bool)
    availability[:4] = True  # rows 0-3 hold everything, rows 4-7 nothing
    batch = make_batch(config, availability, seed=3)
    with torch.no_grad():
        evaluation, placeholder = encoders.eval()(batch.inputs, availability, batch.masks)
        training, _ = encoders.train()(batch.inputs, availability, batch.masks)
    expected = placeholder if placeholder.dim() == 2 else placeholder[0]
    for row in range(4, 8):
        torch.testing.assert_close(training[row], expected)
        torch.testing.assert_close(evaluation[row], expected)
    # real inputs still get encoder dropout in training (the switch touched the placeholder only)
    assert not torch.allclose(training[:4], evaluation[:4])


def test_placeholder_still_learns_in_training(make_config):
    encoders = _encoders(make_config, False).train()
    placeholder = encoders.placeholders(torch.device("cpu"))
    placeholder.sum().backward()
    grads = [p.grad for p in encoders.parameters() if p.grad is not None]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads)


def test_dropout_off_restores_the_mode_after_an_error():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    with pytest.raises(RuntimeError), dropout_off(module):
        assert not module[1].training and module[0].training
        raise RuntimeError("boom")
    assert module[1].training and module[0].training

"""Every availability pattern, every fusion head and every task: finite outputs and gradients.

One batch holds all 2^M availability rows (including the all-absent one), so a single
forward/backward exercises every missing-modality case of the model at once.
"""

from __future__ import annotations

import pytest
import torch

from omnifuse_model.fusion import dwfuse_weights
from omnifuse_model.laziness import LazinessReport
from omnifuse_model.model import OmniFuse

FUSIONS = ("dwfuse", "concat", "sum", "se_gate", "lstm")
TASKS = ("binary", "multilabel", "multiclass")


def _assert_encoder_gradients(model: OmniFuse) -> None:
    for spec in model.config.modalities:
        named = list(model.encoders.encoders[spec.name].named_parameters())
        assert named, spec.name
        for name, parameter in named:
            assert parameter.grad is not None, f"{spec.name}.{name} received no gradient"
        total = sum(parameter.grad.abs().sum() for _, parameter in named)
        assert total > 0, f"encoder of '{spec.name}' got an all-zero gradient"
        # Biases feeding a softmax (attention scores) are shift-invariant and may get an exactly
        # zero gradient; every weight matrix must still learn.
        for name, parameter in named:
            if parameter.dim() >= 2:
                assert parameter.grad.abs().sum() > 0, f"{spec.name}.{name}: zero gradient"


@pytest.mark.parametrize("lazy", [False, True], ids=["no_lazy", "lazy"])
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("num_modalities", [2, 3, 4])
def test_every_pattern_gives_finite_outputs_and_gradients(
    make_config, make_batch, all_patterns, num_modalities, fusion, task, lazy
):
    torch.manual_seed(0)
    config = make_config(num_modalities, task, fusion)
    model = OmniFuse(config)
    if lazy:
        model.set_laziness(LazinessReport(lazy_combination=tuple(config.modality_names[:2])))
    availability = all_patterns(num_modalities)
    batch = make_batch(config, availability)

    output = model(**batch.forward_kwargs())

    size = availability.shape[0]
    assert output.logits.shape == (size, config.num_classes)
    assert torch.isfinite(output.logits).all()
    assert torch.isfinite(output.completed).all()
    expected_keys = {"total", "fusion", "forward", "backward"}
    if fusion == "dwfuse":
        expected_keys |= {"ens", "rs"}
        assert output.modality_logits.shape == (size, num_modalities, config.num_classes)
        assert output.dwfuse_weights.shape == (size, num_modalities)
        assert ((output.dwfuse_weights >= 0) & (output.dwfuse_weights <= 1)).all()
    else:
        assert output.modality_logits is None
        assert output.dwfuse_weights is None
    if lazy:
        expected_keys.add("tla")
        # rows holding the lazy pair exist in the all-patterns batch, so L_TLA is a real CE
        assert output.losses["tla"] > 0
    assert set(output.losses) == expected_keys
    for name, loss in output.losses.items():
        assert loss.dim() == 0, name
        assert torch.isfinite(loss), name

    output.losses["total"].backward()

    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), f"non-finite gradient in {name}"
    _assert_encoder_gradients(model)


def test_drop_hides_present_modalities(make_config, make_batch, all_patterns):
    torch.manual_seed(0)
    config = make_config(3)
    model = OmniFuse(config).eval()
    availability = all_patterns(3)
    batch = make_batch(config, availability)
    drop = torch.zeros_like(availability)
    drop[:, 0] = True  # hide modality 0 wherever present (and ask to hide it where absent)
    drop[5, 2] = True

    output = model(**batch.forward_kwargs(), drop=drop)

    expected = availability & ~drop
    assert output.input_availability.dtype == torch.bool
    assert torch.equal(output.input_availability, expected)
    # For the prediction, hiding a modality is the same as the data not holding it.
    reduced = model(batch.inputs, expected, batch.masks)
    torch.testing.assert_close(output.logits, reduced.logits)
    torch.testing.assert_close(output.completed, reduced.completed)


def test_drop_none_uses_the_availability(make_config, make_batch, all_patterns):
    config = make_config(2)
    model = OmniFuse(config).eval()
    availability = all_patterns(2)
    output = model(**make_batch(config, availability).forward_kwargs())
    assert torch.equal(output.input_availability, availability)


@pytest.mark.parametrize("task", TASKS)
def test_forward_without_labels_has_no_losses_but_weights(
    make_config, make_batch, all_patterns, task
):
    torch.manual_seed(0)
    config = make_config(3, task)
    model = OmniFuse(config).eval()
    availability = all_patterns(3)
    batch = make_batch(config, availability)

    output = model(batch.inputs, availability, batch.masks)

    assert output.losses == {}
    assert output.dwfuse_weights is not None
    assert output.dwfuse_weights.shape == (availability.shape[0], 3)
    # Without labels each head's confidence replaces the true-label probability.
    logits = output.modality_logits
    if task == "multiclass":
        confidence = torch.softmax(logits, dim=-1).max(dim=-1).values
    else:
        probs = torch.sigmoid(logits)
        confidence = torch.maximum(probs, 1 - probs)  # [B, M, C]
    if task == "multilabel":  # omega per label, then its mean over labels
        per_label = [
            dwfuse_weights(confidence[:, :, c], config.beta) for c in range(logits.shape[2])
        ]
        expected = torch.stack(per_label, dim=2)
        torch.testing.assert_close(output.dwfuse_label_weights, expected)
        expected = expected.mean(dim=2)
    else:
        expected = dwfuse_weights(
            confidence.squeeze(-1) if task == "binary" else confidence, config.beta
        )
    torch.testing.assert_close(output.dwfuse_weights, expected)


def test_encoders_put_the_placeholder_at_absent_positions(make_config, make_batch, all_patterns):
    """Eq. 2-3: an absent modality is v_m^miss = e_m(0) whatever the input holds there."""
    torch.manual_seed(0)
    num_modalities = 4  # one modality of every kind
    config = make_config(num_modalities)
    model = OmniFuse(config).eval()
    availability = all_patterns(num_modalities)
    batch = make_batch(config, availability)
    for index, spec in enumerate(config.modalities):
        absent = ~availability[:, index]
        batch.inputs[spec.name][absent] = torch.randn_like(batch.inputs[spec.name][absent])
        if spec.name in batch.masks:
            batch.masks[spec.name][absent] = True

    embeddings, placeholders = model.encoders(batch.inputs, availability, batch.masks)

    assert placeholders.shape == (num_modalities, config.d)
    assert placeholders.requires_grad  # a learned function of the encoder, not a constant
    for index, spec in enumerate(config.modalities):
        encoder = model.encoders.encoders[spec.name]
        zero = torch.zeros((1, *spec.input_shape))
        no_tokens = torch.zeros((1, spec.seq_len or 1), dtype=torch.bool)
        torch.testing.assert_close(placeholders[index], encoder(zero, no_tokens)[0])
        absent = ~availability[:, index]
        expected = placeholders[index].expand(int(absent.sum()), -1)
        torch.testing.assert_close(embeddings[absent, index], expected)
        present = encoder(batch.inputs[spec.name], batch.masks.get(spec.name))[~absent]
        torch.testing.assert_close(embeddings[~absent, index], present)
        assert not torch.allclose(present, placeholders[index].expand_as(present))


def test_token_encoder_ignores_padding_tokens(make_config):
    """Only real tokens (mask True) enter the attention pooling."""
    torch.manual_seed(0)
    config = make_config(3)
    spec = config.modalities[2]
    assert spec.kind == "token_states"
    encoder = OmniFuse(config).encoders.encoders[spec.name].eval()
    x = torch.randn(2, spec.seq_len, spec.input_dim)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    padded = x.clone()
    padded[~mask] = 100.0

    torch.testing.assert_close(encoder(padded, mask), encoder(x, mask))
    # a single real token pools to itself
    torch.testing.assert_close(encoder(x, mask)[1], encoder.net(x[1, 0]))
    # without a mask every token counts
    assert not torch.allclose(encoder(padded, None), encoder(x, None))


def test_non_finite_content_at_absent_positions_is_ignored(make_config, make_batch, all_patterns):
    torch.manual_seed(0)
    config = make_config(3)
    model = OmniFuse(config)
    availability = all_patterns(3)
    batch = make_batch(config, availability)
    for index, spec in enumerate(config.modalities):
        batch.inputs[spec.name][~availability[:, index]] = float("nan")

    output = model(**batch.forward_kwargs())
    assert torch.isfinite(output.losses["total"])
    output.losses["total"].backward()

    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), f"non-finite gradient in {name}"


def _nan_at_absent(config, batch, availability):
    poisoned = {name: x.clone() for name, x in batch.inputs.items()}
    for index, spec in enumerate(config.modalities):
        poisoned[spec.name][~availability[:, index]] = float("nan")
    return poisoned


@pytest.mark.parametrize("dp_compatible", [False, True], ids=["default", "dp_compatible"])
def test_absent_content_changes_nothing_with_or_without_autograd(
    make_config, make_batch, all_patterns, dp_compatible
):
    """The three encoding paths (no autograd: all rows as they are; autograd: present rows
    only; DP: zeroed rows) give the embeddings of all-zero absent inputs, NaN or not."""
    torch.manual_seed(0)
    config = make_config(4, dp_compatible=dp_compatible)
    model = OmniFuse(config).eval()  # no dropout: the paths must agree exactly
    availability = all_patterns(4)
    batch = make_batch(config, availability)
    poisoned = _nan_at_absent(config, batch, availability)

    reference, _ = model.encoders(batch.inputs, availability, batch.masks)
    with torch.no_grad():
        no_grad, _ = model.encoders(poisoned, availability, batch.masks)
    with_grad, _ = model.encoders(poisoned, availability, batch.masks)

    assert torch.isfinite(reference).all()
    torch.testing.assert_close(no_grad, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(with_grad, reference, rtol=0, atol=1e-6)
    with torch.no_grad():
        predicted = model(poisoned, availability, batch.masks).logits
    torch.testing.assert_close(predicted, model(**batch.forward_kwargs()).logits.detach())


def test_encoding_present_rows_only_gives_the_per_row_gradients(make_config, make_batch):
    """Autograd path: encoding the present rows alone equals encoding each row by itself."""
    torch.manual_seed(0)
    config = make_config(3)
    model = OmniFuse(config).eval()
    availability = torch.tensor([[1, 1, 0], [1, 0, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    batch = make_batch(config, availability)
    encoders = model.encoders

    embeddings, _ = encoders(batch.inputs, availability, batch.masks)
    embeddings.pow(2).sum().backward()
    batched = {n: p.grad.clone() for n, p in encoders.named_parameters()}

    encoders.zero_grad()
    for row in range(len(availability)):
        single = {name: x[row : row + 1] for name, x in batch.inputs.items()}
        masks = {name: m[row : row + 1] for name, m in batch.masks.items()}
        embedded, _ = encoders(single, availability[row : row + 1], masks)
        embedded.pow(2).sum().backward()
    for name, parameter in encoders.named_parameters():
        torch.testing.assert_close(parameter.grad, batched[name], rtol=1e-5, atol=1e-6)


def test_a_modality_absent_from_the_whole_batch_is_not_encoded(make_config, make_batch):
    torch.manual_seed(0)
    config = make_config(3)
    model = OmniFuse(config)
    availability = torch.tensor([[1, 0, 1], [1, 0, 0]], dtype=torch.bool)
    batch = make_batch(config, availability)

    embeddings, placeholders = model.encoders(batch.inputs, availability, batch.masks)
    embeddings.sum().backward()

    torch.testing.assert_close(embeddings[:, 1], placeholders[1].expand(2, -1))
    absent_encoder = model.encoders.encoders[config.modality_names[1]]
    # its parameters learn only through the placeholder e_m(0)
    assert all(p.grad is not None for p in absent_encoder.parameters() if p.dim() >= 2)

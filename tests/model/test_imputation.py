"""The cascade residual autoencoder (Eq. 4-6) and the masked imputation loss (Eq. 7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from omnifuse_model.imputation import CascadeResidualAutoencoder, masked_mse
from omnifuse_model.model import OmniFuse


def _linears(sequential: nn.Sequential) -> list[nn.Linear]:
    return [layer for layer in sequential if isinstance(layer, nn.Linear)]


def _phi(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One residual autoencoder by hand: Linear-ReLU-Linear to the latent, ReLU, mirror back."""
    enc1, enc2 = _linears(block.encoder)
    dec1, dec2 = _linears(block.decoder)
    latent = F.linear(torch.relu(F.linear(x, enc1.weight, enc1.bias)), enc2.weight, enc2.bias)
    hidden = torch.relu(F.linear(torch.relu(latent), dec1.weight, dec1.bias))
    return F.linear(hidden, dec2.weight, dec2.bias), latent


def test_cascade_follows_eq_4_and_5():
    torch.manual_seed(0)
    cascade = CascadeResidualAutoencoder(d_in=4, num_blocks=3, hidden=(3, 2))
    assert len(cascade.blocks) == 3
    # widths d_in -> 3 -> 2 and back 2 -> 3 -> 4
    for block in cascade.blocks:
        shapes = [tuple(layer.weight.shape) for layer in _linears(block.encoder)]
        shapes += [tuple(layer.weight.shape) for layer in _linears(block.decoder)]
        assert shapes == [(3, 4), (2, 3), (3, 2), (4, 3)]
    v = torch.randn(5, 4)

    dz1, s1 = _phi(cascade.blocks[0], v)
    dz2, s2 = _phi(cascade.blocks[1], v + dz1)
    dz3, s3 = _phi(cascade.blocks[2], v + dz1 + dz2)

    result = cascade(v)
    torch.testing.assert_close(result.output, v + dz1 + dz2 + dz3)
    torch.testing.assert_close(result.latents, torch.cat([s1, s2, s3], dim=1))
    assert cascade.latent_dim == 6
    # the cascade really refines: every block contributes
    for dz in (dz1, dz2, dz3):
        assert dz.abs().sum() > 0


def test_backward_cascade_is_a_second_cascade_on_the_forward_output(make_config):
    """Eq. 6: v'' = backward(v'), with weights of its own."""
    torch.manual_seed(0)
    model = OmniFuse(make_config(2))
    forward_ids = {id(p) for p in model.forward_cra.parameters()}
    assert not forward_ids & {id(p) for p in model.backward_cra.parameters()}
    v = torch.randn(3, 2 * model.config.d)
    v_prime = model.forward_cra(v).output
    dz_sum = torch.zeros_like(v_prime)
    for block in model.backward_cra.blocks:
        dz, _ = _phi(block, v_prime + dz_sum)
        dz_sum = dz_sum + dz
    torch.testing.assert_close(model.backward_cra(v_prime).output, v_prime + dz_sum)


def test_masked_mse_ignores_masked_slots():
    # B = 2, M = 2, d = 2. Slot errors (mean over d of squared differences):
    # [0, 0]: (1^2 + 1^2) / 2 = 1      [0, 1]: (2^2 + 0^2) / 2 = 2
    # [1, 0]: (3^2 + 3^2) / 2 = 9      [1, 1]: (0^2 + 4^2) / 2 = 8 (huge 100s are masked)
    prediction = torch.tensor([[[1.0, 1.0], [2.0, 0.0]], [[3.0, 3.0], [100.0, 100.0]]])
    target = torch.zeros_like(prediction)
    target[1, 1] = torch.tensor([100.0, 96.0])
    mask = torch.tensor([[True, True], [True, False]])
    # counted slots: 1, 2, 9 -> mean 4
    torch.testing.assert_close(masked_mse(prediction, target, mask), torch.tensor(4.0))
    mask_all = torch.ones(2, 2, dtype=torch.bool)
    torch.testing.assert_close(masked_mse(prediction, target, mask_all), torch.tensor(5.0))


def test_masked_mse_is_zero_when_nothing_counts():
    prediction = torch.ones(3, 2, 4, requires_grad=True)
    loss = masked_mse(prediction, torch.zeros(3, 2, 4), torch.zeros(3, 2, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(prediction.grad).all()
    assert (prediction.grad == 0).all()


@pytest.mark.parametrize("kind_index", [0, 1, 2])  # timeseries, image_features, token_states
def test_forward_loss_ignores_absent_modality_content(
    make_config, make_batch, all_patterns, kind_index
):
    torch.manual_seed(0)
    config = make_config(3)
    model = OmniFuse(config).eval()
    availability = all_patterns(3)
    batch = make_batch(config, availability)
    drop = torch.zeros_like(availability)
    drop[-1, 0] = True  # one hidden-but-known modality, so the loss has a real target
    name = config.modality_names[kind_index]
    absent = ~availability[:, kind_index]

    changed = {k: v.clone() for k, v in batch.inputs.items()}
    changed[name][absent] = torch.randn_like(changed[name][absent]) * 10
    masks = {k: v.clone() for k, v in batch.masks.items()}
    if name in masks:
        masks[name][absent] = True  # pretend tokens at absent positions, too

    before = model(**batch.forward_kwargs(), drop=drop)
    after = model(changed, availability, masks, batch.labels, drop=drop)

    assert before.losses["forward"] > 0
    torch.testing.assert_close(after.losses["forward"], before.losses["forward"])
    torch.testing.assert_close(after.losses["total"], before.losses["total"])


def test_forward_loss_has_no_target_where_the_truth_is_absent(make_config, make_batch):
    """Moving the imputation of an always-absent slot must not move L_forward; moving it for
    a slot that is present somewhere must."""
    torch.manual_seed(0)
    config = make_config(2, num_blocks=1)  # one block: the last decoder bias is a pure shift
    model = OmniFuse(config).eval()
    d = config.d
    availability = torch.tensor([[True, False], [True, False], [True, False]])
    batch = make_batch(config, availability)
    drop = torch.tensor([[True, False], [False, False], [False, False]])
    last = _linears(model.forward_cra.blocks[0].decoder)[-1]

    base = model(**batch.forward_kwargs(), drop=drop).losses["forward"]
    with torch.no_grad():
        last.bias[d:] += 5.0  # shifts the imputation of slot 1, which the data never holds
    shifted_absent = model(**batch.forward_kwargs(), drop=drop).losses["forward"]
    with torch.no_grad():
        last.bias[:d] += 5.0  # shifts slot 0, which has a target in every row
    shifted_present = model(**batch.forward_kwargs(), drop=drop).losses["forward"]

    torch.testing.assert_close(shifted_absent, base)
    assert shifted_present > base + 1.0


def test_forward_loss_is_a_mean_over_slots_with_targets(make_config, make_batch):
    """Rows with fewer known modalities weigh less: the batch loss is the slot-count weighted
    mean of the row losses (an absent slot counted as a target would break this)."""
    torch.manual_seed(0)
    config = make_config(2)
    model = OmniFuse(config).eval()
    availability = torch.tensor([[True, True], [True, False]])
    batch = make_batch(config, availability)

    def row_loss(rows):
        out = model(
            {k: v[rows] for k, v in batch.inputs.items()},
            availability[rows],
            {k: v[rows] for k, v in batch.masks.items()},
            batch.labels[rows],
        )
        return out.losses["forward"]

    both = row_loss([0, 1])
    full_row, half_row = row_loss([0]), row_loss([1])
    torch.testing.assert_close(both, (2 * full_row + 1 * half_row) / 3)


def test_completed_keeps_real_embeddings_and_imputes_the_rest(make_config, make_batch):
    torch.manual_seed(0)
    config = make_config(2)
    model = OmniFuse(config).eval()
    availability = torch.tensor([[True, True], [True, True]])
    batch = make_batch(config, availability)
    drop = torch.tensor([[False, True], [False, False]])

    full = model(**batch.forward_kwargs())
    dropped = model(**batch.forward_kwargs(), drop=drop)

    # given slots are the encoder output itself; the hidden slot is imputed, not copied
    torch.testing.assert_close(dropped.completed[:, 0], full.completed[:, 0])
    torch.testing.assert_close(dropped.completed[1], full.completed[1])
    assert not torch.allclose(dropped.completed[0, 1], full.completed[0, 1])


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_forward_and_backward_losses_follow_eq_7_and_8(make_config, make_batch, task):
    """L_forward: the complement target of Table 1 (truth where hidden, e_m(0) where given),
    averaged over slots whose truth exists; L_backward: ||v - backward(v')||^2 averaged."""
    torch.manual_seed(0)
    config = make_config(3, task)
    model = OmniFuse(config).eval()
    availability = torch.tensor(
        [[True, True, True], [True, False, True], [False, True, False], [True, True, False]]
    )
    batch = make_batch(config, availability, seed=4)
    drop = torch.tensor(
        [[True, False, False], [False, False, True], [False, False, False], [True, True, False]]
    )
    d, size = config.d, availability.shape[0]

    losses = model(**batch.forward_kwargs(), drop=drop).losses

    with torch.no_grad():
        embeddings, placeholders = model.encoders(batch.inputs, availability, batch.masks)
        given = availability & ~drop
        v = torch.where(given.unsqueeze(-1), embeddings, placeholders).flatten(1)
        v_prime = model.forward_cra(v).output
        v_second = model.backward_cra(v_prime).output
    target = torch.where(given.unsqueeze(-1), placeholders, embeddings)
    slot_error = (v_prime.view(size, 3, d) - target).pow(2).mean(dim=-1)  # [B, M]
    # slots with truth: every available one; (row 2, modality 0 and 2) have none
    expected_forward = slot_error[availability].sum() / availability.sum()
    torch.testing.assert_close(losses["forward"], expected_forward)
    torch.testing.assert_close(losses["backward"], (v - v_second).pow(2).mean())

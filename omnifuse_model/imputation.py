"""Cascade residual autoencoder (CRA) imputation, forward and backward (Eq. 4-8).

The design is MMIN's (Zhao et al., ACL 2021): K residual autoencoders phi_k, each refining the
cumulative sum of its predecessors' outputs, with the latent of each kept for the joint head.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def _mlp(widths: list[int], final_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(width_in, width_out))
        if index < len(widths) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ResidualAutoencoder(nn.Module):
    """One phi_k: an MLP encoder d_in -> hidden... -> latent and a mirrored decoder to d_in."""

    def __init__(self, d_in: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        widths = [d_in, *hidden]
        self.encoder = _mlp(widths, final_activation=False)
        self.decoder = _mlp(widths[::-1], final_activation=False)
        self.latent_dim = hidden[-1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[B, d_in] -> (delta z [B, d_in], latent s [B, hidden[-1]])."""
        latent = self.encoder(x)
        return self.decoder(torch.relu(latent)), latent


@dataclass
class CascadeOutput:
    """Result of one cascade pass."""

    output: Tensor  # [B, d_in]: input + sum_k delta z_k (Eq. 5 / 6)
    latents: Tensor  # [B, K * latent_dim]: concat(s_1, ..., s_K), the joint embedding (Eq. 11)


class CascadeResidualAutoencoder(nn.Module):
    """K residual autoencoders in cascade (Eq. 4-5).

    dz_1 = phi_1(v); dz_k = phi_k(v + sum_{j<k} dz_j) for k > 1; output = v + sum_k dz_k.
    """

    def __init__(self, d_in: int, num_blocks: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResidualAutoencoder(d_in, hidden) for _ in range(num_blocks))
        self.latent_dim = num_blocks * hidden[-1]

    def forward(self, v: Tensor) -> CascadeOutput:
        total = torch.zeros_like(v)
        latents = []
        for block in self.blocks:
            delta, latent = block(v + total)
            total = total + delta
            latents.append(latent)
        return CascadeOutput(output=v + total, latents=torch.cat(latents, dim=1))

    def latents_only(self, v: Tensor) -> Tensor:
        """concat(s_1, ..., s_K) [B, K * latent_dim] without the last block's decoder.

        For passes that use only the joint embedding (DP-SGD's TLA pass): a layer whose
        output does not reach the loss would leave Opacus without its per-sample gradient.
        """
        total = torch.zeros_like(v)
        latents = []
        for block in self.blocks[:-1]:
            delta, latent = block(v + total)
            total = total + delta
            latents.append(latent)
        latents.append(self.blocks[-1].encoder(v + total))
        return torch.cat(latents, dim=1)


def masked_mse(prediction: Tensor, target: Tensor, slot_mask: Tensor) -> Tensor:
    """Mean squared error over the modality slots that have a target.

    Args:
        prediction, target: [B, M, d].
        slot_mask: bool [B, M]; False where the truth is absent (no target).

    Returns:
        Scalar: mean over masked slots of the per-slot mean over d; 0 when no slot counts.
    """
    per_slot = (prediction - target).pow(2).mean(dim=-1)
    weight = slot_mask.to(per_slot.dtype)
    return (per_slot * weight).sum() / weight.sum().clamp_min(1.0)


def per_sample_masked_mse(prediction: Tensor, target: Tensor, slot_mask: Tensor) -> Tensor:
    """Each sample's mean squared error over its own slots that have a target, [B].

    The DP-SGD variant of ``masked_mse`` (whose normaliser counts slots over the whole
    batch): its batch mean is a mean of per-sample terms. A sample without any target
    slot contributes 0.
    """
    per_slot = (prediction - target).pow(2).mean(dim=-1)
    weight = slot_mask.to(per_slot.dtype)
    return (per_slot * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)

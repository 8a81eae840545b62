"""Trainable modality-specific encoders e_m (Eq. 1) and the missing placeholder e_m(0).

Every encoder maps one modality's (cached) input to width ``d``. Frozen backbones (ResNet34,
BERT) run once ahead of training and their outputs are the inputs here, so only these small
encoders train.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from omnifuse_model.config import ModalitySpec


class TimeSeriesEncoder(nn.Module):
    """MedFuse-style 2-layer LSTM over [B, T, F]; the last hidden state -> [B, d]."""

    def __init__(self, input_dim: int, d: int, dropout: float = 0.0, layers: int = 2) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_dim, d, num_layers=layers, batch_first=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        _, (hidden, _) = self.lstm(x)
        return self.dropout(hidden[-1])


class ImageFeatureEncoder(nn.Module):
    """Projection of frozen image-backbone features [B, F] (ResNet34: F = 512) -> [B, d]."""

    def __init__(self, input_dim: int, d: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(input_dim, d), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d, d)
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.net(x)


class VectorEncoder(ImageFeatureEncoder):
    """Generic MLP encoder for any fixed-width modality [B, F] -> [B, d]."""


class TokenStateEncoder(nn.Module):
    """Masked attention pooling of frozen token states [B, L, F] + MLP -> [B, d].

    The mask [B, L] marks real tokens. A sample without any real token (the all-zero missing
    input) pools to zeros, so e_m(0) is the MLP's response to a zero vector.
    """

    def __init__(self, input_dim: int, d: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.score = nn.Linear(input_dim, 1)
        self.net = nn.Sequential(
            nn.Linear(input_dim, d), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d, d)
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        scores = self.score(x).squeeze(-1).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # all-masked rows -> 0
        pooled = torch.einsum("bl,blf->bf", weights, x)
        return self.net(pooled)


def build_encoder(spec: ModalitySpec, d: int, dropout: float) -> nn.Module:
    """The trainable encoder for one modality spec."""
    if spec.kind == "timeseries":
        return TimeSeriesEncoder(spec.input_dim, d, dropout)
    if spec.kind == "image_features":
        return ImageFeatureEncoder(spec.input_dim, d, dropout)
    if spec.kind == "token_states":
        return TokenStateEncoder(spec.input_dim, d, dropout)
    return VectorEncoder(spec.input_dim, d, dropout)


class ModalityEncoders(nn.Module):
    """All M encoders; returns true embeddings and the missing placeholders (Eq. 1-3)."""

    def __init__(self, specs: list[ModalitySpec], d: int, dropout: float) -> None:
        super().__init__()
        self.specs = list(specs)
        self.encoders = nn.ModuleDict({s.name: build_encoder(s, d, dropout) for s in specs})

    def placeholders(self, device: torch.device) -> Tensor:
        """v_m^miss = e_m(0) for every modality, [M, d] (Eq. 2-3).

        e_m is a deterministic function of its input outside dropout, so one all-zero sample
        per modality gives the placeholder of every missing sample in the batch.
        """
        rows = []
        for spec in self.specs:
            zero = torch.zeros((1, *spec.input_shape), device=device)
            mask = torch.zeros((1, spec.seq_len or 1), dtype=torch.bool, device=device)
            rows.append(self.encoders[spec.name](zero, mask)[0])
        return torch.stack(rows)

    def forward(
        self,
        inputs: dict[str, Tensor],
        availability: Tensor,
        masks: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Encode every modality.

        Args:
            inputs: name -> [B, *input_shape]; content where a modality is absent is ignored.
            availability: bool [B, M], True where the data holds the modality.
            masks: name -> bool [B, L] token masks for 'token_states' modalities.

        Returns:
            (embeddings [B, M, d] with placeholders at absent positions, placeholders [M, d]).
        """
        masks = masks or {}
        device = availability.device
        missing = self.placeholders(device)
        columns = []
        for index, spec in enumerate(self.specs):
            if spec.name not in inputs:
                raise KeyError(f"input for modality '{spec.name}' is missing from the batch")
            x = inputs[spec.name]
            if tuple(x.shape[1:]) != spec.input_shape:
                raise ValueError(
                    f"modality '{spec.name}': expected input shape [B, {spec.input_shape}], "
                    f"got {tuple(x.shape)}"
                )
            present = availability[:, index : index + 1]
            # Zero absent rows first: their content is ignored, and NaN there would poison
            # the encoder's gradients through torch.where's zero branch.
            shaped = present.view(-1, *[1] * (x.dim() - 1))
            x = torch.where(shaped, x, torch.zeros((), dtype=x.dtype, device=x.device))
            encoded = self.encoders[spec.name](x, masks.get(spec.name))
            columns.append(torch.where(present, encoded, missing[index]))
        return torch.stack(columns, dim=1), missing

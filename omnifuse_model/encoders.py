"""Trainable modality-specific encoders e_m (Eq. 1) and the missing placeholder e_m(0).

Every encoder maps one modality's (cached) input to width ``d``. Frozen backbones (ResNet34,
BERT) run once ahead of training and their outputs are the inputs here, so only these small
encoders train.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from omnifuse_model.config import ModalitySpec


def build_lstm(
    input_size: int, hidden_size: int, num_layers: int, dp_compatible: bool
) -> nn.Module:
    """A batch-first LSTM: ``torch.nn.LSTM``, or Opacus' ``DPLSTM`` for DP-SGD.

    DPLSTM computes the same function from parameters of the same names and shapes, built
    from linear layers whose per-sample gradients Opacus can compute (cuDNN's fused LSTM
    offers none). Its state dict is made nn.LSTM's, at any depth of the model: the same keys
    in the same order (Opacus renames them only when the DPLSTM is the root module), so
    weights move between DP and non-DP sites unchanged.
    """
    if not dp_compatible:
        return nn.LSTM(input_size, hidden_size, num_layers=num_layers, batch_first=True)
    from opacus.layers import DPLSTM  # imported only here: opacus is slow to import

    lstm = DPLSTM(input_size, hidden_size, num_layers=num_layers, batch_first=True)
    # Opacus' own renaming hook returns a new dict, which torch honours at the root only
    # (and then hands to later hooks): replaced by one that edits the state dict in place.
    for key, hook in list(lstm._state_dict_hooks.items()):
        if getattr(hook, "__name__", "") == "filter_out_old_keys":
            del lstm._state_dict_hooks[key]
    lstm.register_state_dict_post_hook(_lstm_state_dict)
    lstm.register_load_state_dict_pre_hook(_lstm_load_state_dict)
    return lstm


def _lstm_state_dict(module: nn.Module, state_dict: dict, prefix: str, _metadata: object) -> None:
    """DPLSTM's entries under nn.LSTM's names and order (its internal names dropped)."""
    values = {name: state_dict.pop(prefix + name) for name in module.new_to_old}
    for name in module.old_to_new:
        state_dict.pop(prefix + name, None)
    order = [
        f"{kind}_l{layer}"
        for layer in range(module.num_layers)
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    ]
    for name in order:
        if name in values:
            state_dict[prefix + name] = values[name]


def _lstm_load_state_dict(module: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
    """Load nn.LSTM's keys into DPLSTM: its internal names alias the same parameters."""
    for old, new in module.old_to_new.items():
        if prefix + new in state_dict and prefix + old not in state_dict:
            state_dict[prefix + old] = state_dict[prefix + new]


@contextlib.contextmanager
def dropout_off(module: nn.Module) -> Iterator[None]:
    """Switch off every dropout layer inside ``module`` for the block, then restore each
    one's mode. Only dropout changes: parameterised layers keep their mode and hooks (the
    DP-SGD variant's Opacus hooks record activations only of modules in training mode)."""
    switched = [
        layer
        for layer in module.modules()
        if isinstance(layer, nn.modules.dropout._DropoutNd) and layer.training
    ]
    for layer in switched:
        layer.train(False)
    try:
        yield
    finally:
        for layer in switched:
            layer.train(True)


class TimeSeriesEncoder(nn.Module):
    """MedFuse-style 2-layer LSTM over [B, T, F]; the last hidden state -> [B, d]."""

    def __init__(
        self,
        input_dim: int,
        d: int,
        dropout: float = 0.0,
        layers: int = 2,
        dp_compatible: bool = False,
    ) -> None:
        super().__init__()
        self.lstm = build_lstm(input_dim, d, layers, dp_compatible)
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


def build_encoder(
    spec: ModalitySpec, d: int, dropout: float, dp_compatible: bool = False
) -> nn.Module:
    """The trainable encoder for one modality spec (DPLSTM when ``dp_compatible``)."""
    if spec.kind == "timeseries":
        return TimeSeriesEncoder(spec.input_dim, d, dropout, dp_compatible=dp_compatible)
    if spec.kind == "image_features":
        return ImageFeatureEncoder(spec.input_dim, d, dropout)
    if spec.kind == "token_states":
        return TokenStateEncoder(spec.input_dim, d, dropout)
    return VectorEncoder(spec.input_dim, d, dropout)


class ModalityEncoders(nn.Module):
    """All M encoders; returns true embeddings and the missing placeholders (Eq. 1-3).

    With ``per_sample_placeholders`` (the DP-SGD variant) e_m(0) is encoded once per sample
    of the batch: every encoder call then sees the batch's B rows, and the placeholder a
    sample uses is computed in that sample's own row, as per-sample gradients need.
    """

    def __init__(
        self,
        specs: list[ModalitySpec],
        d: int,
        dropout: float,
        dp_compatible: bool = False,
    ) -> None:
        super().__init__()
        self.specs = list(specs)
        self.per_sample_placeholders = dp_compatible
        self.d = d
        self.encoders = nn.ModuleDict(
            {s.name: build_encoder(s, d, dropout, dp_compatible) for s in specs}
        )

    def placeholders(self, device: torch.device, batch: int | None = None) -> Tensor:
        """v_m^miss = e_m(0) for every modality (Eq. 2-3): [M, d], or [B, M, d] for a batch.

        Encoded without dropout, in training as in evaluation: the placeholder is one
        learned vector per modality (it still trains through e_m's weights), so training and
        evaluation see the same one and no dropout mask is shared by a batch's missing rows
        (one mask drawn for the [M, d] placeholder would hit every missing row alike). e_m
        is then a deterministic function of its input, so one all-zero sample per modality
        gives the placeholder of every missing sample in the batch; with ``batch`` a zero
        batch of that size is encoded instead (one row per sample, as DP-SGD needs).
        """
        rows = []
        for spec in self.specs:
            size = 1 if batch is None else batch
            zero = torch.zeros((size, *spec.input_shape), device=device)
            mask = torch.zeros((size, spec.seq_len or 1), dtype=torch.bool, device=device)
            with dropout_off(self.encoders[spec.name]):
                encoded = self.encoders[spec.name](zero, mask)
            rows.append(encoded[0] if batch is None else encoded)
        return torch.stack(rows, dim=0 if batch is None else 1)

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
            (embeddings [B, M, d] with placeholders at absent positions, placeholders [M, d],
            or [B, M, d] with ``per_sample_placeholders``).
        """
        masks = masks or {}
        device = availability.device
        batch = availability.shape[0] if self.per_sample_placeholders else None
        missing = self.placeholders(device, batch)
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
            encoded = self._encode(spec.name, x, masks.get(spec.name), availability[:, index])
            present = availability[:, index : index + 1]
            columns.append(torch.where(present, encoded, missing[..., index, :]))
        return torch.stack(columns, dim=1), missing

    def _encode(self, name: str, x: Tensor, mask: Tensor | None, present: Tensor) -> Tensor:
        """e_m over a batch [B, d]; rows where the modality is absent hold any finite values.

        The content of absent rows must not reach the result or its gradients (NaN there
        would poison the weights' gradients even through torch.where's unused branch). Every
        encoder treats rows independently (no batch statistics), so:
        - without autograd, all rows are encoded as they are: an absent row's output, NaN or
          not, stays in its row and is replaced by the placeholder (no copy of the inputs);
        - with autograd, only the present rows are encoded (the token states of a batch are
          ~100 MB: selecting rows costs less than zeroing them and the encoder does less);
        - with per-sample placeholders (DP-SGD) every call must see all B rows, so absent
          rows are zeroed first.
        """
        encoder = self.encoders[name]
        if self.per_sample_placeholders:
            shaped = present.view(-1, *[1] * (x.dim() - 1))
            x = torch.where(shaped, x, torch.zeros((), dtype=x.dtype, device=x.device))
            return encoder(x, mask)
        if not torch.is_grad_enabled():
            return encoder(x, mask)
        rows = present.nonzero().squeeze(1)
        if len(rows) == 0:  # nothing to encode; every row becomes the placeholder
            return x.new_zeros((len(present), self.d))
        if len(rows) == len(present):
            return encoder(x, mask)
        selected = encoder(
            x.index_select(0, rows), mask.index_select(0, rows) if mask is not None else None
        )
        out = selected.new_zeros((len(present), selected.shape[1]))
        return out.index_copy(0, rows, selected)

"""The sample/batch layout every dataset yields and the training loop consumes.

A sample is a dict::

    {"inputs": {name: Tensor[*input_shape]},      # zeros (any content) where absent
     "masks": {name: bool Tensor[L]},              # token masks, 'token_states' modalities only
     "availability": bool Tensor[M],               # modality order = OmniFuseConfig.modalities
     "label": Tensor,                              # float [C]; long [] for multiclass
     "sample_id": str}                             # e.g. a stay id; never leaves a site

``collate_samples`` stacks samples into a ``Batch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset


@dataclass
class Batch:
    """A collated batch: inputs name -> [B, ...], masks name -> [B, L], availability [B, M],
    labels [B, C] float or [B] long, sample_ids."""

    inputs: dict[str, Tensor]
    masks: dict[str, Tensor]
    availability: Tensor
    labels: Tensor
    sample_ids: list[str]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            inputs={k: v.to(device, non_blocking=True) for k, v in self.inputs.items()},
            masks={k: v.to(device, non_blocking=True) for k, v in self.masks.items()},
            availability=self.availability.to(device, non_blocking=True),
            labels=self.labels.to(device, non_blocking=True),
            sample_ids=self.sample_ids,
        )

    def __len__(self) -> int:
        return len(self.sample_ids)


def collate_samples(samples: Sequence[dict]) -> Batch:
    """Stack samples (the layout in this module's docstring) into a Batch."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    first = samples[0]
    return Batch(
        inputs={k: torch.stack([s["inputs"][k] for s in samples]) for k in first["inputs"]},
        masks={k: torch.stack([s["masks"][k] for s in samples]) for k in first.get("masks", {})},
        availability=torch.stack([s["availability"] for s in samples]).to(torch.bool),
        labels=torch.stack([s["label"] for s in samples]),
        sample_ids=[str(s["sample_id"]) for s in samples],
    )


class InMemoryMultimodalDataset(Dataset):
    """Samples held as stacked tensors (synthetic features, tests, small sites).

    Args:
        inputs: name -> [N, *input_shape]: a tensor, or a lazily read column that indexes
            like one (``column[rows]`` -> float32 tensor; ``take_rows(indices)`` -> column).
        availability: bool [N, M].
        labels: [N, C] float or [N] long.
        masks: name -> bool [N, L] for 'token_states' modalities.
        sample_ids: N ids (default: "0".."N-1").
    """

    def __init__(
        self,
        inputs: dict[str, Tensor],
        availability: Tensor,
        labels: Tensor,
        masks: dict[str, Tensor] | None = None,
        sample_ids: Sequence[str] | None = None,
    ) -> None:
        n = availability.shape[0]
        for name, tensor in {**inputs, **(masks or {})}.items():
            if tensor.shape[0] != n:
                raise ValueError(f"'{name}' holds {tensor.shape[0]} samples, availability {n}")
        if labels.shape[0] != n:
            raise ValueError(f"labels hold {labels.shape[0]} samples, availability {n}")
        self.inputs = inputs
        self.availability = availability.to(torch.bool)
        self.labels = labels
        self.masks = masks or {}
        self.sample_ids = list(sample_ids) if sample_ids is not None else [str(i) for i in range(n)]

    def __len__(self) -> int:
        return self.availability.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {
            "inputs": {k: v[index] for k, v in self.inputs.items()},
            "masks": {k: v[index] for k, v in self.masks.items()},
            "availability": self.availability[index],
            "label": self.labels[index],
            "sample_id": self.sample_ids[index],
        }

    def subset(self, indices: Tensor) -> InMemoryMultimodalDataset:
        """A new dataset over the given sample indices (views where possible)."""
        return InMemoryMultimodalDataset(
            {k: _take(v, indices) for k, v in self.inputs.items()},
            self.availability[indices],
            self.labels[indices],
            {k: v[indices] for k, v in self.masks.items()},
            [self.sample_ids[i] for i in indices.tolist()],
        )


def zero_absent(column, keep: Tensor):
    """``column`` with the rows where ``keep`` is False reading as zeros: a tensor is
    multiplied by the mask; a lazily read column (one with a ``zero_rows`` method, e.g.
    ``MappedRows``) stays lazy and unread."""
    zero_rows = getattr(column, "zero_rows", None)
    if zero_rows is not None:
        return zero_rows(~keep)
    return column * keep.view(-1, *[1] * (column.dim() - 1))


def _take(column, indices: Tensor):
    """Rows ``indices`` of an input column: a tensor, or a lazily read column (one with a
    ``take_rows`` method, e.g. ``omnifuse_model.data.features.mapped_rows.MappedRows``, which
    stays lazy)."""
    take_rows = getattr(column, "take_rows", None)
    return take_rows(indices) if take_rows is not None else column[indices]

"""Shared fixtures for the model tests: tiny configs of mixed modality kinds and batches.

Everything here is small (d = 8, two CRA blocks of widths (16, 8), batches of at most 16
rows) so that the whole model suite runs in seconds on one CPU core.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from omnifuse_model.config import ModalitySpec, OmniFuseConfig

# The four encoder families, cycled so that every M >= 4 config holds each of them.
KINDS = ("timeseries", "image_features", "token_states", "vector")
SEQ_LEN = 4
INPUT_DIM = 3
DEFAULT_NUM_CLASSES = {"binary": 1, "multilabel": 5, "multiclass": 3}


@dataclass
class TinyBatch:
    """Model inputs for one batch, in the layout ``OmniFuse.forward`` takes."""

    inputs: dict[str, Tensor]
    masks: dict[str, Tensor]
    availability: Tensor
    labels: Tensor

    def forward_kwargs(self) -> dict:
        return {
            "inputs": self.inputs,
            "availability": self.availability,
            "masks": self.masks,
            "labels": self.labels,
        }


def _spec(index: int) -> ModalitySpec:
    kind = KINDS[index % len(KINDS)]
    sequential = kind in ("timeseries", "token_states")
    return ModalitySpec(
        name=f"{kind}_{index}",
        kind=kind,
        input_dim=INPUT_DIM,
        seq_len=SEQ_LEN if sequential else None,
    )


@pytest.fixture
def make_config() -> Callable[..., OmniFuseConfig]:
    """Factory: ``make_config(num_modalities, task, fusion=..., **overrides)``.

    Modality kinds cycle through timeseries, image_features, token_states, vector; names are
    ``<kind>_<index>`` so nothing depends on the MIMIC names.
    """

    def factory(
        num_modalities: int = 3,
        task: str = "binary",
        fusion: str = "dwfuse",
        **overrides,
    ) -> OmniFuseConfig:
        values = {
            "modalities": [_spec(i) for i in range(num_modalities)],
            "task": task,
            "num_classes": DEFAULT_NUM_CLASSES[task],
            "d": 8,
            "num_blocks": 2,
            "cra_hidden": (16, 8),
            "fusion": fusion,
        }
        values.update(overrides)
        return OmniFuseConfig(**values)

    return factory


def random_labels(task: str, num_classes: int, batch: int, generator: torch.Generator) -> Tensor:
    """Labels in the layout of ``omnifuse_model.losses``: float [B, C] or long [B]."""
    if task == "multiclass":
        return torch.randint(0, num_classes, (batch,), generator=generator)
    return torch.randint(0, 2, (batch, num_classes), generator=generator).float()


@pytest.fixture
def make_batch() -> Callable[..., TinyBatch]:
    """Factory: ``make_batch(config, availability, seed=0)`` -> TinyBatch.

    Absent modalities get all-zero inputs (and all-False token masks), as the datasets yield
    them; present token sequences hold between 1 and ``seq_len`` real tokens.
    """

    def factory(config: OmniFuseConfig, availability: Tensor, seed: int = 0) -> TinyBatch:
        generator = torch.Generator().manual_seed(seed)
        availability = availability.to(torch.bool)
        batch = availability.shape[0]
        inputs: dict[str, Tensor] = {}
        masks: dict[str, Tensor] = {}
        for index, spec in enumerate(config.modalities):
            present = availability[:, index]
            x = torch.randn((batch, *spec.input_shape), generator=generator)
            x[~present] = 0.0
            inputs[spec.name] = x
            if spec.kind == "token_states":
                lengths = torch.randint(1, spec.seq_len + 1, (batch,), generator=generator)
                mask = torch.arange(spec.seq_len).unsqueeze(0) < lengths.unsqueeze(1)
                mask[~present] = False
                masks[spec.name] = mask
        labels = random_labels(config.task, config.num_classes, batch, generator)
        return TinyBatch(inputs, masks, availability, labels)

    return factory


@pytest.fixture
def all_patterns() -> Callable[[int], Tensor]:
    """``all_patterns(M)`` -> bool [2^M, M], every availability pattern (all-absent first)."""

    def factory(num_modalities: int) -> Tensor:
        rows = list(itertools.product([False, True], repeat=num_modalities))
        return torch.tensor(rows, dtype=torch.bool)

    return factory

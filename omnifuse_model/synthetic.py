"""Feature-level synthetic multimodal data with planted informativeness, noise and missingness.

A shared latent z ~ N(0, I) drives the label; each modality observes a linear view of part of
z with its own signal strength plus Gaussian noise, so modalities differ in how informative
they are and a "lazy" modality can be planted (weak signal, strong noise). Modalities go
missing at random at a per-modality rate; every sample keeps at least one modality. This is
for model-level tests and fidelity benchmarks; MIMIC-format files come from ``data``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from omnifuse_model.batch import InMemoryMultimodalDataset
from omnifuse_model.config import ModalitySpec, StrictModel, TaskKind


class SyntheticModality(StrictModel):
    """One synthetic vector modality."""

    name: str
    dim: int = Field(default=32, gt=0, description="Observed feature width.")
    signal: float = Field(default=1.0, ge=0.0, description="Scale of the latent view.")
    noise: float = Field(default=1.0, ge=0.0, description="Std of additive Gaussian noise.")
    latent_fraction: float = Field(
        default=1.0, gt=0.0, le=1.0, description="Share of the latent factors it observes."
    )
    missing_rate: float = Field(default=0.0, ge=0.0, le=1.0)


class SyntheticFeatureConfig(StrictModel):
    """The generator's parameters (all of the planted structure is here)."""

    modalities: list[SyntheticModality] = Field(min_length=2)
    task: TaskKind = "binary"
    num_classes: int = Field(default=1, gt=0)
    latent_dim: int = Field(default=8, gt=0)
    label_noise: float = Field(default=0.3, ge=0.0, description="Noise added to the logit.")
    seed: int = 0

    def modality_specs(self) -> list[ModalitySpec]:
        return [ModalitySpec(name=m.name, kind="vector", input_dim=m.dim) for m in self.modalities]


def make_synthetic_features(config: SyntheticFeatureConfig, n: int) -> InMemoryMultimodalDataset:
    """Draw ``n`` samples; the same config and seed always give the same data."""
    generator = torch.Generator().manual_seed(config.seed)
    # Structure (label weights, views) from a fixed stream; samples from a second stream, so
    # train/val/test drawn with different seeds share one planted structure.
    structure = torch.Generator().manual_seed(10_007)
    k = config.latent_dim
    outputs = 1 if config.task == "binary" else config.num_classes
    label_weights = torch.randn(k, outputs, generator=structure) / k**0.5
    z = torch.randn(n, k, generator=generator)
    logits = z @ label_weights * 3.0 + config.label_noise * torch.randn(
        n, outputs, generator=generator
    )
    labels = logits.argmax(dim=1) if config.task == "multiclass" else (logits > 0).float()
    inputs, missing = {}, []
    for index, modality in enumerate(config.modalities):
        seen = max(1, round(modality.latent_fraction * k))
        start = (index * seen) % k
        columns = [(start + j) % k for j in range(seen)]
        view = torch.randn(seen, modality.dim, generator=structure) / seen**0.5
        features = modality.signal * z[:, columns] @ view
        features = features + modality.noise * torch.randn(n, modality.dim, generator=generator)
        inputs[modality.name] = features
        missing.append(torch.rand(n, generator=generator) < modality.missing_rate)
    available = ~torch.stack(missing, dim=1)
    empty = ~available.any(dim=1)
    if bool(empty.any()):  # keep one modality, drawn uniformly, for samples that lost all
        keep = torch.randint(0, len(config.modalities), (int(empty.sum()),), generator=generator)
        available[empty.nonzero().squeeze(1), keep] = True
    for index, modality in enumerate(config.modalities):
        inputs[modality.name] = inputs[modality.name] * available[:, index : index + 1]
    return InMemoryMultimodalDataset(inputs, available, labels)

"""Feature-level data for the mechanism scenarios: known latent, known Bayes probability.

Same picture as ``omnifuse_model.synthetic`` (a latent z ~ N(0, I) drives the label; each
modality is a noisy view of part of z; the result is an ``InMemoryMultimodalDataset``), with
what the mechanism scenarios need and that generator lacks:

- **Bayes probability.** y ~ Bernoulli(sigmoid(label_scale * w . z)), with w a fixed unit
  vector over ``label_columns``; so P(y=1 | z) is known exactly and the AUROC of that
  probability on a test set is the oracle bound no model can beat in expectation.
- **Link per modality.** ``linear``: x = signal * z_S V; ``mlp``: x = signal *
  tanh(gain * z_S W1 + b1) W2 with each feature standardised over z ~ N(0, I) (a random
  one-hidden-layer tanh network, non-linear in z); ``noise``: x holds no signal at all (pure
  noise; a control).
- **Latent subset per modality.** ``latent_columns`` names the factors S a modality observes.
- **Per-sample corruption regimes.** A hidden per-sample flag picks, for a ``rate`` share of
  samples, one modality of ``modalities`` (uniformly) and replaces its features by noise of
  std ``scale`` while it stays *available*; the flag is returned, never given to the model.
- **Missing rates per split.** ``missing_train`` (train and val) and ``missing_test``.

Reordering invariance: a modality's structure (V, W1, b1, W2) is seeded from a stable hash
(SHA-256) of ``(structure_seed, name)``, and its sample noise, corruption noise and missingness
draws from a hash of ``(seed, split, name)``; z, the label and the corruption flags come from
``(seed, split)``. So a modality's features depend on its name and the seeds, never on its
position in the config. A sample left with no modality keeps the one with the largest
u / rate (u its missingness draw), which is uniform and also independent of order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from omnifuse_model.batch import InMemoryMultimodalDataset
from omnifuse_model.config import ModalitySpec, StrictModel

Link = Literal["linear", "mlp", "noise"]
Split = Literal["train", "val", "test"]


class MechanismModality(StrictModel):
    """One vector modality of a mechanism scenario."""

    name: str = Field(min_length=1)
    dim: int = Field(default=16, gt=0, description="Observed feature width.")
    link: Link = Field(default="linear", description="How the features depend on z.")
    latent_columns: list[int] = Field(
        default_factory=list, description="Latent factors it observes (empty only for 'noise')."
    )
    signal: float = Field(default=1.0, ge=0.0, description="Scale of the latent view.")
    noise: float = Field(default=0.5, ge=0.0, description="Std of additive Gaussian noise.")
    mlp_hidden: int = Field(default=32, gt=0, description="Hidden width of the 'mlp' link.")
    mlp_gain: float = Field(
        default=2.0, gt=0.0, description="Pre-activation scale of the 'mlp' link (> 1 saturates)."
    )
    missing_train: float = Field(default=0.0, ge=0.0, le=1.0, description="Train/val rate.")
    missing_test: float = Field(default=0.0, ge=0.0, le=1.0, description="Test rate.")

    @model_validator(mode="after")
    def _columns_match_link(self) -> MechanismModality:
        if self.link != "noise" and not self.latent_columns:
            raise ValueError(
                f"modality '{self.name}': link '{self.link}' needs latent_columns, got none"
            )
        if len(set(self.latent_columns)) != len(self.latent_columns):
            raise ValueError(
                f"modality '{self.name}': latent_columns repeat: {self.latent_columns}"
            )
        return self


class CorruptionRegime(StrictModel):
    """A hidden per-sample flag that corrupts one of ``modalities`` for ``rate`` of samples."""

    rate: float = Field(ge=0.0, le=1.0, description="Share of samples corrupted.")
    modalities: list[str] = Field(min_length=1, description="Which may be corrupted (uniform).")
    scale: float = Field(default=3.0, ge=0.0, description="Std of the replacing noise.")


class MechanismDataConfig(StrictModel):
    """All of the planted structure of one scenario (binary task)."""

    modalities: list[MechanismModality] = Field(min_length=2)
    latent_dim: int = Field(default=8, gt=0)
    label_columns: list[int] = Field(
        default_factory=list, description="Factors the label reads; empty = all of them."
    )
    label_weights: list[float] | None = Field(
        default=None,
        description=(
            "w over label_columns (normalised to |w| = 1); None draws it from structure_seed."
        ),
    )
    label_scale: float = Field(
        default=3.0, gt=0.0, description="Logit = label_scale * w . z, |w| = 1."
    )
    corruption: CorruptionRegime | None = None
    structure_seed: int = Field(default=0, ge=0, description="Seeds V, W1, W2 and w.")

    @model_validator(mode="after")
    def _consistent(self) -> MechanismDataConfig:
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise ValueError(f"modalities: names must be unique, got {names}")
        for modality in self.modalities:
            bad = [c for c in modality.latent_columns if not 0 <= c < self.latent_dim]
            if bad:
                raise ValueError(
                    f"modality '{modality.name}': latent_columns {bad} outside "
                    f"[0, {self.latent_dim})"
                )
        bad = [c for c in self.label_columns if not 0 <= c < self.latent_dim]
        if bad:
            raise ValueError(f"label_columns: {bad} outside [0, {self.latent_dim})")
        width = len(self.label_columns) or self.latent_dim
        if self.label_weights is not None and (
            len(self.label_weights) != width or not any(self.label_weights)
        ):
            raise ValueError(
                f"label_weights: expected {width} numbers (one per label column), not all "
                f"zero; got {self.label_weights}"
            )
        if self.corruption is not None:
            unknown = sorted(set(self.corruption.modalities) - set(names))
            if unknown:
                raise ValueError(f"corruption.modalities: unknown {unknown}; known {names}")
        return self

    def modality_specs(self) -> list[ModalitySpec]:
        return [ModalitySpec(name=m.name, kind="vector", input_dim=m.dim) for m in self.modalities]


@dataclass
class MechanismSplit:
    """One drawn split and what the generator knows about it.

    dataset: the model's view (corrupted features, availability, labels [N, 1]).
    latent: z [N, latent_dim]. bayes_probability: P(y=1 | z) [N].
    corrupted: [N] long, index (config order) of the corrupted modality, -1 where none.
    """

    dataset: InMemoryMultimodalDataset
    latent: Tensor
    bayes_probability: Tensor
    corrupted: Tensor
    modality_names: list[str]


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' text (SHA-256), the same on every run and machine."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(*parts))


def label_weights(config: MechanismDataConfig) -> Tensor:
    """The unit vector w [latent_dim] (zero outside label_columns)."""
    columns = config.label_columns or list(range(config.latent_dim))
    if config.label_weights is not None:
        draw = torch.tensor(config.label_weights, dtype=torch.float32)
    else:
        draw = torch.randn(len(columns), generator=_generator(config.structure_seed, "label"))
    weights = torch.zeros(config.latent_dim)
    weights[columns] = draw / draw.norm()
    return weights


def modality_signal(config: MechanismDataConfig, modality: MechanismModality, z: Tensor) -> Tensor:
    """The noiseless view [N, dim] of z through the modality's link (zeros for 'noise')."""
    n = z.shape[0]
    if modality.link == "noise":
        return torch.zeros(n, modality.dim)
    structure = _generator(config.structure_seed, "modality", modality.name)
    seen = z[:, modality.latent_columns]
    k = len(modality.latent_columns)
    if modality.link == "linear":
        view = torch.randn(k, modality.dim, generator=structure) / k**0.5
        return modality.signal * seen @ view
    hidden = modality.mlp_hidden
    first = torch.randn(k, hidden, generator=structure) / k**0.5
    bias = 0.5 * torch.randn(hidden, generator=structure)
    second = torch.randn(hidden, modality.dim, generator=structure) / hidden**0.5
    activations = torch.tanh(modality.mlp_gain * seen @ first + bias)
    # Standardise each output feature with its mean and std over the standard-normal latent
    # (a fixed draw, part of the structure), so 'signal' is the per-feature std for both links.
    mean, std = _mlp_moments(config, modality, first, bias, second)
    return modality.signal * (activations @ second - mean) / std


def _mlp_moments(
    config: MechanismDataConfig,
    modality: MechanismModality,
    first: Tensor,
    bias: Tensor,
    second: Tensor,
) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std [dim] of the raw 'mlp' output over z ~ N(0, I) (8192 draws)."""
    stream = _generator(config.structure_seed, "mlp-moments", modality.name)
    draw = torch.randn(8192, first.shape[0], generator=stream)
    outputs = torch.tanh(modality.mlp_gain * draw @ first + bias) @ second
    return outputs.mean(dim=0), outputs.std(dim=0).clamp_min(1e-6)


def _missing(config: MechanismDataConfig, n: int, seed: int, split: Split) -> tuple[Tensor, Tensor]:
    """availability [N, M] and missingness draws u [N, M] (config order)."""
    rates, draws = [], []
    for modality in config.modalities:
        rate = modality.missing_test if split == "test" else modality.missing_train
        draws.append(torch.rand(n, generator=_generator(seed, split, "missing", modality.name)))
        rates.append(rate)
    u = torch.stack(draws, dim=1)
    rate_row = torch.tensor(rates)
    available = u >= rate_row
    empty = ~available.any(dim=1)
    if bool(empty.any()):
        ratio = u / rate_row.clamp_min(1e-12)
        keep = ratio[empty].argmax(dim=1)
        available[empty.nonzero().squeeze(1), keep] = True
    return available, u


def _corruption_flags(config: MechanismDataConfig, n: int, seed: int, split: Split) -> Tensor:
    """[N] long: config index of the corrupted modality, -1 where the sample is clean."""
    flags = torch.full((n,), -1, dtype=torch.long)
    regime = config.corruption
    if regime is None or regime.rate == 0.0:
        return flags
    stream = _generator(seed, split, "corruption")
    hit = torch.rand(n, generator=stream) < regime.rate
    # Choose among the regime's names sorted, so the choice ignores config order too.
    names = sorted(regime.modalities)
    which = torch.randint(0, len(names), (n,), generator=stream)
    index = {m.name: i for i, m in enumerate(config.modalities)}
    chosen = torch.tensor([index[names[j]] for j in which.tolist()], dtype=torch.long)
    flags[hit] = chosen[hit]
    return flags


def make_mechanism_split(
    config: MechanismDataConfig, n: int, seed: int, split: Split
) -> MechanismSplit:
    """Draw ``n`` samples of one split; the same (config, n, seed, split) gives the same data."""
    if n <= 0:
        raise ValueError(f"n: expected a positive sample count, got {n}")
    stream = _generator(seed, split, "latent")
    z = torch.randn(n, config.latent_dim, generator=stream)
    probability = torch.sigmoid(config.label_scale * z @ label_weights(config))
    labels = (torch.rand(n, generator=stream) < probability).float().unsqueeze(1)
    available, _ = _missing(config, n, seed, split)
    flags = _corruption_flags(config, n, seed, split)
    scale = config.corruption.scale if config.corruption is not None else 0.0
    inputs = {}
    for index, modality in enumerate(config.modalities):
        noise_stream = _generator(seed, split, "noise", modality.name)
        features = modality_signal(config, modality, z)
        features = features + modality.noise * torch.randn(n, modality.dim, generator=noise_stream)
        corrupted = flags == index
        replacement = scale * torch.randn(n, modality.dim, generator=noise_stream)
        features = torch.where(corrupted.unsqueeze(1), replacement, features)
        inputs[modality.name] = features * available[:, index : index + 1]
    dataset = InMemoryMultimodalDataset(inputs, available, labels)
    return MechanismSplit(
        dataset=dataset,
        latent=z,
        bayes_probability=probability,
        corrupted=flags,
        modality_names=[m.name for m in config.modalities],
    )

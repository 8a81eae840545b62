"""Data for the fidelity benchmark: one planted scenario, modality subsets, missingness.

``make_synthetic_features`` ties what a modality *is* to its position in the config (the
latent columns it observes start at ``index * seen`` and its view matrix is the next draw of
a shared stream), so generating a subset such as (cxr, rep) directly would give 'cxr' the
latent view that 'ehr' has in the full scenario. To compare subsets on the same modalities,
the benchmark draws every modality once, complete (all missing rates 0), and then keeps the
subset's columns and applies missingness itself, with the generator's rule: each modality is
absent independently at its rate, and a sample left with none keeps one of the subset's
modalities, drawn uniformly.

Missingness is driven by one uniform draw u[n, m] per (sample, modality) and seed, shared by
every rate: m is absent where u < rate_m, and a sample left with none keeps the modality
with the largest u / rate (uniform over the subset, since those ratios are i.i.d. uniform
given that all are absent). With one rate for every modality, raising it only removes
modalities, so the missing-rate curve is nested.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from omnifuse_model.batch import InMemoryMultimodalDataset
from omnifuse_model.synthetic import (
    SyntheticFeatureConfig,
    SyntheticModality,
    make_synthetic_features,
)

SPLITS = ("train", "val", "test")


def default_scenario() -> SyntheticFeatureConfig:
    """ehr strongest (always present, as in MedFuse's MIMIC partial setting), cxr medium and
    often missing, rep the planted lazy modality: weak signal, strong noise, twice as wide."""
    return SyntheticFeatureConfig(
        modalities=[
            SyntheticModality(
                name="ehr", dim=32, signal=1.0, noise=1.0, latent_fraction=0.75, missing_rate=0.0
            ),
            SyntheticModality(
                name="cxr", dim=32, signal=0.7, noise=1.0, latent_fraction=0.75, missing_rate=0.4
            ),
            SyntheticModality(name="rep", dim=64, signal=0.2, noise=3.0, missing_rate=0.3),
        ],
        task="binary",
    )


@dataclass
class CompleteSplit:
    """Every modality of one split, all present, plus the missingness draws.

    uniforms: [N, M] in [0, 1), scenario order; modality m is absent where uniforms[:, m] is
    below its rate.
    """

    data: InMemoryMultimodalDataset
    uniforms: Tensor


def draw_complete(
    scenario: SyntheticFeatureConfig, sizes: dict[str, int], seed: int
) -> dict[str, CompleteSplit]:
    """Draw train/val/test with every modality present; the seed changes every draw."""
    complete = scenario.model_copy(
        update={
            "modalities": [m.model_copy(update={"missing_rate": 0.0}) for m in scenario.modalities]
        }
    )
    splits = {}
    for offset, split in enumerate(SPLITS):
        data_seed = 1000 * seed + offset
        data = make_synthetic_features(
            complete.model_copy(update={"seed": data_seed}), sizes[split]
        )
        generator = torch.Generator().manual_seed(data_seed + 500)
        uniforms = torch.rand(len(data), len(scenario.modalities), generator=generator)
        splits[split] = CompleteSplit(data, uniforms)
    return splits


def restrict(
    split: CompleteSplit, names: list[str], all_names: list[str], missing_rates: dict[str, float]
) -> InMemoryMultimodalDataset:
    """Keep only the modalities ``names`` (M = len(names)) and apply missingness.

    Args:
        names: the subset, in the order the model will list its modalities.
        all_names: the order of the complete split's modalities (the scenario's).
        missing_rates: name -> probability that the modality is absent.
    """
    columns = [all_names.index(name) for name in names]
    rates = torch.tensor([missing_rates[name] for name in names])
    uniforms = split.uniforms[:, columns]
    available = uniforms >= rates  # [N, M]
    empty = ~available.any(dim=1)
    keep = (uniforms / rates.clamp_min(1e-12)).argmax(dim=1)
    available[empty, keep[empty]] = True
    inputs = {
        name: split.data.inputs[name] * available[:, i : i + 1] for i, name in enumerate(names)
    }
    return InMemoryMultimodalDataset(inputs, available, split.data.labels)


def with_absent_partner(
    dataset: InMemoryMultimodalDataset, name: str, partner: str = "absent"
) -> InMemoryMultimodalDataset:
    """A uni-modal dataset in the two-modality layout the model needs (M >= 2).

    The partner is a width-1 modality that is never available, so the model sees only its
    constant placeholder e(0): with concat fusion and no imputation this is a uni-modal model.
    """
    names = list(dataset.inputs)
    if name not in names:
        raise KeyError(f"modality '{name}' is not in the dataset, which holds {names}")
    n = len(dataset)
    available = torch.zeros(n, 2, dtype=torch.bool)
    available[:, 0] = dataset.availability[:, names.index(name)]
    inputs = {name: dataset.inputs[name], partner: torch.zeros(n, 1)}
    return InMemoryMultimodalDataset(inputs, available, dataset.labels)


def missing_rates_of(scenario: SyntheticFeatureConfig) -> dict[str, float]:
    """The scenario's per-modality missing rates by name."""
    return {m.name: m.missing_rate for m in scenario.modalities}

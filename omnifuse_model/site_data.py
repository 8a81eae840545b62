"""A site's training and validation datasets, built from its SiteConfig."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from omnifuse_model.batch import InMemoryMultimodalDataset
from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.site_config import SiteConfig
from omnifuse_model.synthetic import make_synthetic_features


@dataclass
class SiteDatasets:
    train: Dataset
    val: Dataset


def _absent_outside_site(
    data: InMemoryMultimodalDataset, model_config: OmniFuseConfig, site: SiteConfig
) -> InMemoryMultimodalDataset:
    """Mark modalities the site does not hold as absent (and zero their inputs)."""
    held = torch.tensor([name in site.modalities for name in model_config.modality_names])
    availability = data.availability & held
    keep = availability.any(dim=1)
    data.availability = availability
    for index, name in enumerate(model_config.modality_names):
        column = availability[:, index].view(-1, *[1] * (data.inputs[name].dim() - 1))
        data.inputs[name] = data.inputs[name] * column
    return data.subset(keep.nonzero().squeeze(1))


def load_site_datasets(site: SiteConfig, model_config: OmniFuseConfig) -> SiteDatasets:
    """The site's train/val datasets in the federation's modality order."""
    unknown = set(site.modalities) - set(model_config.modality_names)
    if unknown:
        raise ValueError(
            f"site '{site.name}': modalities {sorted(unknown)} are not in the federation's "
            f"model ({model_config.modality_names})"
        )
    if site.data.source == "synthetic_features":
        synthetic = site.data.synthetic
        train_size, val_size = site.data.synthetic_sizes
        train = make_synthetic_features(synthetic, train_size)
        val = make_synthetic_features(
            synthetic.model_copy(update={"seed": synthetic.seed + 7919}), val_size
        )
        return SiteDatasets(
            _absent_outside_site(train, model_config, site),
            _absent_outside_site(val, model_config, site),
        )
    raise NotImplementedError(
        f"site '{site.name}': data.source '{site.data.source}' needs the feature cache "
        "(omnifuse prepare), which this build does not provide yet"
    )

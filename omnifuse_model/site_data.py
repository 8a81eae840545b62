"""A site's train, validation and test datasets, built from its SiteConfig."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from omnifuse_model.batch import InMemoryMultimodalDataset, zero_absent
from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.data.ehr.normalizer import EHRNormalizer
from omnifuse_model.data.features.site_dataset import load_cached_split, load_cached_splits
from omnifuse_model.site_config import MIMIC_TASK_OUTPUTS, SiteConfig
from omnifuse_model.synthetic import make_synthetic_features


@dataclass
class SiteDatasets:
    train: Dataset
    val: Dataset


def _absent_outside_site(
    data: InMemoryMultimodalDataset, model_config: OmniFuseConfig, site: SiteConfig
) -> InMemoryMultimodalDataset:
    """A copy with the modalities the site does not hold marked absent (inputs zeroed) and
    the samples left with none dropped; ``data`` itself is not changed."""
    held = torch.tensor([name in site.modalities for name in model_config.modality_names])
    availability = data.availability & held
    inputs = {}
    for index, name in enumerate(model_config.modality_names):
        inputs[name] = zero_absent(data.inputs[name], availability[:, index])
    view = InMemoryMultimodalDataset(inputs, availability, data.labels, data.masks, data.sample_ids)
    return view.subset(availability.any(dim=1).nonzero().squeeze(1))


def _check_modalities(site: SiteConfig, model_config: OmniFuseConfig) -> None:
    unknown = set(site.modalities) - set(model_config.modality_names)
    if unknown:
        raise ValueError(
            f"site '{site.name}': modalities {sorted(unknown)} are not in the federation's "
            f"model ({model_config.modality_names})"
        )


def load_site_datasets(
    site: SiteConfig, model_config: OmniFuseConfig, normalizer: EHRNormalizer | None = None
) -> SiteDatasets:
    """The site's train/val datasets in the federation's modality order.

    ``synthetic_features``: generated feature-level data. ``feature_cache``: the train and val
    splits of the site's prepared feature cache (:func:`load_cached_splits`; run
    :func:`~omnifuse_model.data.features.cache.prepare_site` first), the EHR scaled with
    ``normalizer`` (the federation's, from the statistics phase) when given, else the one
    named in the site config, else the cache's own.
    """
    _check_modalities(site, model_config)
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
    _check_cached_task(site, model_config)
    normalizer = normalizer or _configured_normalizer(site)
    splits = load_cached_splits(
        site, ["train", "val"], modalities=model_config.modalities, normalizer=normalizer
    )
    return SiteDatasets(splits["train"], splits["val"])


def _configured_normalizer(site: SiteConfig) -> EHRNormalizer | None:
    """The normaliser named in the site config, or None for the cache's own."""
    path = site.data.ehr_normalizer
    if path is None:
        return None
    if not path.is_file():
        raise FileNotFoundError(
            f"site '{site.name}': data.ehr_normalizer {path} not found (a federation sends "
            "its sites the normaliser of its statistics phase; this file is only for "
            "training outside one)"
        )
    return EHRNormalizer.load(path)


def load_site_test_dataset(
    site: SiteConfig, model_config: OmniFuseConfig, normalizer: EHRNormalizer | None = None
) -> Dataset:
    """The site's test split in the federation's modality order (EHR scaled as in
    :func:`load_site_datasets`).

    ``feature_cache``: the listfile's test split from the feature cache. ``synthetic_features``:
    a fresh draw of the validation size from a seed of its own.
    """
    _check_modalities(site, model_config)
    if site.data.source == "synthetic_features":
        synthetic = site.data.synthetic
        test = make_synthetic_features(
            synthetic.model_copy(update={"seed": synthetic.seed + 2 * 7919}),
            site.data.synthetic_sizes[1],
        )
        return _absent_outside_site(test, model_config, site)
    _check_cached_task(site, model_config)
    return load_cached_split(
        site,
        "test",
        modalities=model_config.modalities,
        normalizer=normalizer or _configured_normalizer(site),
    )


def _check_cached_task(site: SiteConfig, model_config: OmniFuseConfig) -> None:
    """The model's output must fit the site's MIMIC task (labels of the feature cache)."""
    task, classes = MIMIC_TASK_OUTPUTS[site.task]
    if (model_config.task, model_config.num_classes) != (task, classes):
        raise ValueError(
            f"site '{site.name}': task '{site.task}' needs a model with task='{task}' and "
            f"num_classes={classes}, got task='{model_config.task}', "
            f"num_classes={model_config.num_classes}"
        )

"""Prepared sites (a scenario's or given site configs) as centralised training sees them.

Centralised training on a scenario pools the sites' train and val splits. Its EHR
normaliser is the federation's: every site's statistics-phase answer
(``client.statistics.site_statistics``, withheld below the audit threshold) goes through the
server's own decision (``server.statistics_phase.decide``: fingerprint majority, plausibility,
pooled count/sum/sum-of-squares), so preprocessing is identical to a simulated federation.
A site the federation would exclude (a mismatched backbone fingerprint, implausible EHR
statistics) is left out of the pool with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from client.statistics import site_statistics
from omnifuse_model.batch import InMemoryMultimodalDataset, zero_absent
from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.data.ehr.normalizer import EHRNormalizer
from omnifuse_model.data.features.manifest import read_manifest
from omnifuse_model.data.features.mapped_rows import concat_columns
from omnifuse_model.data.features.site_dataset import REPORT_TOKENS, mimic_model_modalities
from omnifuse_model.scenario import Scenario
from omnifuse_model.site_config import MIMIC_TASK_OUTPUTS, SiteConfig, load_site_config
from omnifuse_model.site_data import SiteDatasets, load_site_datasets, load_site_test_dataset
from server.statistics_phase import Preprocessing, decide

log = logging.getLogger(__name__)

DEFAULT_MIN_COUNT = 5  # the run config's audit-min-count default


@dataclass
class PreparedSites:
    """The sites of one training job, the model they share and the held-out test site."""

    sites: list[SiteConfig]
    model: OmniFuseConfig
    test_site: SiteConfig | None = None
    source: dict = field(default_factory=dict)  # where they came from (scenario dir / files)


def from_scenario(scenario_dir: str | Path) -> PreparedSites:
    """The scenario's sites, its model and its server test site."""
    scenario = Scenario.load(scenario_dir)
    sites = [load_site_config(path) for path in scenario.site_configs]
    test = (
        None if scenario.server_test_site is None else load_site_config(scenario.server_test_site)
    )
    source = {"scenario": str(Path(scenario_dir).resolve())}
    return PreparedSites(sites, scenario.model, test, source)


def model_for_sites(sites: list[SiteConfig], overrides: dict | None = None) -> OmniFuseConfig:
    """The model of site configs given without a scenario: synthetic sites' own modality
    specs; feature caches: the MIMIC modalities (text width from the cache manifest) and the
    task's outputs. Every site must agree on the source and task."""
    sources = {(s.data.source, s.task) for s in sites}
    if len(sources) != 1:
        raise ValueError(f"sites: mixed data sources/tasks {sorted(sources)}; give a scenario")
    first = sites[0]
    if first.data.source == "synthetic_features":
        synthetic = first.data.synthetic
        base = {
            "modalities": [m.model_dump() for m in synthetic.modality_specs()],
            "task": synthetic.task,
            "num_classes": synthetic.num_classes,
        }
    else:
        shapes = read_manifest(Path(first.cache_dir)).get("shapes", {})
        width = shapes.get("rep", [REPORT_TOKENS, 768])[1]
        task = MIMIC_TASK_OUTPUTS[first.task]
        base = {
            "modalities": [m.model_dump() for m in mimic_model_modalities(width)],
            "task": task.task,
            "num_classes": task.num_classes,
        }
    return OmniFuseConfig.model_validate({**base, **(overrides or {})})


def from_site_files(paths: list[str | Path], test_path: str | Path | None = None) -> PreparedSites:
    """Site configs given one by one (no scenario); the model from :func:`model_for_sites`."""
    sites = [load_site_config(path) for path in paths]
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"--site: a site name appears twice in {names}")
    test = None if test_path is None else load_site_config(test_path)
    source = {"site_configs": [str(Path(p).resolve()) for p in paths]}
    return PreparedSites(sites, model_for_sites(sites), test, source)


def federated_preprocessing(
    sites: list[SiteConfig], model: OmniFuseConfig, min_count: int = DEFAULT_MIN_COUNT
) -> Preprocessing:
    """What the statistics phase would decide for these sites (see the module docstring)."""
    answers = {s.name: site_statistics(s, model.modality_names, min_count) for s in sites}
    decided = decide(answers, {})
    for name, reason in decided.excluded.items():
        log.warning("site %s left out of the pool, as a federation would: %s", name, reason)
    return decided


def normalizer_of(preprocessing: dict | Preprocessing | None) -> EHRNormalizer | None:
    """The EHR normaliser a checkpoint's or decision's preprocessing holds, if any."""
    if preprocessing is None:
        return None
    if isinstance(preprocessing, dict):
        preprocessing = Preprocessing.from_json(preprocessing)
    state = preprocessing.normalizer
    return None if state is None else state.normalizer()


def pool(parts: list[InMemoryMultimodalDataset]) -> InMemoryMultimodalDataset:
    """One dataset of the parts in order; sample ids become ``<site>:<id>`` by position."""
    parts = [p for p in parts if len(p)]
    if not parts:
        raise ValueError("pool: every site's split is empty")
    masks = {k: torch.cat([p.masks[k] for p in parts]) for k in parts[0].masks}
    return InMemoryMultimodalDataset(
        {k: concat_columns([p.inputs[k] for p in parts]) for k in parts[0].inputs},
        torch.cat([p.availability for p in parts]),
        torch.cat([p.labels for p in parts]),
        masks,
        [f"{i}:{s}" for i, p in enumerate(parts) for s in p.sample_ids],
    )


def site_datasets(prepared: PreparedSites, preprocessing: Preprocessing) -> dict[str, SiteDatasets]:
    """Every pooled site's train/val, EHR scaled with the federated normaliser."""
    normalizer = normalizer_of(preprocessing)
    return {
        site.name: load_site_datasets(site, prepared.model, normalizer)
        for site in prepared.sites
        if site.name not in preprocessing.excluded
    }


def test_dataset(
    prepared: PreparedSites, preprocessing: Preprocessing
) -> InMemoryMultimodalDataset:
    """The held-out test set: the test site's, else the pooled sites' test splits."""
    normalizer = normalizer_of(preprocessing)
    if prepared.test_site is not None:
        return load_site_test_dataset(prepared.test_site, prepared.model, normalizer)
    return pool(
        [
            load_site_test_dataset(site, prepared.model, normalizer)
            for site in prepared.sites
            if site.name not in preprocessing.excluded
        ]
    )


def restrict_modalities(prepared: PreparedSites, keep: list[str]) -> PreparedSites:
    """The same sites with a model over ``keep`` only (a Table 4 modality subset); a site left
    with none of them drops out."""
    unknown = sorted(set(keep) - set(prepared.model.modality_names))
    if unknown:
        raise ValueError(
            f"modalities {unknown} are not in the model ({prepared.model.modality_names})"
        )
    specs = [m for m in prepared.model.modalities if m.name in keep]
    model = prepared.model.model_copy(update={"modalities": specs})
    model = OmniFuseConfig.model_validate(model.model_dump())

    def narrowed(site: SiteConfig) -> SiteConfig:
        return site.model_copy(update={"modalities": [m for m in site.modalities if m in keep]})

    sites = [narrowed(s) for s in prepared.sites if set(s.modalities) & set(keep)]
    test = None if prepared.test_site is None else narrowed(prepared.test_site)
    return PreparedSites(sites, model, test, prepared.source)


def mask_at_rate(
    data: InMemoryMultimodalDataset, rate: float, seed: int
) -> InMemoryMultimodalDataset:
    """Hide each available modality of each sample with probability ``rate`` (on top of the
    data's own missingness); a sample keeps one of its modalities, drawn uniformly, when it
    would lose all. Hidden inputs are zeroed; ``data`` itself is not changed."""
    if rate <= 0 or len(data) == 0:
        return data
    generator = torch.Generator().manual_seed(seed)
    hide = torch.rand(data.availability.shape, generator=generator) < rate
    availability = data.availability & ~hide
    empty = (~availability.any(dim=1)).nonzero().squeeze(1)
    for row in empty.tolist():
        held = data.availability[row].nonzero().squeeze(1)
        pick = held[torch.randint(0, len(held), (1,), generator=generator)]
        availability[row, pick] = True
    inputs = {}
    for index, (name, column) in enumerate(data.inputs.items()):
        inputs[name] = zero_absent(column, availability[:, index])
    return InMemoryMultimodalDataset(inputs, availability, data.labels, data.masks, data.sample_ids)

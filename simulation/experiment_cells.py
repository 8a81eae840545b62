"""Running one experiment cell: a method on a scenario variant with a seed.

Data: the scenario's sites (``simulation.prepared_sites``), restricted to the variant's
modality subset, EHR scaled with the normaliser the federation's statistics phase would
compute, and each split given the variant's extra missingness (``mask_at_rate``, seeded by
the cell's seed and the site). The test set is the scenario's server test site (else the
pooled sites' test splits) with the same extra missingness; every method of a variant and
seed is scored on the same test set.

Modes:

* ``centralised``: one model on the pooled train splits, early stopping on the pooled val.
* ``local``: each site trains alone (early stopping on its own val); the cell's metrics are
  the mean over sites, every site's kept under ``per_site``.
* ``federated``: in-process rounds through the deployed apps' own functions: each site's
  ``client.local_training.train_round`` from the global weights (its round seed from
  ``omnifuse_model.round_plan.site_round_seed``, its last mined lazy combination, FedProx
  mu), then ``server.aggregation.aggregate_states`` (FedAvg, modality-aware or plain). This
  is what `flwr run` of the ServerApp/ClientApp computes, without the Flower transport,
  registration, update screening and audit; the final round's model is scored.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import torch

from omnifuse_model.batch import InMemoryMultimodalDataset
from omnifuse_model.config import OmniFuseConfig, TrainConfig
from omnifuse_model.metrics import expected_calibration_error
from omnifuse_model.model import OmniFuse
from omnifuse_model.site_data import SiteDatasets
from simulation import prepared_sites
from simulation.experiment_config import Cell, ExperimentConfig, ScenarioEntry, Variant


@dataclass
class VariantData:
    """A scenario variant's data for one seed, shared by every method."""

    model: OmniFuseConfig
    sites: dict[str, SiteDatasets]
    test: InMemoryMultimodalDataset


def _split_seed(seed: int, rate: float, site: str, split: str) -> int:
    return seed * 1_000_003 + zlib.crc32(f"{rate:.4f}/{site}/{split}".encode()) % 1_000_003


def load_prepared(entry: ScenarioEntry, work_dir) -> prepared_sites.PreparedSites:
    """The scenario's sites; generated synthetic ones are written under ``work_dir`` first."""
    if entry.dir is not None:
        return prepared_sites.from_scenario(entry.dir)
    from simulation.benchmarks.federation import PATTERNS
    from simulation.central import default_synthetic
    from simulation.scenarios import write_feature_scenario

    spec = entry.synthetic
    data = default_synthetic().model_copy(update={"seed": spec.data_seed})
    model = OmniFuseConfig.model_validate(
        {"modalities": data.modality_specs(), "task": data.task, "num_classes": data.num_classes}
    )
    modalities = [list(PATTERNS[i % len(PATTERNS)]) for i in range(spec.sites)]
    sizes = [(spec.train_per_site, spec.val_per_site)] * spec.sites
    folder = work_dir / "scenarios" / entry.name
    write_feature_scenario(folder, data, model, modalities, sizes, spec.test_size)
    return prepared_sites.from_scenario(folder)


def variant_data(
    prepared: prepared_sites.PreparedSites, variant: Variant, seed: int
) -> VariantData:
    """The variant's sites and test set for ``seed`` (see the module docstring)."""
    if variant.subset is not None:
        prepared = prepared_sites.restrict_modalities(prepared, variant.subset)
    decided = prepared_sites.federated_preprocessing(prepared.sites, prepared.model)
    rate = variant.missing_rate
    sites = {}
    for name, data in prepared_sites.site_datasets(prepared, decided).items():
        sites[name] = SiteDatasets(
            prepared_sites.mask_at_rate(data.train, rate, _split_seed(seed, rate, name, "train")),
            prepared_sites.mask_at_rate(data.val, rate, _split_seed(seed, rate, name, "val")),
        )
    test = prepared_sites.test_dataset(prepared, decided)
    test = prepared_sites.mask_at_rate(test, rate, _split_seed(seed, rate, "", "test"))
    return VariantData(prepared.model, sites, test)


def _model_config(base: OmniFuseConfig, overrides: dict) -> OmniFuseConfig:
    fixed = sorted({"modalities", "task", "num_classes"} & set(overrides))
    if fixed:
        raise ValueError(f"model: {fixed} come from the scenario and cannot be overridden")
    return OmniFuseConfig.model_validate({**base.model_dump(), **overrides})


def score(model: OmniFuse, test: InMemoryMultimodalDataset, seed: int) -> dict:
    """Test AUROC, AUPRC and ECE (10 bins) of a model."""
    from omnifuse_model.training import evaluate

    config = TrainConfig(batch_size=256, progress=False, bootstrap_samples=0, seed=seed)
    result = evaluate(model, test, config, imputation_error=False)
    ece = expected_calibration_error(result.labels, result.probabilities, model.config.task)
    return {"auroc": result.metrics["auroc"], "auprc": result.metrics["auprc"], "ece": ece}


def _fit(model_config, train, val, config: TrainConfig, seed: int) -> OmniFuse:
    from omnifuse_model.training import fit

    torch.manual_seed(seed)
    model = OmniFuse(model_config)
    fit(model, train, val, config.model_copy(update={"seed": seed, "progress": False}))
    return model


def _centralised(model_config, data: VariantData, config: ExperimentConfig, seed: int) -> dict:
    train = prepared_sites.pool([d.train for d in data.sites.values()])
    val = prepared_sites.pool([d.val for d in data.sites.values()])
    return score(_fit(model_config, train, val, config.train, seed), data.test, seed)


def _local(model_config, data: VariantData, config: ExperimentConfig, seed: int) -> dict:
    per_site = {}
    for name, site in data.sites.items():
        val = site.val if len(site.val) else None
        per_site[name] = score(
            _fit(model_config, site.train, val, config.train, seed), data.test, seed
        )
    keys = ("auroc", "auprc", "ece")
    mean = {k: float(sum(r[k] for r in per_site.values()) / len(per_site)) for k in keys}
    return {**mean, "per_site": per_site}


def _federated(model_config, data: VariantData, config: ExperimentConfig, cell: Cell) -> dict:
    """In-process federation (see the module docstring)."""
    from client.local_training import RoundInstructions, train_round
    from omnifuse_model.round_plan import site_round_seed
    from server.aggregation import aggregate_states

    seed, method = cell.seed, cell.method
    torch.manual_seed(seed)  # the ServerApp's initialisation
    state = {k: v.numpy().copy() for k, v in OmniFuse(model_config).state_dict().items()}
    lazy: dict[str, tuple[str, ...]] = {}
    base = config.train.model_copy(
        update={"epochs": config.federation.local_epochs, "patience": 0, "progress": False}
    )
    for global_round in range(1, config.federation.rounds + 1):
        global_torch = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
        states, counts = [], []
        for name, site in data.sites.items():
            train = base.model_copy(update={"seed": site_round_seed(seed, global_round, name)})
            instructions = RoundInstructions(
                model_config, train, global_round, method.proximal_mu, lazy.get(name)
            )
            result = train_round(name, site, instructions, global_torch)
            if result.laziness is not None and result.laziness.lazy_combination:
                lazy[name] = tuple(result.laziness.lazy_combination)
            states.append({k: v.numpy() for k, v in result.state.items()})
            counts.append(result.metrics)
        state = aggregate_states(
            states, counts, model_config.modality_names, state, modality_aware=method.modality_aware
        )
    model = OmniFuse(model_config)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
    return score(model, data.test, seed)


def run_cell(cell: Cell, data: VariantData, config: ExperimentConfig) -> dict:
    """Train and score one cell; returns its result (metrics, seconds, sizes)."""
    started = time.perf_counter()
    model_config = _model_config(data.model, cell.method.model_overrides(config.model))
    if cell.method.mode == "centralised":
        result = _centralised(model_config, data, config, cell.seed)
    elif cell.method.mode == "local":
        result = _local(model_config, data, config, cell.seed)
    else:
        result = _federated(model_config, data, config, cell)
    return {
        **result,
        "seconds": round(time.perf_counter() - started, 3),
        "n_test": len(data.test),
        "sites": sorted(data.sites),
    }

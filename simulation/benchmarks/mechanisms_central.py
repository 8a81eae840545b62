"""What every central mechanism scenario shares: settings, model arms, training and probes.

A *cell* is one trained model: one arm (a model configuration) on one data design and seed.
Within a seed every arm trains on the same draw (train, val, test) with the same
initialisation seed, so arms are paired. The model is the shipped one: ``OmniFuse`` trained
by ``omnifuse_model.training.fit`` (early stopping on validation AUROC, training-time
modality dropping) and scored on predictions of its reported joint output.

Arms come from the Table 4 presets (``omnifuse_model.config.ABLATION_ROWS``: (a)
concat, (b) DWFuse, (c) DWFuse + TLA, (f) everything) plus single-switch variants: concat
with forward imputation, concat with TLA, and DWFuse with beta = 0 (omega = 1).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from omnifuse_model.batch import InMemoryMultimodalDataset
from omnifuse_model.config import ABLATION_ROWS, OmniFuseConfig, StrictModel, TrainConfig
from omnifuse_model.metrics import auroc
from omnifuse_model.model import OmniFuse
from omnifuse_model.training import fit, iterate_batches
from simulation.benchmarks.mechanisms_data import (
    MechanismDataConfig,
    MechanismSplit,
    make_mechanism_split,
)

ARMS: dict[str, dict] = {
    "a_concat": ABLATION_ROWS["a"],
    "b_dwfuse": ABLATION_ROWS["b"],
    "c_dwfuse_tla": ABLATION_ROWS["c"],
    "f_all": ABLATION_ROWS["f"],
    "concat_fw": {**ABLATION_ROWS["a"], "use_forward_imputation": True},
    "concat_tla": {**ABLATION_ROWS["a"], "use_tla": True},
    "b_beta0": {**ABLATION_ROWS["b"], "beta": 0.0},
}


class SuiteSettings(StrictModel):
    """Sizes, model and training shared by the central scenarios (written into the JSON)."""

    seeds: list[int] = Field(min_length=1)
    train_small: int = Field(gt=0, description="Training samples of the small-data designs.")
    train_large: int = Field(gt=0, description="Training samples of the 'more data' check.")
    train: int = Field(gt=0, description="Training samples of the DWFuse and TLA designs.")
    val: int = Field(gt=0, description="Validation samples (early stopping), train missingness.")
    test: int = Field(gt=0)
    model: dict = Field(description="OmniFuseConfig overrides shared by every arm.")
    training: TrainConfig


def suite_settings(quick: bool, seeds: list[int]) -> SuiteSettings:
    """Full: sizes and epochs for converged small models. Quick: a smoke run of every cell.

    Epochs are capped high (100, patience 10) because the small-data designs take only 4
    optimiser steps per epoch; early stopping on validation AUROC decides where to stop.
    """
    if quick:
        return SuiteSettings(
            seeds=seeds,
            train_small=120,
            train_large=400,
            train=300,
            val=150,
            test=400,
            model={"d": 16, "num_blocks": 2, "cra_hidden": (32, 16)},
            training=TrainConfig(epochs=6, patience=3, bootstrap_samples=0, progress=False),
        )
    return SuiteSettings(
        seeds=seeds,
        train_small=200,
        train_large=2000,
        train=1000,
        val=500,
        test=2000,
        model={"d": 32, "num_blocks": 3, "cra_hidden": (64, 32)},
        training=TrainConfig(epochs=100, patience=10, bootstrap_samples=0, progress=False),
    )


@dataclass
class DesignData:
    """One design's three splits for one seed."""

    config: MechanismDataConfig
    train: MechanismSplit
    val: MechanismSplit
    test: MechanismSplit


def draw_design(
    config: MechanismDataConfig, n_train: int, settings: SuiteSettings, seed: int
) -> DesignData:
    """Train, val and test splits of a design (the seed drives every sample draw)."""
    return DesignData(
        config=config,
        train=make_mechanism_split(config, n_train, seed, "train"),
        val=make_mechanism_split(config, settings.val, seed, "val"),
        test=make_mechanism_split(config, settings.test, seed, "test"),
    )


@dataclass
class TrainedArm:
    """A fitted model of one cell and what its training did."""

    model: OmniFuse
    training: TrainConfig
    best_epoch: int
    epochs_run: int
    seconds: float

    @property
    def lazy_combination(self) -> list[str] | None:
        lazy = self.model.lazy_combination
        return list(lazy) if lazy else None


def train_arm(
    data: DesignData, arm: str, seed: int, settings: SuiteSettings, drop_rate: float | None = None
) -> TrainedArm:
    """Fit arm ``arm`` (a key of ARMS) on the design's train split, early-stopping on val."""
    if arm not in ARMS:
        raise ValueError(f"arm: expected one of {sorted(ARMS)}, got {arm!r}")
    model_config = OmniFuseConfig(
        modalities=data.config.modality_specs(),
        task="binary",
        **{**settings.model, **ARMS[arm]},
    )
    update: dict = {"seed": seed, "progress": False, "bootstrap_samples": 0}
    if drop_rate is not None:
        update["drop_rate"] = drop_rate
    training = settings.training.model_copy(update=update)
    torch.manual_seed(seed)
    model = OmniFuse(model_config)
    start = time.perf_counter()
    history = fit(model, data.train.dataset, data.val.dataset, training)
    return TrainedArm(
        model, training, history.best_epoch, len(history.history), time.perf_counter() - start
    )


@dataclass
class Predictions:
    """Per-sample outputs of a model on one dataset: probability [N], omega [N, M] or None
    (with labels: the training-time weights from each head's true-label probability)."""

    probability: np.ndarray
    omega: np.ndarray | None


@torch.no_grad()
def predict(trained: TrainedArm, dataset: InMemoryMultimodalDataset) -> Predictions:
    """Probabilities and label-driven DWFuse weights of every sample (eval mode)."""
    model = trained.model
    model.eval()
    probabilities, weights = [], []
    for batch in iterate_batches(dataset, trained.training.eval_batch_size):
        output = model(batch.inputs, batch.availability, batch.masks, labels=batch.labels)
        probabilities.append(model.predict_proba(output.logits.float()).squeeze(1))
        if output.dwfuse_weights is not None:
            weights.append(output.dwfuse_weights.float())
    omega = torch.cat(weights).numpy() if weights else None
    return Predictions(torch.cat(probabilities).numpy(), omega)


def auroc_on(labels: Tensor, scores: np.ndarray | Tensor, rows: Tensor | None = None) -> float:
    """Binary AUROC over ``rows`` (bool [N]; all when None); NaN when one class is absent."""
    y = labels.reshape(-1).numpy()
    s = scores.numpy() if isinstance(scores, Tensor) else np.asarray(scores)
    if rows is not None:
        keep = rows.numpy()
        y, s = y[keep], s[keep]
    if y.size == 0 or y.min() == y.max():
        return math.nan
    return float(auroc(y[:, None], s[:, None], "binary"))


def only_modalities(dataset: InMemoryMultimodalDataset, keep: list[int]) -> tuple:
    """A probe set: the samples holding every modality in ``keep``, with all others hidden.

    Returns (dataset, rows): rows is the bool [N] selection in the original order.
    """
    availability = dataset.availability
    rows = availability[:, keep].all(dim=1)
    index = rows.nonzero().squeeze(1)
    hidden = torch.zeros_like(availability[index])
    hidden[:, keep] = True
    inputs = {
        name: tensor[index] * hidden[:, i : i + 1]
        for i, (name, tensor) in enumerate(dataset.inputs.items())
    }
    return InMemoryMultimodalDataset(inputs, hidden, dataset.labels[index]), rows


def hide_modality(dataset: InMemoryMultimodalDataset, index: int) -> InMemoryMultimodalDataset:
    """The same samples with modality ``index`` absent everywhere (a uni-modal training set).

    Samples that held only that modality keep nothing; they are dropped.
    """
    availability = dataset.availability.clone()
    availability[:, index] = False
    keep = availability.any(dim=1).nonzero().squeeze(1)
    inputs = {
        name: (tensor * 0.0 if i == index else tensor)[keep]
        for i, (name, tensor) in enumerate(dataset.inputs.items())
    }
    return InMemoryMultimodalDataset(inputs, availability[keep], dataset.labels[keep])


class SeedValues:
    """Per-seed measurements of a scenario, by key (e.g. 'mlp/f_all/auroc_b_missing'), and
    counts of categorical outcomes (e.g. the mined lazy combination) summed over seeds."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}
        self.counts: dict[str, Counter] = {}

    def count(self, key: str, outcome: str) -> None:
        self.counts.setdefault(key, Counter())[outcome] += 1

    @classmethod
    def merged(cls, parts: list[SeedValues]) -> SeedValues:
        """One SeedValues from per-seed parts, values concatenated in the parts' order."""
        whole = cls()
        for part in parts:
            for key, values in part.values.items():
                whole.values.setdefault(key, []).extend(values)
            for key, counter in part.counts.items():
                whole.counts.setdefault(key, Counter()).update(counter)
        return whole

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(float(value))

    def __getitem__(self, key: str) -> list[float]:
        if key not in self.values:
            raise KeyError(f"no measurement '{key}'; have {sorted(self.values)}")
        return self.values[key]

    def mean(self, key: str) -> float:
        return float(np.mean(self[key]))

    def difference(self, first: str, second: str) -> list[float]:
        """Per-seed first - second."""
        return [a - b for a, b in zip(self[first], self[second], strict=True)]

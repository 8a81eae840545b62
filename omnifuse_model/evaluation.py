"""Evaluation: metrics with bootstrap intervals plus the audit aggregates (mean DWFuse weight
and imputation error per modality), always computed in float32."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from omnifuse_model.batch import Batch
from omnifuse_model.batch_iteration import iterate_batches
from omnifuse_model.config import TrainConfig
from omnifuse_model.metrics import classification_report
from omnifuse_model.model import OmniFuse, OmniFuseOutput


def full_precision(config: TrainConfig) -> contextlib.AbstractContextManager:
    """float32 for everything that produces scores (evaluation, reported embeddings): autocast
    off on the run's device, also inside a caller's autocast region. bfloat16 keeps ~3
    significant digits, so its logits tie across samples and move AUROC (by ~0.003 on
    MIMIC); mixed precision is a training-speed choice only."""
    return torch.autocast(device_type=torch.device(config.device).type, enabled=False)


@dataclass
class EvaluationResult:
    """Metrics plus the per-modality audit aggregates of one evaluation pass."""

    metrics: dict[str, float]
    mean_dwfuse_weight: dict[str, float]
    imputation_error: dict[str, float]
    availability_counts: dict[str, int]
    probabilities: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    imputation_error_normalised: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def evaluate(
    model: OmniFuse,
    dataset: Dataset,
    config: TrainConfig,
    seed: int | None = None,
    imputation_error: bool = True,
    embedding_means: Tensor | None = None,
) -> EvaluationResult:
    """Predict every sample and report AUROC/AUPRC (bootstrap CIs), mean DWFuse weight and
    imputation error per modality.

    Always in float32 (``full_precision``), whatever ``config.mixed_precision`` says and
    even inside a caller's autocast region: bfloat16 logits tie and move AUROC.

    Imputation error of modality m: the mean squared distance between its true embedding and
    the forward imputation made when m alone is hidden, over samples holding m and at least
    one other modality (NaN without forward imputation or such samples). It costs one more
    forward pass per modality; ``imputation_error=False`` skips it (all NaN), for passes that
    need the metrics alone (validation for early stopping, federated evaluation).

    Normalised imputation error (1 - R^2): that MSE divided by the MSE of predicting a
    constant, the mean embedding ``embedding_means[m]`` ([M, d], e.g. ``mean_embeddings`` of
    the training split; the evaluated samples' own mean when None), over the same samples.
    Embedding scales differ between encoders; this ratio does not (0 = perfect, 1 = no
    better than the mean, above 1 = worse).
    """
    if len(dataset) == 0:
        raise ValueError("evaluate: the dataset is empty")
    model.eval()
    device = torch.device(config.device)
    names = model.config.modality_names
    sums = _EvaluationSums.zeros(len(names))
    for batch in iterate_batches(dataset, config.eval_batch_size, num_workers=config.num_workers):
        batch = batch.to(device)
        with full_precision(config):
            output = model(batch.inputs, batch.availability, batch.masks)
            if imputation_error and model.forward_cra is not None:
                _add_imputation_errors(model, batch, output.completed, sums)
        sums.add_batch(model, batch, output)
    normalised = sums.normalised_errors(names, embedding_means)
    probabilities = torch.cat(sums.probabilities).numpy()
    label_array = torch.cat(sums.labels).numpy()
    metrics = classification_report(
        label_array,
        probabilities,
        model.config.task,
        config.bootstrap_samples,
        config.seed if seed is None else seed,
    )
    return EvaluationResult(
        metrics=metrics,
        **sums.per_modality(names, has_weights=model.heads is not None),
        imputation_error_normalised=normalised,
        probabilities=probabilities,
        labels=label_array,
    )


@dataclass
class _EvaluationSums:
    """Running sums of one evaluation pass (per modality: DWFuse weight, imputation error)."""

    weights: Tensor
    errors: Tensor
    error_counts: Tensor
    present: Tensor
    samples: int = 0
    probabilities: list[Tensor] = field(default_factory=list)
    labels: list[Tensor] = field(default_factory=list)
    # over the samples of ``errors``: sum of true embeddings [M, d], of their mean squares [M]
    embedding_sums: Tensor | None = None
    embedding_squares: Tensor | None = None

    @classmethod
    def zeros(cls, modalities: int) -> _EvaluationSums:
        return cls(
            weights=torch.zeros(modalities, dtype=torch.float64),
            errors=torch.zeros(modalities, dtype=torch.float64),
            error_counts=torch.zeros(modalities, dtype=torch.long),
            present=torch.zeros(modalities, dtype=torch.long),
        )

    def add_batch(self, model: OmniFuse, batch: Batch, output: OmniFuseOutput) -> None:
        """One batch's probabilities, labels, DWFuse weights and availability counts."""
        self.probabilities.append(model.predict_proba(output.logits.float()).cpu())
        self.labels.append(batch.labels.cpu())
        if output.dwfuse_weights is not None:
            self.weights += output.dwfuse_weights.sum(dim=0).double().cpu()
        self.present += batch.availability.sum(dim=0).cpu()
        self.samples += len(batch)

    def add_embeddings(self, m: int, true: Tensor) -> None:
        """Running sums of the true embeddings ``true`` [n, d] of modality m (for the
        normalised error's baseline)."""
        true = true.detach().double().cpu()
        if self.embedding_sums is None or self.embedding_squares is None:
            self.embedding_sums = torch.zeros(len(self.errors), true.shape[1], dtype=torch.float64)
            self.embedding_squares = torch.zeros(len(self.errors), dtype=torch.float64)
        self.embedding_sums[m] += true.sum(dim=0)
        self.embedding_squares[m] += true.pow(2).mean(dim=1).sum()

    def normalised_errors(self, names: list[str], means: Tensor | None) -> dict[str, float]:
        """Per modality: imputation MSE / MSE of predicting the mean embedding (NaN when
        undefined). With n samples, sums S and mean squares Q, the constant mu scores
        (Q - 2 mu.S / d + n |mu|^2 / d) / n per dimension."""
        result = {name: math.nan for name in names}
        if self.embedding_sums is None or self.embedding_squares is None:
            return result
        d = self.embedding_sums.shape[1]
        for m, name in enumerate(names):
            n = int(self.error_counts[m])
            if n == 0:
                continue
            total = self.embedding_sums[m]
            mu = total / n if means is None else means[m].detach().double().cpu()
            if bool(torch.isnan(mu).any()):
                continue
            baseline = (self.embedding_squares[m] - 2 * mu.dot(total) / d) / n + mu.dot(mu) / d
            # an embedding that does not vary (baseline ~ 0 up to rounding) has no baseline
            if float(baseline) > 1e-9 * float(self.embedding_squares[m] / n):
                result[name] = float(self.errors[m] / n / baseline)
        return result

    def per_modality(self, names: list[str], has_weights: bool) -> dict[str, dict]:
        """Mean DWFuse weight, mean imputation error (NaN when undefined), present counts."""
        n = self.samples
        return {
            "mean_dwfuse_weight": {
                name: float(self.weights[i] / n) if has_weights and n > 0 else math.nan
                for i, name in enumerate(names)
            },
            "imputation_error": {
                name: float(self.errors[i] / self.error_counts[i])
                if self.error_counts[i] > 0
                else math.nan
                for i, name in enumerate(names)
            },
            "availability_counts": {name: int(self.present[i]) for i, name in enumerate(names)},
        }


def _add_imputation_errors(
    model: OmniFuse, batch: Batch, completed: Tensor, sums: _EvaluationSums
) -> None:
    """Hide each modality m alone and add the squared distance between its forward
    imputation and its true embedding (``completed[:, m]``), over samples holding m and at
    least one other modality."""
    for m in range(len(model.config.modality_names)):
        holds = batch.availability[:, m] & (batch.availability.sum(dim=1) > 1)
        if not bool(holds.any()):
            continue
        hide = torch.zeros_like(batch.availability)
        hide[:, m] = True
        hidden = model(batch.inputs, batch.availability, batch.masks, drop=hide)
        error = (hidden.completed[:, m] - completed[:, m]).pow(2).mean(dim=1)
        sums.errors[m] += float(error[holds].sum())
        sums.error_counts[m] += int(holds.sum())
        sums.add_embeddings(m, completed[holds, m])


@torch.no_grad()
def mean_embeddings(model: OmniFuse, dataset: Dataset, config: TrainConfig) -> Tensor:
    """Mean true embedding of each modality over the samples holding it: [M, d] (a row of
    NaN for a modality no sample holds). The baseline of the normalised imputation error."""
    model.eval()
    device = torch.device(config.device)
    sums: Tensor | None = None
    counts = torch.zeros(len(model.config.modality_names), dtype=torch.float64)
    for batch in iterate_batches(dataset, config.eval_batch_size, num_workers=config.num_workers):
        batch = batch.to(device)
        with full_precision(config):
            output = model(batch.inputs, batch.availability, batch.masks)
        held = batch.availability.to(torch.float64).cpu()  # [B, M]
        completed = output.completed.detach().double().cpu()  # [B, M, d]
        part = (completed * held.unsqueeze(-1)).sum(dim=0)
        sums = part if sums is None else sums + part
        counts += held.sum(dim=0)
    if sums is None:
        raise ValueError("mean_embeddings: the dataset is empty")
    return sums / counts.unsqueeze(-1)  # 0/0 = NaN for a modality no sample holds

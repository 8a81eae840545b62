"""One training loop, used for centralised runs and by every federated site.

``fit`` trains for ``TrainConfig.epochs`` with training-time modality dropping, mines the lazy
combination after each epoch (TLA), early-stops on validation AUROC and restores the best
weights. Evaluation (``evaluate``, in ``omnifuse_model.evaluation``) and batching
(``iterate_batches``, in ``omnifuse_model.batch_iteration``) are re-exported here for callers.
Runs are deterministic under a seed.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor
from torch.utils.data import Dataset

from omnifuse_model.batch import Batch
from omnifuse_model.batch_iteration import iterate_batches
from omnifuse_model.config import TrainConfig
from omnifuse_model.evaluation import (
    EvaluationResult,
    evaluate,
    full_precision,
    mean_embeddings,
)
from omnifuse_model.laziness import LazinessMiner, LazinessReport, combination_masks
from omnifuse_model.model import OmniFuse

__all__ = [
    "BatchSource",
    "EpochRecord",
    "EvaluationResult",
    "ExtraLoss",
    "FitResult",
    "autocast",
    "evaluate",
    "fit",
    "full_precision",
    "iterate_batches",
    "mean_embeddings",
    "mine_laziness",
    "sample_training_drop",
    "seed_everything",
    "train_epoch",
    "write_run",
]

ExtraLoss = Callable[[OmniFuse], Tensor]
# One epoch's training batches, given the run's generator (e.g. DP-SGD's Poisson sampling).
BatchSource = Callable[[torch.Generator], Iterable[Batch]]


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and numpy; return the generator that drives shuffling and dropping."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


@functools.lru_cache(maxsize=8)
def _index_combinations(num_modalities: int) -> Tensor:
    return combination_masks([str(i) for i in range(num_modalities)])


def sample_training_drop(
    availability: Tensor, drop_rate: float, generator: torch.Generator | None = None
) -> Tensor:
    """Which present modalities to hide from each training sample (METHOD.md section 2).

    With probability ``drop_rate`` a sample holding >= 2 modalities keeps only a uniformly
    chosen proper non-empty subset of them (for M = 3 and a complete sample: the paper's six
    missing scenarios); the hidden modalities become imputation targets.

    Args:
        availability: bool [B, M].

    Returns:
        bool [B, M], True where a present modality is hidden.
    """
    batch, num_modalities = availability.shape
    combos = _index_combinations(num_modalities)  # [C, M]
    present = availability.cpu()
    subset = (~combos.unsqueeze(0) | present.unsqueeze(1)).all(dim=2)  # combo within present
    proper = subset & (combos.sum(1).unsqueeze(0) < present.sum(1, keepdim=True))
    scores = torch.rand(batch, combos.shape[0], generator=generator)
    scores = scores.masked_fill(~proper, -1.0)
    choice = combos[scores.argmax(dim=1)]  # [B, M]
    drops = torch.rand(batch, generator=generator) < drop_rate
    drops &= proper.any(dim=1)
    hidden = present & ~choice & drops.unsqueeze(1)
    return hidden.to(availability.device)


def autocast(config: TrainConfig) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA when mixed precision is on (bf16 needs no loss scaling);
    a no-op elsewhere."""
    device = torch.device(config.device)
    if device.type == "cuda" and config.mixed_precision:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=True,
    )


def train_epoch(
    model: OmniFuse,
    dataset: Dataset,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    generator: torch.Generator,
    extra_loss: ExtraLoss | None = None,
    progress: Progress | None = None,
    batches: Iterable[Batch] | None = None,
) -> dict[str, float]:
    """One epoch over ``dataset``; returns the mean of every named loss.

    ``batches`` replaces the shuffled in-order batches of ``dataset`` (e.g. DP-SGD's
    Poisson-sampled ones).
    """
    model.train()
    device = torch.device(config.device)
    sums: dict[str, float] = {}
    steps = 0
    total_batches = math.ceil(len(dataset) / config.batch_size)
    task = progress.add_task("train", total=total_batches, info="") if progress else None
    if batches is None:
        batches = iterate_batches(dataset, config.batch_size, True, generator, config.num_workers)
    for batch in batches:
        batch = batch.to(device)
        drop = sample_training_drop(batch.availability, config.drop_rate, generator)
        with autocast(config):
            output = model(batch.inputs, batch.availability, batch.masks, batch.labels, drop)
            loss = output.losses["total"]
            if extra_loss is not None:
                loss = loss + extra_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        for name, value in output.losses.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        steps += 1
        if progress is not None:
            progress.update(task, advance=1, info=f"loss {float(loss.detach()):.4f}")
    if progress is not None:
        progress.remove_task(task)
    return {name: total / max(steps, 1) for name, total in sums.items()}


@torch.no_grad()
def mine_laziness(model: OmniFuse, dataset: Dataset, config: TrainConfig) -> LazinessReport:
    """Lazy-combination mining over a dataset (Eq. 15), model in eval mode."""
    model.eval()
    device = torch.device(config.device)
    miner = LazinessMiner(model.config.modality_names, model.config.tla_reduction)
    for batch in iterate_batches(dataset, config.eval_batch_size, num_workers=config.num_workers):
        batch = batch.to(device)
        with autocast(config):
            distances, eligible = model.combination_distances(
                batch.inputs, batch.availability, batch.labels, batch.masks
            )
        miner.update(distances, eligible)
    return miner.report()


@dataclass
class EpochRecord:
    """What one epoch did: losses, validation metrics, lazy combination, seconds spent."""

    epoch: int
    losses: dict[str, float]
    val_metrics: dict[str, float]
    laziness: dict | None
    train_seconds: float
    mining_seconds: float


@dataclass
class FitResult:
    """History of a ``fit`` call; the model holds the best weights afterwards."""

    history: list[EpochRecord]
    best_epoch: int
    best_val_auroc: float
    stopped_early: bool

    def to_dict(self) -> dict:
        return asdict(self)


def fit(
    model: OmniFuse,
    train_data: Dataset,
    val_data: Dataset | None,
    config: TrainConfig,
    run_dir: str | Path | None = None,
    extra_loss: ExtraLoss | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    batches: BatchSource | None = None,
    keep_best: bool = True,
) -> FitResult:
    """Train ``model`` on ``train_data``; early-stop on ``val_data`` AUROC.

    Model selection: with ``val_data`` the epoch of the best validation AUROC is restored;
    without it, the epoch of the lowest mean training loss without its TLA term
    (``_epoch_score``); ``patience`` counts epochs without a better score either way.

    Args:
        extra_loss: optional term added to every step's loss (e.g. FedProx's proximal term).
        run_dir: when given, the run's config, per-epoch metrics and the best checkpoint are
            written there (config.json, metrics.json, checkpoint/).
        optimizer: the optimizer to step (default: Adam over the model's parameters with
            ``config.lr`` and ``config.weight_decay``); DP-SGD passes Opacus' DPOptimizer.
        batches: each epoch's training batches (default: ``train_data`` shuffled).
        keep_best: restore the best epoch's weights at the end (default); False keeps the
            last epoch's, without early stopping (DP-SGD: choosing an epoch by a non-private
            score would use the training data outside the privacy accounting).
    """
    generator = seed_everything(config.seed)
    model.to(torch.device(config.device))
    if optimizer is None:
        optimizer = torch.optim.Adam(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
    history: list[EpochRecord] = []
    best = _BestEpoch(keep_best=keep_best)
    stopped_early = False
    with _progress(config.progress) as progress:
        epochs = progress.add_task("epochs", total=config.epochs, info="")
        for epoch in range(1, config.epochs + 1):
            record = _run_epoch(
                epoch, model, train_data, val_data, config, optimizer, generator, extra_loss,
                progress, batches(generator) if batches is not None else None,
            )  # fmt: skip
            history.append(record)
            score = _epoch_score(record, val_data is not None, model.config.lambda3)
            best.update(epoch, score, model)
            progress.update(epochs, advance=1, info=f"val AUROC {score:.4f}")
            if config.patience and best.since_best >= config.patience:
                stopped_early = True
                break
    best.restore(model)
    result = FitResult(
        history, best.epoch, best.score if val_data is not None else math.nan, stopped_early
    )
    if run_dir is not None:
        write_run(run_dir, model, config, result)
    return result


def _epoch_score(record: EpochRecord, validated: bool, lambda3: float) -> float:
    """The score model selection maximises: validation AUROC, or without a validation split
    minus the epoch's mean training loss less its TLA term (lambda3 * L_TLA). L_TLA is
    absent in the first epoch (nothing mined yet) and follows a lazy combination that
    changes between epochs, so totals with it would not compare across epochs (the first
    epoch would look best for lacking a term)."""
    if validated:
        return record.val_metrics.get("auroc", math.nan)
    losses = record.losses
    return -(losses.get("total", math.inf) - lambda3 * losses.get("tla", 0.0))


def _run_epoch(
    epoch: int,
    model: OmniFuse,
    train_data: Dataset,
    val_data: Dataset | None,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    extra_loss: ExtraLoss | None,
    progress: Progress,
    batches: Iterable[Batch] | None,
) -> EpochRecord:
    """One epoch: train, mine the lazy combination (TLA), validate; each part timed."""
    losses, train_seconds = _timed(
        train_epoch, model, train_data, optimizer, config, generator, extra_loss, progress, batches
    )
    laziness, mining_seconds = _timed(_mine_epoch, model, train_data, config)
    val_metrics = _validation_metrics(model, val_data, config)
    return EpochRecord(epoch, losses, val_metrics, laziness, train_seconds, mining_seconds)


def _timed(function, *args):
    """(function(*args), seconds it took)."""
    start = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - start


def _mine_epoch(model: OmniFuse, train_data: Dataset, config: TrainConfig) -> dict | None:
    """TLA's per-epoch mining (Eq. 15): set the lazy combination for the next epoch."""
    if not model.config.use_tla:
        return None
    report = mine_laziness(model, train_data, config)
    model.set_laziness(report)
    return report.to_dict()


def _validation_metrics(
    model: OmniFuse, val_data: Dataset | None, config: TrainConfig
) -> dict[str, float]:
    """Metrics alone (no bootstrap, no imputation error) on the validation split, if any."""
    if val_data is None or len(val_data) == 0:
        return {}
    return evaluate(
        model,
        val_data,
        config.model_copy(update={"bootstrap_samples": 0}),
        imputation_error=False,
    ).metrics


@dataclass
class _BestEpoch:
    """Early stopping's memory: the best epoch's score, weights and lazy combination."""

    keep_best: bool = True
    score: float = -math.inf
    epoch: int = 0
    since_best: int = 0
    state: tuple | None = None

    def update(self, epoch: int, score: float, model: OmniFuse) -> None:
        if score > self.score or self.state is None or not self.keep_best:
            self.score, self.epoch, self.since_best = score, epoch, 0
            self.state = (copy.deepcopy(model.state_dict()), model.laziness)
        else:
            self.since_best += 1

    def restore(self, model: OmniFuse) -> None:
        model.load_state_dict(self.state[0])
        model.set_laziness(self.state[1])


def write_run(
    run_dir: str | Path, model: OmniFuse, config: TrainConfig, result: FitResult, **extra: dict
) -> Path:
    """Write config.json, metrics.json and checkpoint/ into ``run_dir``."""
    directory = Path(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(
        json.dumps(
            {
                "model": model.config.model_dump(mode="json"),
                "train": config.model_dump(mode="json"),
            },
            indent=2,
        )
    )
    (directory / "metrics.json").write_text(
        json.dumps({"fit": result.to_dict(), **extra}, indent=2, default=_json_default)
    )
    model.save_checkpoint(directory / "checkpoint", extra={"best_epoch": result.best_epoch})
    return directory


def _json_default(value: object) -> object:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")

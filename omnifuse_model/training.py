"""One training/evaluation loop, used for centralised runs and by every federated site.

``fit`` trains for ``TrainConfig.epochs`` with training-time modality dropping, mines the lazy
combination after each epoch (TLA), early-stops on validation AUROC and restores the best
weights. ``evaluate`` returns metrics with bootstrap intervals plus the audit aggregates
(mean DWFuse weight and imputation error per modality). Runs are deterministic under a seed.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from omnifuse_model.batch import Batch, InMemoryMultimodalDataset, collate_samples
from omnifuse_model.config import TrainConfig
from omnifuse_model.laziness import LazinessMiner, LazinessReport, combination_masks
from omnifuse_model.metrics import classification_report
from omnifuse_model.model import OmniFuse, OmniFuseOutput

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


def iterate_batches(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
) -> Iterator[Batch]:
    """Batches of a dataset; in-memory datasets are sliced directly (no per-sample Python)."""
    if isinstance(dataset, InMemoryMultimodalDataset):
        n = len(dataset)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            # In order: slices are views (no copy of the ~100 MB of token states per batch).
            index = rows if shuffle else slice(start, start + batch_size)
            yield Batch(
                inputs={k: v[index] for k, v in dataset.inputs.items()},
                masks={k: v[index] for k, v in dataset.masks.items()},
                availability=dataset.availability[index],
                labels=dataset.labels[index],
                sample_ids=[dataset.sample_ids[i] for i in rows.tolist()],
            )
        return
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        collate_fn=collate_samples,
    )
    yield from loader


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


def full_precision(config: TrainConfig) -> contextlib.AbstractContextManager:
    """float32 for everything that produces scores (evaluation, reported embeddings): autocast
    off on the run's device, also inside a caller's autocast region. bfloat16 keeps ~3
    significant digits, so its logits tie across samples and move AUROC (by ~0.003 on
    MIMIC); mixed precision is a training-speed choice only."""
    return torch.autocast(device_type=torch.device(config.device).type, enabled=False)


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

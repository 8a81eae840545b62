"""Centralised (pooled, single-site) training runs: the `omnifuse train` job."""

from __future__ import annotations

import json
import logging
import math
import tomllib
from pathlib import Path

from pydantic import Field, ValidationError
from rich.console import Console
from rich.table import Table

from omnifuse_model.config import OmniFuseConfig, StrictModel, TrainConfig
from omnifuse_model.evaluation import EvaluationResult
from omnifuse_model.model import OmniFuse
from omnifuse_model.synthetic import (
    SyntheticFeatureConfig,
    SyntheticModality,
    make_synthetic_features,
)
from omnifuse_model.training import evaluate, fit, write_run

log = logging.getLogger(__name__)


def default_synthetic() -> SyntheticFeatureConfig:
    """Three modalities of unequal informativeness; 'rep' is the planted lazy (noisy) one."""
    return SyntheticFeatureConfig(
        modalities=[
            SyntheticModality(
                name="ehr", dim=32, signal=1.0, noise=1.0, latent_fraction=0.75, missing_rate=0.1
            ),
            SyntheticModality(
                name="cxr", dim=32, signal=0.7, noise=1.0, latent_fraction=0.75, missing_rate=0.4
            ),
            SyntheticModality(name="rep", dim=32, signal=0.2, noise=3.0, missing_rate=0.3),
        ],
        task="binary",
    )


class CentralRunConfig(StrictModel):
    """A centralised run on feature-level synthetic data: data, model and training."""

    data: SyntheticFeatureConfig = Field(default_factory=default_synthetic)
    train_size: int = Field(default=2000, gt=0)
    val_size: int = Field(default=500, gt=0)
    test_size: int = Field(default=1000, gt=0)
    model: dict = Field(default_factory=dict, description="OmniFuseConfig overrides.")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=10))

    def model_config_for_data(self) -> OmniFuseConfig:
        base = {
            "modalities": [m.model_dump() for m in self.data.modality_specs()],
            "task": self.data.task,
            "num_classes": self.data.num_classes,
            "d": 32,
        }
        return OmniFuseConfig.model_validate({**base, **self.model})


def load_run_config(path: str | Path | None) -> CentralRunConfig:
    """Read a TOML run config; errors name the file and the field."""
    if path is None:
        return CentralRunConfig()
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as error:
        raise FileNotFoundError(f"run config not found: {path}") from error
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML: {error}") from error
    try:
        config = CentralRunConfig.model_validate(raw)
        config.model_config_for_data()  # validates the [model] overrides too
        return config
    except ValidationError as error:
        raise ValueError(f"{path}: invalid run config:\n{error}") from error


def run_summary(model: OmniFuse, evaluation: EvaluationResult) -> dict:
    """What a centralised run reports: test metrics, weights, imputation error, laziness."""
    return {
        "test": evaluation.metrics,
        "mean_dwfuse_weight": evaluation.mean_dwfuse_weight,
        "imputation_error": evaluation.imputation_error,
        "lazy_combination": list(model.lazy_combination) if model.lazy_combination else None,
        "laziness_scores": model.laziness.scores if model.laziness else {},
    }


def run_central(config: CentralRunConfig, out: str | Path, console: Console | None = None) -> dict:
    """Generate data, train with early stopping, evaluate on the test split, write the run."""
    console = console or Console()
    data = config.data
    train = make_synthetic_features(data, config.train_size)
    val = make_synthetic_features(data.model_copy(update={"seed": data.seed + 1}), config.val_size)
    test = make_synthetic_features(
        data.model_copy(update={"seed": data.seed + 2}), config.test_size
    )
    model = OmniFuse(config.model_config_for_data())
    result = fit(model, train, val, config.train)
    evaluation = evaluate(model, test, config.train)
    summary = run_summary(model, evaluation)
    directory = write_run(out, model, config.train, result, test=summary)
    (directory / "run_config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2))
    _print_summary(console, result.best_epoch, summary, directory)
    return summary


def _fmt(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def _print_summary(console: Console, best_epoch: int, summary: dict, directory: Path) -> None:
    metrics = summary["test"]
    table = Table(title=f"Test split (best epoch {best_epoch})")
    for column in ("metric", "value", "95% CI"):
        table.add_column(column)
    for name in ("auroc", "auprc"):
        ci = f"[{_fmt(metrics.get(f'{name}_low'))}, {_fmt(metrics.get(f'{name}_high'))}]"
        table.add_row(name.upper(), _fmt(metrics[name]), ci)
    console.print(table)
    modalities = Table(title="Per modality")
    for column in ("modality", "mean DWFuse weight", "imputation MSE", "TLA score"):
        modalities.add_column(column)
    for name, weight in summary["mean_dwfuse_weight"].items():
        score = summary["laziness_scores"].get(name)
        modalities.add_row(
            name,
            _fmt(weight),
            _fmt(summary["imputation_error"][name]),
            _fmt(score) if score is not None else "-",
        )
    console.print(modalities)
    console.print(f"lazy combination: {summary['lazy_combination']}")
    console.print(f"run written to {directory}")

"""`omnifuse train`: centralised training, on feature-level synthetic data (the default) or
on prepared sites (`--scenario DIR` or `--site SITE.toml ...`).

On prepared sites the sites' train splits are pooled for training and their val splits for
early stopping; the EHR normaliser is the one the federation's statistics phase would compute
(``simulation.prepared_sites``). The test set is the scenario's server test site (or
``--test-site``), else the pooled sites' test splits. ``RUN_DIR/checkpoint`` carries the model
config and, in ``extra.preprocessing``, the normaliser and the backbone fingerprints, so
`omnifuse evaluate` / `predict` on a site never guess.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

from pydantic import Field, ValidationError
from rich.console import Console

from omnifuse_model.config import OmniFuseConfig, StrictModel, TrainConfig
from omnifuse_model.site_config import validation_problems
from simulation.option_types import integer, seed
from simulation.safe_paths import check_output_folder

DESCRIPTION = "centralised training run (feature-level synthetic data by default)"


class PreparedRunConfig(StrictModel):
    """`--config` of a run on prepared sites: training settings and model overrides."""

    model: dict = Field(
        default_factory=dict,
        description="OmniFuseConfig overrides (modalities and task come from the sites).",
    )
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=10))
    audit_min_count: int = Field(
        default=5, ge=1, description="Sites with fewer EHR train stays withhold statistics."
    )


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `train` on the `omnifuse` command parser."""
    train = commands.add_parser("train", help=DESCRIPTION, description=__doc__)
    train.add_argument("--config", help="TOML run config (see docs/EXPERIMENTS.md)")
    train.add_argument("--out", default="runs/train", help="run directory")
    train.add_argument("--scenario", help="folder with scenario.json: pool its sites")
    train.add_argument(
        "--site", action="append", default=[], help="a site config TOML to pool (repeatable)"
    )
    train.add_argument("--test-site", help="site config TOML of the held-out test set")
    train.add_argument("--epochs", type=integer(1, 10**5), help="override train.epochs")
    train.add_argument("--seed", type=seed(), help="override train.seed")
    train.set_defaults(handler=run)


def _overridden(train: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    updates = {k: v for k, v in (("epochs", args.epochs), ("seed", args.seed)) if v is not None}
    return TrainConfig.model_validate({**train.model_dump(), **updates})


def run(args: argparse.Namespace) -> int:
    if args.scenario and args.site:
        raise ValueError("train: give --scenario or --site, not both")
    inputs = [Path(args.scenario)] if args.scenario else []
    args.out = check_output_folder(Path(args.out), "train --out", inputs, "metrics.json")
    if not (args.scenario or args.site):
        if args.test_site:
            raise ValueError("train: --test-site needs --scenario or --site")
        from simulation.central import load_run_config, run_central

        config = load_run_config(args.config)
        config.train = _overridden(config.train, args)
        run_central(config, args.out)
        return 0
    from simulation import prepared_sites

    if args.scenario:
        prepared = prepared_sites.from_scenario(args.scenario)
        if args.test_site:
            prepared.test_site = prepared_sites.load_site_config(args.test_site)
    else:
        prepared = prepared_sites.from_site_files(args.site, args.test_site)
    config = load_prepared_config(args.config)
    config.train = _overridden(config.train, args)
    run_prepared(prepared, config, Path(args.out))
    return 0


def load_prepared_config(path: str | None) -> PreparedRunConfig:
    """Read `--config` for a run on prepared sites; errors name the file and the field."""
    if path is None:
        return PreparedRunConfig()
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"run config not found: {file}")
    try:
        return PreparedRunConfig.model_validate(tomllib.loads(file.read_text(encoding="utf-8")))
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{file}: not valid TOML: {error}") from error
    except ValidationError as error:
        raise ValueError(f"{file}: invalid run config: {validation_problems(error)}") from error


def _model_config(base: OmniFuseConfig, overrides: dict) -> OmniFuseConfig:
    fixed = sorted({"modalities", "task", "num_classes"} & set(overrides))
    if fixed:
        raise ValueError(f"model: {fixed} come from the sites and cannot be overridden")
    return OmniFuseConfig.model_validate({**base.model_dump(), **overrides})


def run_prepared(prepared, config: PreparedRunConfig, out: Path, console=None) -> dict:
    """Pool the sites, train with early stopping, test, write ``out`` (see module docstring)."""
    from omnifuse_model.model import OmniFuse
    from omnifuse_model.training import evaluate, fit, write_run
    from simulation import prepared_sites
    from simulation.central import _print_summary, run_summary

    console = console or Console()
    prepared.model = _model_config(prepared.model, config.model)
    decided = prepared_sites.federated_preprocessing(
        prepared.sites, prepared.model, config.audit_min_count
    )
    datasets = prepared_sites.site_datasets(prepared, decided)
    train = prepared_sites.pool([d.train for d in datasets.values()])
    val = prepared_sites.pool([d.val for d in datasets.values()])
    test = prepared_sites.test_dataset(prepared, decided)
    model = OmniFuse(prepared.model)
    result = fit(model, train, val, config.train)
    evaluation = evaluate(model, test, config.train)
    summary = {
        **run_summary(model, evaluation),
        "sites": sorted(datasets),
        "sizes": {"train": len(train), "val": len(val), "test": len(test)},
    }
    directory = write_run(out, model, config.train, result, test=summary)
    extra = {"best_epoch": result.best_epoch, "preprocessing": decided.to_json()}
    model.save_checkpoint(directory / "checkpoint", extra=extra)
    run_config = {**config.model_dump(mode="json"), "source": prepared.source}
    (directory / "run_config.json").write_text(json.dumps(run_config, indent=2))
    _print_summary(console, result.best_epoch, summary, directory)
    return summary

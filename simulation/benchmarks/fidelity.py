"""Fidelity benchmark: do the paper's qualitative claims hold on planted synthetic data?

Run ``python -m simulation.benchmarks.fidelity [--quick] [--seeds 3] [--out DIR]``; it prints
tables and writes ``DIR/fidelity.json`` (default ``benchmark_results/``) with every per-seed
result and the exact data, model and training configs used.

Scenario (``fidelity_data.default_scenario``): feature-level synthetic data with three
modalities of unequal informativeness, ehr (strong), cxr (medium) and rep (the planted lazy
modality: weak signal, strong noise), and random missingness. A seed changes the data draw,
the missingness draw, model initialisation and training order; the planted structure (label
weights, modality views) is the generator's and the same for every seed.

Experiments, each reported as mean and std over seeds of test AUROC and AUPRC:

(a) ``ablation``: the paper's Table 4 rows over the modality subsets. A subset's data holds
    only its modalities (M = 2 or 3). Rows, as this project defines them:
      (a) concat fusion, no TLA, no imputation;   (b) DWFuse only;   (c) DWFuse + TLA;
      (d) DWFuse + TLA + forward imputation;
      (e) DWFuse + forward + backward imputation, no TLA;   (f) everything.
    The paper's PDF extraction lost which column row (e) leaves out (three ticks survive).
    We read it as "no TLA": forward imputation without backward is row (d), backward needs
    forward (Eq. 6), and without DWFuse it would not build on rows (b)-(d); so (e) is the
    imputation pair on top of DWFuse, and (d) vs (e) contrasts TLA with backward imputation.
(b) ``missing_rate``: test AUROC against one missing rate applied to every modality (train,
    val and test alike; a sample keeps at least one modality), for full OmniFuse (row f) and
    the same model without forward and backward imputation (which is row c).
(c) ``fusion``: concat / sum / se_gate / lstm (MedFuse-style) heads (no TLA, no imputation),
    DWFuse only (row b) and full OmniFuse (row f) on all modalities, plus the best single
    modality. A single modality is a *model trained on that modality alone*: the model needs
    M >= 2, so its partner is a width-1 modality that is never available (only its constant
    placeholder reaches the concat head). It is scored on the whole test set (a sample
    without the modality gets the constant prediction, as a deployed uni-modal model would)
    and on the test samples holding it. We chose this over testing the concat model with one
    modality because the paper's claim compares against uni-modal *models*.

Runs are deterministic, so a setting shared by two experiments (e.g. row (f) on all
modalities and the 'omnifuse' method) is trained once and reused.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import Field, field_validator, model_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from omnifuse_model.config import (
    ABLATION_ROWS,
    ModalitySpec,
    OmniFuseConfig,
    StrictModel,
    TrainConfig,
    ablation_row,
)
from omnifuse_model.model import OmniFuse
from omnifuse_model.synthetic import SyntheticFeatureConfig
from omnifuse_model.training import evaluate, fit
from simulation.benchmarks.fidelity_data import (
    SPLITS,
    default_scenario,
    draw_complete,
    missing_rates_of,
    restrict,
    with_absent_partner,
)
from simulation.benchmarks.fidelity_report import claims, print_tables, summarize

FUSION_METHODS: dict[str, dict] = {
    "concat": ABLATION_ROWS["a"],
    "sum": ablation_row("sum"),
    "se_gate": ablation_row("se_gate"),
    "lstm": ablation_row("lstm"),
    "dwfuse": ABLATION_ROWS["b"],
    "omnifuse": ABLATION_ROWS["f"],
}
IMPUTATION_VARIANTS: dict[str, dict] = {"with": ABLATION_ROWS["f"], "without": ABLATION_ROWS["c"]}
ABSENT_PARTNER = "absent"


class FidelityConfig(StrictModel):
    """Everything a benchmark run depends on; written verbatim into the JSON."""

    seeds: list[int] = Field(default=[0, 1, 2], min_length=1)
    scenario: SyntheticFeatureConfig = Field(default_factory=default_scenario)
    sizes: dict[str, int] = Field(default={"train": 2000, "val": 500, "test": 1000})
    model: dict = Field(
        default={"d": 32, "num_blocks": 3, "cra_hidden": (64, 32)},
        description="OmniFuseConfig overrides shared by every run (paper: K=5, (256,128,64)).",
    )
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            epochs=15, patience=3, bootstrap_samples=0, progress=False
        )
    )
    subsets: list[list[str]] = Field(
        default=[["cxr", "rep"], ["ehr", "cxr"], ["ehr", "rep"], ["ehr", "cxr", "rep"]]
    )
    ablation_rows: list[str] = Field(default=list(ABLATION_ROWS))
    missing_rates: list[float] = Field(default=[round(0.1 * i, 1) for i in range(10)])
    fusions: list[str] = Field(default=list(FUSION_METHODS))
    single_modalities: list[str] = Field(default=["ehr", "cxr", "rep"])
    model_selection: bool = Field(
        default=True,
        description=(
            "Early-stop on and restore the best epoch of the validation split; False: no "
            "validation, fit keeps the epoch of lowest training loss (overfitting studies)."
        ),
    )

    @field_validator("ablation_rows")
    @classmethod
    def _known_rows(cls, rows: list[str]) -> list[str]:
        unknown = sorted(set(rows) - set(ABLATION_ROWS))
        if unknown:
            raise ValueError(f"unknown ablation rows {unknown}, expected {list(ABLATION_ROWS)}")
        return rows

    @field_validator("fusions")
    @classmethod
    def _known_fusions(cls, fusions: list[str]) -> list[str]:
        unknown = sorted(set(fusions) - set(FUSION_METHODS))
        if unknown:
            raise ValueError(f"unknown fusions {unknown}, expected {list(FUSION_METHODS)}")
        return fusions

    @model_validator(mode="after")
    def _known_modalities(self) -> FidelityConfig:
        names = set(self.modality_names)
        if ABSENT_PARTNER in names:
            raise ValueError(f"scenario: '{ABSENT_PARTNER}' is reserved for uni-modal models")
        for field, subset in [("subsets", s) for s in self.subsets] + [
            ("single_modalities", self.single_modalities)
        ]:
            unknown = sorted(set(subset) - names)
            if unknown:
                raise ValueError(
                    f"{field}: unknown modalities {unknown}, scenario has {sorted(names)}"
                )
        short = [subset for subset in self.subsets if len(set(subset)) < 2]
        if short:
            raise ValueError(f"subsets: the model needs M >= 2 modalities, got {short}")
        if set(self.sizes) != set(SPLITS):
            raise ValueError(f"sizes: expected keys {list(SPLITS)}, got {sorted(self.sizes)}")
        return self

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.scenario.modalities]

    def omnifuse_config(self, names: list[str], overrides: dict) -> OmniFuseConfig:
        """The OmniFuse config for a dataset holding ``names`` (``absent``: width-1 partner)."""
        dims = {m.name: m.dim for m in self.scenario.modalities} | {ABSENT_PARTNER: 1}
        specs = [ModalitySpec(name=n, kind="vector", input_dim=dims[n]) for n in names]
        values = {"modalities": specs, "task": self.scenario.task}
        values |= {"num_classes": self.scenario.num_classes, **self.model, **overrides}
        return OmniFuseConfig.model_validate(values)


def quick_config(seeds: int = 1) -> FidelityConfig:
    """A < 2 minute smoke run: fewer subsets, rows, rates and methods."""
    return FidelityConfig(
        seeds=list(range(seeds)),
        subsets=[["cxr", "rep"], ["ehr", "cxr", "rep"]],
        ablation_rows=["a", "b", "c", "f"],
        missing_rates=[0.0, 0.5, 0.9],
        fusions=["concat", "sum", "dwfuse", "omnifuse"],
    )


Advance = Callable[[str], None]


class Runner:
    """Trains and tests one setting per call; caches results of identical settings."""

    def __init__(self, config: FidelityConfig, advance: Advance | None = None) -> None:
        self.config = config
        self.advance = advance or (lambda _label: None)
        self.cache: dict[str, dict] = {}

    def run(
        self,
        label: str,
        data: dict,
        names: list[str],
        overrides: dict,
        seed: int,
        key: str,
        uni_modal: bool = False,
    ) -> dict:
        """Fit on data['train'] (early stopping on 'val'), score data['test'].

        ``key`` identifies the data (seed, subset, rates). ``uni_modal``: the data is a
        ``with_absent_partner`` layout; the test set is also scored on the samples that hold
        the modality (column 0).
        """
        model_config = self.config.omnifuse_config(names, overrides)
        cache_key = json.dumps([key, model_config.model_dump(mode="json"), uni_modal])
        if cache_key not in self.cache:
            self.cache[cache_key] = self._train_and_test(data, model_config, seed, uni_modal)
        self.advance(label)
        return self.cache[cache_key]

    def _train_and_test(
        self, data: dict, model_config: OmniFuseConfig, seed: int, uni_modal: bool
    ) -> dict:
        train = self.config.train.model_copy(
            update={"seed": seed, "bootstrap_samples": 0, "progress": False}
        )
        torch.manual_seed(seed)
        model = OmniFuse(model_config)
        start = time.perf_counter()
        val = data["val"] if self.config.model_selection else None
        fitted = fit(model, data["train"], val, train)
        test = evaluate(model, data["test"], train).metrics
        result = {
            "seed": seed,
            "auroc": test["auroc"],
            "auprc": test["auprc"],
            "best_epoch": fitted.best_epoch,
            "epochs_run": len(fitted.history),
            "seconds": round(time.perf_counter() - start, 3),
            "lazy_combination": list(model.lazy_combination) if model.lazy_combination else None,
            "model_config": model_config.model_dump(mode="json"),
        }
        if uni_modal:
            index = data["test"].availability[:, 0].nonzero().squeeze(1)
            held = evaluate(model, data["test"].subset(index), train).metrics
            result |= {"auroc_holding": held["auroc"], "auprc_holding": held["auprc"]}
        return result


def ablation_experiment(config: FidelityConfig, runner: Runner) -> list[dict]:
    """(a) Table 4 rows x modality subsets; one cell per (row, subset)."""
    runs: dict[tuple[str, str], list[dict]] = {}
    rates = missing_rates_of(config.scenario)
    for seed in config.seeds:
        complete = draw_complete(config.scenario, config.sizes, seed)
        for names in config.subsets:
            subset = "+".join(names)
            data = {
                s: restrict(c, names, config.modality_names, rates) for s, c in complete.items()
            }
            for row in config.ablation_rows:
                key = f"{seed}|{subset}|scenario"
                result = runner.run(f"({row}) {subset}", data, names, ABLATION_ROWS[row], seed, key)
                runs.setdefault((row, subset), []).append(result)
    return [summarize({"row": row, "subset": subset}, r) for (row, subset), r in runs.items()]


def missing_rate_experiment(
    config: FidelityConfig, runner: Runner, variants: dict[str, dict] | None = None
) -> list[dict]:
    """(b) test AUROC against a missing rate applied to every modality, +/- imputation.

    ``variants``: label -> model overrides (default ``IMPUTATION_VARIANTS``).
    """
    runs: dict[tuple[float, str], list[dict]] = {}
    names = config.modality_names
    for seed in config.seeds:
        complete = draw_complete(config.scenario, config.sizes, seed)
        for rate in config.missing_rates:
            rates = dict.fromkeys(names, rate)
            data = {s: restrict(c, names, names, rates) for s, c in complete.items()}
            for variant, overrides in (variants or IMPUTATION_VARIANTS).items():
                key = f"{seed}|{'+'.join(names)}|rate={rate}"
                result = runner.run(f"rate {rate:.1f} {variant}", data, names, overrides, seed, key)
                runs.setdefault((rate, variant), []).append(result)
    return [summarize({"rate": rate, "imputation": v}, r) for (rate, v), r in runs.items()]


def fusion_experiment(config: FidelityConfig, runner: Runner) -> list[dict]:
    """(c) fusion heads on all modalities, and each modality alone (uni-modal model)."""
    runs: dict[str, list[dict]] = {}
    names = config.modality_names
    rates = missing_rates_of(config.scenario)
    for seed in config.seeds:
        complete = draw_complete(config.scenario, config.sizes, seed)
        data = {s: restrict(c, names, names, rates) for s, c in complete.items()}
        key = f"{seed}|{'+'.join(names)}|scenario"
        for method in config.fusions:
            result = runner.run(method, data, names, FUSION_METHODS[method], seed, key)
            runs.setdefault(method, []).append(result)
        for name in config.single_modalities:
            alone = {s: with_absent_partner(d, name, ABSENT_PARTNER) for s, d in data.items()}
            pair = [name, ABSENT_PARTNER]
            result = runner.run(f"only {name}", alone, pair, ABLATION_ROWS["a"], seed, key, True)
            runs.setdefault(f"only:{name}", []).append(result)
    return [summarize({"method": method}, r) for method, r in runs.items()]


EXPERIMENTS = {
    "ablation": ablation_experiment,
    "missing_rate": missing_rate_experiment,
    "fusion": fusion_experiment,
}


def planned_runs(config: FidelityConfig, experiments: list[str]) -> int:
    """Run count for the progress bar (a cache hit still advances it)."""
    per_seed = {
        "ablation": len(config.subsets) * len(config.ablation_rows),
        "missing_rate": len(config.missing_rates) * len(IMPUTATION_VARIANTS),
        "fusion": len(config.fusions) + len(config.single_modalities),
    }
    return sum(per_seed[name] for name in experiments) * len(config.seeds)


def run_fidelity(
    config: FidelityConfig, experiments: list[str] | None = None, console: Console | None = None
) -> dict:
    """Run the chosen experiments (default: all) and return the JSON-ready result."""
    console = console or Console()
    chosen = experiments or list(EXPERIMENTS)
    torch.set_num_threads(1)
    start = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("fidelity", total=planned_runs(config, chosen))

        def advance(label: str) -> None:
            progress.update(task, advance=1, description=f"fidelity: {label}")

        runner = Runner(config, advance)
        results = {name: {"cells": EXPERIMENTS[name](config, runner)} for name in chosen}
    return {
        "benchmark": "fidelity",
        "runtime_seconds": round(time.perf_counter() - start, 1),
        "trained_models": len(runner.cache),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
        },
        "config": config.model_dump(mode="json"),
        "experiments": results,
        "claims": claims(results),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer settings (< 2 min)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    parser.add_argument("--out", default="benchmark_results", help="output directory")
    parser.add_argument(
        "--experiments", nargs="+", choices=list(EXPERIMENTS), help="subset of experiments"
    )
    args = parser.parse_args(argv)
    if args.quick:
        config = quick_config(args.seeds or 1)
    else:
        config = FidelityConfig(seeds=list(range(args.seeds or 3)))
    console = Console() if sys.stdout.isatty() else Console(width=160)  # logs: no wrapping
    result = run_fidelity(config, args.experiments, console)
    print_tables(result, console)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fidelity.json"
    path.write_text(json.dumps(result, indent=2))
    console.print(f"{result['runtime_seconds']} s; results written to {path}")
    return result


if __name__ == "__main__":
    main()

"""Why the fidelity benchmark's paper claims do or do not reproduce: sensitivity sweeps.

Run ``python -m simulation.benchmarks.fidelity_sensitivity [--seeds 3] [--out DIR]``; writes
``DIR/fidelity_sensitivity.json``. Not part of the 20-minute fidelity budget (about 15 min).

1. ``fusion``: concat (a), DWFuse (b), full OmniFuse (f) and the uni-modal ehr model on all
   modalities while varying one thing at a time from the default scenario: the lazy
   modality's noise and width, a weaker cxr, a wide rep that is weak per feature but
   informative in aggregate (a modality a model could under-use), the training size, and 40
   epochs without early stopping or best-epoch restore (overfitting regime).
2. ``missing_rate``: the no-imputation model also trained *without* training-time modality
   dropping (drop_rate = 0), next to the benchmark's two variants (both drop_rate = 0.5), and
   a linear oracle: a logistic regression per availability pattern fit on 20,000 complete
   samples and scored on the benchmark's test sets. It is close to the best any model can
   reach at a missing rate (the generator is linear-Gaussian), and imputation cannot add
   information that the present modalities lack.
3. ``test_only_missing_rate``: the three variants of 2 trained on *complete* data (train and
   val at rate 0) and tested at each rate: the reading of the paper's Fig. 6 in which only
   the test data lose modalities; once as generated (features of mean 0, so the zero input
   of an absent modality is the mean) and once with every present feature shifted by +3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from omnifuse_model.config import ABLATION_ROWS
from omnifuse_model.model import OmniFuse
from omnifuse_model.training import evaluate, fit
from simulation.benchmarks.fidelity import (
    IMPUTATION_VARIANTS,
    FidelityConfig,
    Runner,
    fusion_experiment,
    missing_rate_experiment,
)
from simulation.benchmarks.fidelity_data import draw_complete, restrict
from simulation.benchmarks.fidelity_report import paired_difference

Variation = Callable[[FidelityConfig], FidelityConfig]


def _modality(config: FidelityConfig, name: str, **update) -> FidelityConfig:
    modalities = [
        m.model_copy(update=update) if m.name == name else m for m in config.scenario.modalities
    ]
    return config.model_copy(
        update={"scenario": config.scenario.model_copy(update={"modalities": modalities})}
    )


def _sizes(config: FidelityConfig, train: int) -> FidelityConfig:
    return config.model_copy(update={"sizes": {**config.sizes, "train": train}})


VARIATIONS: dict[str, Variation] = {
    "default": lambda c: c,
    "rep noise 1": lambda c: _modality(c, "rep", noise=1.0),
    "rep noise 10": lambda c: _modality(c, "rep", noise=10.0),
    "rep dim 512": lambda c: _modality(c, "rep", dim=512),
    "rep dim 512, cxr signal 0.3": lambda c: _modality(
        _modality(c, "rep", dim=512), "cxr", signal=0.3
    ),
    "cxr signal 0.3": lambda c: _modality(c, "cxr", signal=0.3),
    "rep dim 512, signal 1 (informative)": lambda c: _modality(c, "rep", dim=512, signal=1.0),
    "train 500": lambda c: _sizes(c, 500),
    "train 8000": lambda c: _sizes(c, 8000),
    "40 epochs, no model selection": lambda c: c.model_copy(
        update={
            "train": c.train.model_copy(update={"epochs": 40, "patience": 0}),
            "model_selection": False,
        }
    ),
}
FUSION_COMPARISONS = (("omnifuse", "dwfuse"), ("dwfuse", "concat"), ("concat", "only:ehr"))


def fusion_sweep(base: FidelityConfig) -> dict:
    """Each variation of the default scenario through the fusion experiment."""
    out = {}
    for name, vary in VARIATIONS.items():
        config = vary(base).model_copy(
            update={"fusions": ["concat", "dwfuse", "omnifuse"], "single_modalities": ["ehr"]}
        )
        cells = {c["labels"]["method"]: c for c in fusion_experiment(config, Runner(config))}
        out[name] = {
            "auroc": {method: cell["auroc"] for method, cell in cells.items()},
            "paired": {
                f"{a} - {b}": paired_difference(cells[a], cells[b]) for a, b in FUSION_COMPARISONS
            },
            "scenario": config.scenario.model_dump(mode="json"),
            "sizes": config.sizes,
            "train": config.train.model_dump(mode="json"),
        }
    return out


def linear_oracle(config: FidelityConfig, rate: float, train_size: int = 20_000) -> list[float]:
    """Per-seed test AUROC of one logistic regression per availability pattern."""
    names = config.modality_names
    values = []
    for seed in config.seeds:
        splits = draw_complete(config.scenario, {**config.sizes, "train": train_size}, seed)
        train = splits["train"].data
        test = restrict(splits["test"], names, names, dict.fromkeys(names, rate))
        scores = np.zeros(len(test))
        for pattern in torch.unique(test.availability, dim=0):
            chosen = [n for n, keep in zip(names, pattern.tolist(), strict=True) if keep]
            rows = (test.availability == pattern).all(dim=1).numpy()
            features = np.concatenate([train.inputs[n].numpy() for n in chosen], axis=1)
            model = LogisticRegression(max_iter=2000).fit(features, train.labels[:, 0].numpy())
            held = np.concatenate([test.inputs[n].numpy()[rows] for n in chosen], axis=1)
            scores[rows] = model.predict_proba(held)[:, 1]
        values.append(float(roc_auc_score(test.labels[:, 0].numpy(), scores)))
    return values


def missing_rate_sweep(base: FidelityConfig, rates: list[float]) -> dict:
    """With / without imputation (drop_rate 0.5), without imputation and without dropping,
    and the linear oracle, at each rate."""
    config = base.model_copy(update={"missing_rates": rates})
    cells = missing_rate_experiment(config, Runner(config))
    no_drop = config.model_copy(update={"train": config.train.model_copy(update={"drop_rate": 0})})
    variants = {"without, no dropping": IMPUTATION_VARIANTS["without"]}
    cells += missing_rate_experiment(no_drop, Runner(no_drop), variants)
    out = {}
    for rate in rates:
        at_rate = {c["labels"]["imputation"]: c for c in cells if c["labels"]["rate"] == rate}
        oracle = linear_oracle(config, rate)
        out[str(rate)] = {
            **{variant: cell["auroc"] for variant, cell in at_rate.items()},
            "linear oracle": _stats_of(oracle),
            "with - without": paired_difference(at_rate["with"], at_rate["without"]),
            "without - without, no dropping": paired_difference(
                at_rate["without"], at_rate["without, no dropping"]
            ),
        }
    return out


TEST_ONLY_VARIANTS = {  # label -> (model overrides, training-time drop_rate)
    "with": (IMPUTATION_VARIANTS["with"], 0.5),
    "without": (IMPUTATION_VARIANTS["without"], 0.5),
    "without, no dropping": (IMPUTATION_VARIANTS["without"], 0.0),
}


def test_only_sweep(base: FidelityConfig, rates: list[float], offset: float = 0.0) -> dict:
    """Train on complete data once per (variant, seed); test at every missing rate.

    ``offset`` is added to every present feature: the generator's features have mean 0, so
    the all-zero input of an absent modality is the population mean (mean imputation for
    free); with an offset it is off-distribution, as zeros are for real backbone features.
    """
    names = base.modality_names
    aurocs: dict[tuple[str, float], list[float]] = {}
    for seed in base.seeds:
        complete = draw_complete(base.scenario, base.sizes, seed)
        for split in complete.values():
            split.data.inputs = {k: v + offset for k, v in split.data.inputs.items()}
        full = {
            s: restrict(c, names, names, dict.fromkeys(names, 0.0)) for s, c in complete.items()
        }
        tests = {
            r: restrict(complete["test"], names, names, dict.fromkeys(names, r)) for r in rates
        }
        for variant, (overrides, drop_rate) in TEST_ONLY_VARIANTS.items():
            train = base.train.model_copy(update={"seed": seed, "drop_rate": drop_rate})
            torch.manual_seed(seed)
            model = OmniFuse(base.omnifuse_config(names, overrides))
            fit(model, full["train"], full["val"], train)
            for rate, test in tests.items():
                auroc = evaluate(model, test, train).metrics["auroc"]
                aurocs.setdefault((variant, rate), []).append(auroc)
    return {
        str(rate): {variant: _stats_of(aurocs[(variant, rate)]) for variant in TEST_ONLY_VARIANTS}
        for rate in rates
    }


def _stats_of(values: list[float]) -> dict:
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "per_seed": values}


def _fmt(stats: dict) -> str:
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def print_sensitivity(result: dict, console: Console) -> None:
    table = Table(title="Fusion sensitivity: AUROC and paired differences")
    methods = ("concat", "dwfuse", "omnifuse", "only:ehr")
    for column in ("variation", *methods, *(f"{a} - {b}" for a, b in FUSION_COMPARISONS)):
        table.add_column(column, justify="left" if column == "variation" else "right")
    for name, row in result["fusion"].items():
        cells = [_fmt(row["auroc"][m]) for m in methods]
        table.add_row(name, *cells, *(_fmt(v) for v in row["paired"].values()))
    console.print(table)
    table = Table(title="Missing-rate sensitivity: AUROC")
    columns = ("with", "without", "without, no dropping", "linear oracle", "with - without")
    for column in ("rate", *columns):
        table.add_column(column, justify="right")
    for rate, row in result["missing_rate"].items():
        table.add_row(rate, *(_fmt(row[c]) for c in columns))
    console.print(table)
    for offset, rows in result["test_only_missing_rate"].items():
        table = Table(title=f"Trained complete, tested with missing modalities ({offset}): AUROC")
        for column in ("rate", *TEST_ONLY_VARIANTS):
            table.add_column(column, justify="right")
        for rate, row in rows.items():
            table.add_row(rate, *(_fmt(row[c]) for c in TEST_ONLY_VARIANTS))
        console.print(table)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="benchmark_results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = FidelityConfig(seeds=list(range(args.seeds)))
    console = Console() if sys.stdout.isatty() else Console(width=160)  # logs: no wrapping
    start = time.perf_counter()
    with console.status("fusion sweep"):
        fusion = fusion_sweep(base)
    with console.status("missing-rate sweep"):
        missing = missing_rate_sweep(base, [0.0, 0.5, 0.9])
    with console.status("test-only missing-rate sweep"):
        test_only = {
            f"feature offset {offset:g}": test_only_sweep(base, [0.0, 0.3, 0.5, 0.7, 0.9], offset)
            for offset in (0.0, 3.0)
        }
    result = {
        "benchmark": "fidelity_sensitivity",
        "runtime_seconds": round(time.perf_counter() - start, 1),
        "base_config": base.model_dump(mode="json"),
        "rows_used": {k: ABLATION_ROWS[k] for k in "abcf"},
        "fusion": fusion,
        "missing_rate": missing,
        "test_only_missing_rate": test_only,
    }
    print_sensitivity(result, console)
    path = Path(args.out) / "fidelity_sensitivity.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    console.print(f"{result['runtime_seconds']} s; written to {path}")
    return result


if __name__ == "__main__":
    main()

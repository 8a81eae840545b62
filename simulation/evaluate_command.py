"""`omnifuse evaluate CHECKPOINT SITE.toml --out DIR`: a trained model on one site's test split.

Writes ``DIR/metrics.json`` and ``DIR/reliability.png``:

* AUROC and AUPRC (multi-label: macro, and every label) with percentile bootstrap 95%
  intervals over resampled test stays (``--bootstrap`` resamples, ``--seed``);
* calibration: the expected calibration error over ``--bins`` equal-width probability bins
  and each bin's count, mean predicted probability and observed frequency (the reliability
  plot);
* a breakdown per modality combination present at test time, with n per combination; metrics
  of a combination with fewer than ``--min-combination`` stays are left out (``suppressed``);
* the checkpoint's path, kind, round and the SHA-256 of its weights, and the site config.

CHECKPOINT: see ``simulation.site_checkpoint`` (a centralised run's checkpoint, a federated
round checkpoint; ``RUN_DIR/checkpoints/latest`` resolves).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

DESCRIPTION = "evaluate a checkpoint on a site's test split (metrics.json + reliability plot)"
METRICS_FILE = "metrics.json"
RELIABILITY_PLOT = "reliability.png"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `evaluate` on the `omnifuse` command parser."""
    evaluate = commands.add_parser("evaluate", help=DESCRIPTION, description=__doc__)
    evaluate.add_argument("checkpoint", help="checkpoint folder, run folder or checkpoints/latest")
    evaluate.add_argument("site", help="the site config TOML whose test split is scored")
    evaluate.add_argument("--out", required=True, help="folder for metrics.json and plots")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    evaluate.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    evaluate.add_argument("--bins", type=int, default=10, help="calibration bins")
    evaluate.add_argument(
        "--min-combination",
        type=int,
        default=30,
        help="combinations with fewer test stays get n only, no metrics",
    )
    evaluate.set_defaults(handler=run)


def _check_options(args: argparse.Namespace) -> None:
    for name in ("bootstrap", "bins", "min_combination"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, got {value}")


def run(args: argparse.Namespace) -> int:
    from omnifuse_model.site_config import load_site_config
    from simulation.predict_command import predict_dataset
    from simulation.site_checkpoint import load_checkpoint, site_test_data

    _check_options(args)
    loaded = load_checkpoint(args.checkpoint)
    site = load_site_config(args.site)
    data = site_test_data(loaded, site)
    probabilities = predict_dataset(loaded.model, data)
    report = evaluation_report(
        data.labels.numpy(),
        probabilities,
        data.availability.numpy(),
        loaded.model.config,
        args,
    )
    report = {
        "checkpoint": loaded.describe(),
        "site_config": {"path": str(Path(args.site).resolve()), **site.model_dump(mode="json")},
        **report,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_reliability_plot(report["calibration"]["bins"], out / RELIABILITY_PLOT, site.name)
    (out / METRICS_FILE).write_text(json.dumps(report, indent=2))
    _print(Console(), report, out)
    return 0


def _clean(value):
    """NaN -> None, recursively (metrics.json is strict JSON)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _ranking(labels, probabilities, task: str, samples: int, seed: int) -> dict:
    from omnifuse_model.metrics import classification_report

    report = classification_report(labels, probabilities, task, samples, seed)
    return {k: v for k, v in report.items() if k != "n"}


def evaluation_report(labels, probabilities, availability, model_config, args) -> dict:
    """Metrics, calibration and the per-combination breakdown (see module docstring)."""
    from omnifuse_model.metrics import (
        expected_calibration_error,
        per_label_report,
        reliability_bins,
    )

    task = model_config.task
    report = {
        "n": len(labels),
        "task": task,
        "bootstrap": {"resamples": args.bootstrap, "seed": args.seed, "level": 0.95},
        **_ranking(labels, probabilities, task, args.bootstrap, args.seed),
        "calibration": {
            "bins_count": args.bins,
            "binning": "equal-width over [0, 1]"
            + ("; labels pooled" if task == "multilabel" else ""),
            "ece": expected_calibration_error(labels, probabilities, task, args.bins),
            "bins": reliability_bins(labels, probabilities, task, args.bins),
        },
        "by_combination": by_combination(
            labels, probabilities, availability, model_config, args.min_combination
        ),
    }
    if task == "multilabel":
        report["per_label"] = per_label_report(labels, probabilities)
    return _clean(report)


def by_combination(labels, probabilities, availability, model_config, min_n: int) -> list[dict]:
    """One row per modality combination present at test time (most frequent first)."""
    import numpy as np

    names = model_config.modality_names
    keys = ["+".join(n for n, held in zip(names, row, strict=True) if held) for row in availability]
    rows = []
    for key in sorted(set(keys), key=lambda k: (-keys.count(k), k)):
        index = np.array([k == key for k in keys])
        row = {"combination": key, "n": int(index.sum()), "suppressed": bool(index.sum() < min_n)}
        if not row["suppressed"]:
            row |= _ranking(labels[index], probabilities[index], model_config.task, 0, 0)
        rows.append(row)
    return rows


def write_reliability_plot(bins: list[dict], path: Path, title: str) -> None:
    """Observed frequency against mean predicted probability per bin, with the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    used = [b for b in bins if b["count"]]
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    axis.plot(
        [b["confidence"] for b in used], [b["frequency"] for b in used], marker="o", label="model"
    )
    for b in used:
        axis.annotate(str(b["count"]), (b["confidence"], b["frequency"]), fontsize=7)
    axis.set(xlabel="mean predicted probability", ylabel="observed frequency", xlim=(0, 1))
    axis.set(ylim=(0, 1), title=f"Reliability: {title}")
    axis.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print(console: Console, report: dict, out: Path) -> None:
    table = Table(title=f"Test split: {report['n']} stays")
    for column in ("metric", "value", "95% CI"):
        table.add_column(column)
    for name in ("auroc", "auprc"):
        interval = f"[{_fmt(report.get(f'{name}_low'))}, {_fmt(report.get(f'{name}_high'))}]"
        table.add_row(name.upper(), _fmt(report.get(name)), interval)
    table.add_row(
        f"ECE ({report['calibration']['bins_count']} bins)", _fmt(report["calibration"]["ece"]), ""
    )
    console.print(table)
    combos = Table(title="Per modality combination")
    for column in ("combination", "n", "AUROC", "AUPRC"):
        combos.add_column(column)
    for row in report["by_combination"]:
        if row["suppressed"]:
            combos.add_row(row["combination"], str(row["n"]), "(too few)", "(too few)")
        else:
            combos.add_row(
                row["combination"], str(row["n"]), _fmt(row["auroc"]), _fmt(row["auprc"])
            )
    console.print(combos)
    console.print(f"metrics written to {out / METRICS_FILE}")

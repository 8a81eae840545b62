"""An experiment's summary (means, bootstrap CIs over seeds, paired differences against the
reference method) and its markdown report with plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from omnifuse_model.metrics import mean_interval
from simulation.experiment_config import ExperimentConfig

REPORT_FILE = "report.md"


def summarize(config: ExperimentConfig, results: list[dict]) -> list[dict]:
    """One row per (scenario variant, method): per metric the seeds' values, mean, std, a
    bootstrap CI of the mean over seeds, and the paired difference to the reference method
    (same variant and seed) with its bootstrap CI over seeds."""
    by_key: dict[tuple[str, str], dict[int, dict]] = {}
    variants: dict[str, dict] = {}
    for item in results:
        cell = item["cell"]
        variants[cell["variant_key"]] = cell["variant"]
        by_key.setdefault((cell["variant_key"], cell["method"]), {})[cell["seed"]] = item["result"]
    rows = []
    for (variant_key, method), per_seed in by_key.items():
        reference = by_key.get((variant_key, config.reference), {})
        row = {
            "variant": variant_key,
            **variants[variant_key],
            "method": method,
            "seeds": sorted(per_seed),
        }
        for metric in config.metrics:
            row[metric] = _metric_summary(config, metric, per_seed, reference, method)
        rows.append(row)
    return rows


def _metric_summary(config, metric: str, per_seed: dict, reference: dict, method: str) -> dict:
    seeds = sorted(per_seed)
    values = np.array([_value(per_seed[s], metric) for s in seeds])
    low, high = mean_interval(values, config.bootstrap_resamples, seed=0)
    summary = {
        "values": values.tolist(),
        "mean": float(np.nanmean(values)) if not np.isnan(values).all() else math.nan,
        "std": float(np.nanstd(values, ddof=1)) if len(values) > 1 else math.nan,
        "ci_low": low,
        "ci_high": high,
    }
    paired = [s for s in seeds if s in reference]
    if method != config.reference and paired:
        diffs = np.array(
            [_value(per_seed[s], metric) - _value(reference[s], metric) for s in paired]
        )
        d_low, d_high = mean_interval(diffs, config.bootstrap_resamples, seed=1)
        summary["diff_vs_reference"] = {
            "reference": config.reference,
            "seeds": paired,
            "values": diffs.tolist(),
            "mean": float(np.nanmean(diffs)),
            "ci_low": d_low,
            "ci_high": d_high,
        }
    return summary


def _value(result: dict, metric: str) -> float:
    value = result.get(metric)
    return math.nan if value is None else float(value)


def _fmt(value: float | None, digits: int = 3) -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}f}"
    )


def _cell(summary: dict) -> str:
    text = _fmt(summary["mean"])
    if not math.isnan(summary["ci_low"]):
        text += f" [{_fmt(summary['ci_low'])}, {_fmt(summary['ci_high'])}]"
    return text


def _diff(summary: dict) -> str:
    diff = summary.get("diff_vs_reference")
    if diff is None:
        return "(reference)"
    text = f"{diff['mean']:+.3f}"
    if not math.isnan(diff["ci_low"]):
        text += f" [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]"
    return text


def markdown(config: ExperimentConfig, rows: list[dict], plots: list[str], cells_run: dict) -> str:
    """The report: one table per scenario variant, then the plots."""
    lines = [
        f"# Experiment `{config.name}`",
        "",
        f"Seeds {config.seeds}; reference method `{config.reference}`. Cells: "
        f"{cells_run['total']} ({cells_run['trained']} trained now, {cells_run['skipped']} "
        "finished before). Values: mean over seeds [95% percentile bootstrap CI of the mean "
        f"over seeds, {config.bootstrap_resamples} resamples; none with one seed]. Δ: paired "
        "difference to the reference (same variant and seed), mean [bootstrap CI].",
        "",
    ]
    metrics = config.metrics
    for variant in dict.fromkeys(r["variant"] for r in rows):
        members = [r for r in rows if r["variant"] == variant]
        first = members[0]
        subset = "all modalities" if first["subset"] is None else "+".join(first["subset"])
        lines += [
            f"## {first['scenario']}: {subset}, extra missing rate {first['missing_rate']:.2f}",
            "",
        ]
        header = ["method"] + [m.upper() for m in metrics] + [f"Δ {m.upper()}" for m in metrics]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in members:
            values = [_cell(row[m]) for m in metrics] + [_diff(row[m]) for m in metrics]
            lines.append("| " + " | ".join([row["method"], *values]) + " |")
        lines.append("")
    lines += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_plots(config: ExperimentConfig, rows: list[dict], out: Path) -> list[str]:
    """Per scenario: the missing-rate curve (AUROC against extra missing rate, one line per
    method and subset) when it has several rates, else AUROC bars per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []
    if "auroc" not in config.metrics:
        return written
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        members = [r for r in rows if r["scenario"] == scenario]
        rates = sorted({r["missing_rate"] for r in members})
        figure, axis = plt.subplots(figsize=(6.5, 4))
        if len(rates) > 1:
            _curve(axis, members)
            name = f"{scenario}_missing_rate.png"
        else:
            _bars(axis, members)
            name = f"{scenario}_auroc.png"
        axis.set_title(f"{config.name}: {scenario}")
        figure.tight_layout()
        figure.savefig(out / name, dpi=120)
        plt.close(figure)
        written.append(name)
    return written


def _label(row: dict) -> str:
    return (
        row["method"] if row["subset"] is None else f"{row['method']} ({'+'.join(row['subset'])})"
    )


def _error(row: dict) -> list[float]:
    auroc = row["auroc"]
    if math.isnan(auroc["ci_low"]):
        return [0.0, 0.0]
    return [auroc["mean"] - auroc["ci_low"], auroc["ci_high"] - auroc["mean"]]


def _curve(axis, members: list[dict]) -> None:
    for label in dict.fromkeys(_label(r) for r in members):
        line = sorted((r for r in members if _label(r) == label), key=lambda r: r["missing_rate"])
        errors = np.array([_error(r) for r in line]).T
        axis.errorbar(
            [r["missing_rate"] for r in line],
            [r["auroc"]["mean"] for r in line],
            yerr=errors,
            marker="o",
            capsize=3,
            label=label,
        )
    axis.set(xlabel="extra missing rate per modality", ylabel="test AUROC")
    axis.legend(fontsize=7)


def _bars(axis, members: list[dict]) -> None:
    labels = [_label(r) for r in members]
    errors = np.array([_error(r) for r in members]).T
    axis.bar(range(len(members)), [r["auroc"]["mean"] for r in members], yerr=errors, capsize=3)
    axis.set_xticks(range(len(members)), labels, rotation=40, ha="right", fontsize=7)
    low = min(r["auroc"]["mean"] for r in members)
    axis.set(ylabel="test AUROC", ylim=(max(0.0, low - 0.1), 1.0))

"""Aggregation, paper-claim checks and rich tables of the fidelity benchmark.

A *cell* is one setting of one experiment (e.g. row (b) on ehr+cxr) with its per-seed runs
and their mean and std (sample std, ddof = 1; 0.0 with a single seed, see ``n_seeds``).
Claims compare settings *paired by seed* (same data, same initialisation seed), so the std
of a difference is smaller than the stds of the two settings suggest.
"""

from __future__ import annotations

import math
import statistics

from rich.console import Console
from rich.table import Table

METRICS = ("auroc", "auprc", "auroc_holding", "auprc_holding")

# Paper, MIMIC in-hospital mortality AUROC: Table 4 and Table 3 (METHOD.md section 8).
PAPER_ABLATION = {
    "a": {"cxr+rep": 0.724, "ehr+cxr": 0.819, "ehr+rep": 0.817, "ehr+cxr+rep": 0.811},
    "b": {"cxr+rep": 0.748, "ehr+cxr": 0.847, "ehr+rep": 0.834, "ehr+cxr+rep": 0.859},
    "c": {"cxr+rep": 0.754, "ehr+cxr": 0.861, "ehr+rep": 0.854, "ehr+cxr+rep": 0.872},
    "d": {"cxr+rep": 0.772, "ehr+cxr": 0.863, "ehr+rep": 0.862, "ehr+cxr+rep": 0.870},
    "e": {"cxr+rep": 0.789, "ehr+cxr": 0.855, "ehr+rep": 0.854, "ehr+cxr+rep": 0.863},
    "f": {"cxr+rep": 0.803, "ehr+cxr": 0.867, "ehr+rep": 0.862, "ehr+cxr+rep": 0.872},
}
PAPER_FUSION = {
    "concat": 0.811,
    "lstm": 0.845,
    "dwfuse": 0.859,
    "omnifuse": 0.872,
    "only:ehr": 0.828,
    "only:cxr": 0.741,
}
ROW_NAMES = {
    "a": "concat",
    "b": "DWFuse",
    "c": "DWFuse+TLA",
    "d": "DWFuse+TLA+fw",
    "e": "DWFuse+fw+bw",
    "f": "all",
}


def _stats(values: list[float]) -> dict:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def summarize(labels: dict, runs: list[dict]) -> dict:
    """One cell: labels, mean/std per metric, the shared model config, per-seed runs."""
    cell: dict = {"labels": labels, "n_seeds": len(runs)}
    for metric in METRICS:
        if all(metric in run for run in runs):
            cell[metric] = _stats([run[metric] for run in runs])
    cell["model_config"] = runs[0]["model_config"]
    cell["runs"] = [{k: v for k, v in run.items() if k != "model_config"} for run in runs]
    return cell


def _find(cells: list[dict], **labels) -> dict | None:
    for cell in cells:
        if all(cell["labels"].get(k) == v for k, v in labels.items()):
            return cell
    return None


def paired_difference(better: dict, worse: dict, metric: str = "auroc") -> dict:
    """Per-seed difference better - worse over the seeds both cells ran."""
    worse_by_seed = {run["seed"]: run[metric] for run in worse["runs"]}
    deltas = [
        r[metric] - worse_by_seed[r["seed"]] for r in better["runs"] if r["seed"] in worse_by_seed
    ]
    return {**_stats(deltas), "per_seed": deltas}


def _ordering_claim(cells: list[dict]) -> dict | None:
    evidence = {}
    for subset in sorted({c["labels"]["subset"] for c in cells}):
        a, b, f = (_find(cells, row=r, subset=subset) for r in "abf")
        if a and b and f:
            evidence[subset] = {
                "f_minus_b": paired_difference(f, b),
                "b_minus_a": paired_difference(b, a),
            }
    if not evidence:
        return None
    holds = all(
        e["f_minus_b"]["mean"] >= 0 and e["b_minus_a"]["mean"] >= 0 for e in evidence.values()
    )
    measured = "; ".join(
        f"{subset}: f-b {_signed(e['f_minus_b'])}, b-a {_signed(e['b_minus_a'])}"
        for subset, e in evidence.items()
    )
    return {
        "statement": "full OmniFuse (f) >= DWFuse (b) >= concat (a), every subset",
        "measured": measured,
        "criterion": "mean paired AUROC difference >= 0 for both steps in every subset",
        "holds": holds,
        "evidence": evidence,
    }


def _single_modality_claim(cells: list[dict]) -> dict | None:
    concat = _find(cells, method="concat")
    singles = [c for c in cells if c["labels"]["method"].startswith("only:")]
    if concat is None or not singles:
        return None
    best = max(singles, key=lambda c: c["auroc"]["mean"])
    delta = paired_difference(concat, best)
    measured = f"concat - {best['labels']['method']}: {_signed(delta)}"
    return {
        "statement": "concat of all modalities is below the best single modality",
        "measured": measured,
        "criterion": "mean paired AUROC(concat all) - AUROC(best uni-modal model) < 0",
        "holds": delta["mean"] < 0,
        "evidence": {"best_single": best["labels"]["method"], "concat_minus_best": delta},
    }


def _flat_curve_claim(cells: list[dict], tolerance: float = 0.02) -> dict | None:
    rates = sorted({c["labels"]["rate"] for c in cells})
    if len(rates) < 2:
        return None
    lo, hi = rates[0], rates[-1]
    drops, gaps = {}, {}
    for variant in ("with", "without"):
        first, last = (
            _find(cells, rate=lo, imputation=variant),
            _find(cells, rate=hi, imputation=variant),
        )
        drops[variant] = paired_difference(first, last)
    for rate in rates:
        gaps[str(rate)] = paired_difference(
            _find(cells, rate=rate, imputation="with"),
            _find(cells, rate=rate, imputation="without"),
        )
    holds = drops["with"]["mean"] <= tolerance and drops["with"]["mean"] < drops["without"]["mean"]
    measured = (
        f"drop {lo} -> {hi}: with {_signed(drops['with'])}, without {_signed(drops['without'])}; "
        f"with - without at {hi}: {_signed(gaps[str(hi)])}"
    )
    return {
        "statement": "with imputation the missing-rate curve stays flat (and above no imputation)",
        "measured": measured,
        "criterion": (
            f"AUROC drop from rate {lo} to {hi} with imputation <= {tolerance} and smaller than "
            "without imputation"
        ),
        "holds": holds,
        "evidence": {"drop": drops, "with_minus_without": gaps},
    }


def claims(experiments: dict) -> dict:
    """The paper's qualitative claims, checked where the needed experiments ran."""
    checks = {
        "ordering": ("ablation", _ordering_claim),
        "concat_below_best_single": ("fusion", _single_modality_claim),
        "flat_missing_rate_curve": ("missing_rate", _flat_curve_claim),
    }
    out = {}
    for name, (experiment, check) in checks.items():
        if experiment in experiments:
            result = check(experiments[experiment]["cells"])
            if result is not None:
                out[name] = result
    return out


def _signed(stats: dict) -> str:
    return f"{stats['mean']:+.3f} ± {stats['std']:.3f}"


def _fmt(stats: dict | None, digits: int = 3) -> str:
    if stats is None or math.isnan(stats["mean"]):
        return "-"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _ablation_table(cells: list[dict], metric: str) -> Table:
    subsets = list(dict.fromkeys(c["labels"]["subset"] for c in cells))
    table = Table(title=f"(a) Table 4 ablation, test {metric.upper()} (paper AUROC in brackets)")
    table.add_column("row")
    for subset in subsets:
        table.add_column(subset, justify="right")
    for row in dict.fromkeys(c["labels"]["row"] for c in cells):
        values = []
        for subset in subsets:
            text = _fmt(_find(cells, row=row, subset=subset).get(metric))
            paper = PAPER_ABLATION.get(row, {}).get(subset)
            values.append(f"{text} [dim]({paper:.3f})[/]" if metric == "auroc" and paper else text)
        table.add_row(f"({row}) {ROW_NAMES.get(row, row)}", *values)
    return table


def _missing_rate_table(cells: list[dict]) -> Table:
    table = Table(title="(b) test AUROC vs missing rate (every modality)")
    for column in ("rate", "with imputation", "without", "paired gap"):
        table.add_column(column, justify="right")
    for rate in sorted({c["labels"]["rate"] for c in cells}):
        with_cell = _find(cells, rate=rate, imputation="with")
        without = _find(cells, rate=rate, imputation="without")
        gap = paired_difference(with_cell, without)
        table.add_row(f"{rate:.1f}", _fmt(with_cell["auroc"]), _fmt(without["auroc"]), _fmt(gap))
    return table


def _fusion_table(cells: list[dict]) -> Table:
    table = Table(title="(c) fusion methods on all modalities; uni-modal models")
    for column in ("method", "AUROC", "AUPRC", "AUROC, holding it", "paper AUROC"):
        table.add_column(column, justify="right" if column != "method" else "left")
    for cell in cells:
        method = cell["labels"]["method"]
        paper = PAPER_FUSION.get(method)
        table.add_row(
            method,
            _fmt(cell["auroc"]),
            _fmt(cell["auprc"]),
            _fmt(cell.get("auroc_holding")),
            f"{paper:.3f}" if paper else "-",
        )
    return table


def _claims_table(checked: dict) -> Table:
    table = Table(title="Paper claims (paired by seed)")
    for column in ("claim", "criterion", "measured (mean ± std over seeds)", "reproduced"):
        table.add_column(column)
    for claim in checked.values():
        mark = "[green]yes[/]" if claim["holds"] else "[red]no[/]"
        table.add_row(claim["statement"], claim["criterion"], claim["measured"], mark)
    return table


def print_tables(result: dict, console: Console) -> None:
    """Print every experiment's table and the claim checks."""
    experiments = result["experiments"]
    if "ablation" in experiments:
        for metric in ("auroc", "auprc"):
            console.print(_ablation_table(experiments["ablation"]["cells"], metric))
    if "missing_rate" in experiments:
        console.print(_missing_rate_table(experiments["missing_rate"]["cells"]))
    if "fusion" in experiments:
        console.print(_fusion_table(experiments["fusion"]["cells"]))
    if result["claims"]:
        console.print(_claims_table(result["claims"]))

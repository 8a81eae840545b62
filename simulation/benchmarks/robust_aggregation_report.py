"""Summary and rich tables of the robust-aggregation benchmark
(``simulation.benchmarks.robust_aggregation``): mean and sample std over seeds per rule and
attack, the difference to FedAvg without an attack, rejected updates, and the cost table."""

from __future__ import annotations

import math
import statistics

from rich.console import Console
from rich.table import Table

from server.aggregation import RULES


def summarize(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """rule -> attack -> mean test AUROC over seeds, its difference to fedavg/none, rejections."""

    def mean(rule: str, attack: str, field: str) -> float:
        return statistics.fmean(
            r[field] for r in runs if (r["rule"], r["attack"]) == (rule, attack)
        )

    pairs = sorted({(r["rule"], r["attack"]) for r in runs})
    baseline = mean("fedavg", "none", "test_auroc") if ("fedavg", "none") in pairs else math.nan
    summary: dict[str, dict[str, dict]] = {}
    for rule, attack in pairs:
        group = [r for r in runs if (r["rule"], r["attack"]) == (rule, attack)]
        aurocs = [r["test_auroc"] for r in group]
        summary.setdefault(rule, {})[attack] = {
            "test_auroc_mean": statistics.fmean(aurocs),
            "test_auroc_std": statistics.stdev(aurocs) if len(aurocs) > 1 else 0.0,
            "minus_fedavg_no_attack": statistics.fmean(aurocs) - baseline,
            "deviation_round1_mean": mean(rule, attack, "deviation_round1"),
            "rejected_updates": sum(len(r["rejected"]) for r in group),
            "rejection_reasons": sorted(
                {x["reason"].split(":")[0] for r in group for x in r["rejected"]}
            ),
            "seeds": len(group),
        }
    return summary


def print_report(result: dict, console: Console) -> None:
    table = Table(
        title="Test AUROC under one malicious site (mean over seeds; d = minus fedavg/none)"
    )
    for column in ("rule", "attack", "AUROC", "d", "round-1 deviation", "rejected"):
        table.add_column(column, justify="left" if column in ("rule", "attack") else "right")
    for rule, attacks in result["summary"].items():
        for attack, cell in attacks.items():
            rejected = str(cell["rejected_updates"])
            if cell["rejection_reasons"]:
                rejected += f" ({', '.join(cell['rejection_reasons'])})"
            table.add_row(
                rule,
                attack,
                f"{cell['test_auroc_mean']:.3f} ± {cell['test_auroc_std']:.3f}",
                f"{cell['minus_fedavg_no_attack']:+.3f}",
                f"{cell['deviation_round1_mean']:.3g}",
                rejected,
            )
    console.print(table)
    cost = Table(title="aggregate_states, ms per round (paper-size model, median of repeats)")
    columns = ["sites", "parameters", *RULES, "float64 reference", "speed-up fedavg"]
    for column in columns:
        cost.add_column(column, justify="right")
    for row in result["cost"]:
        cost.add_row(
            *(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in columns)
        )
    console.print(cost)

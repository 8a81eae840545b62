"""Summary and rich tables of the federation benchmark (``simulation.benchmarks.federation``).

AUROC cells are mean and sample std (ddof = 1; 0.0 with one seed) over seeds; a seed's
local-only value is its mean over sites, and min/max run over every site and seed. Overhead
ratios are sums of round wall seconds over sums of the sites' training seconds.
"""

from __future__ import annotations

import statistics

from rich.console import Console
from rich.table import Table


def overhead_rows(history: dict) -> list[dict]:
    """Per round: wall seconds, summed client training seconds, their ratio, bytes."""
    rows = []
    for round_id in sorted(history, key=int):
        record = history[round_id]
        wall, train = record["wall_seconds"], record["train"]["train-seconds-sum"]
        rows.append(
            {
                "round": int(round_id),
                "wall_seconds": wall,
                "train_seconds_sum": train,
                "ratio": wall / train,
                "bytes_sent": record["bytes"].get("sent", 0),
                "bytes_received": record["bytes"].get("received", 0),
                "val_auroc": record["evaluate_clients"].get("val-auroc"),
                "test_auroc": record["server"].get("test-auroc"),
            }
        )
    return rows


def _stats(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _compare(group: list[dict], fed: str, central: str, local: str) -> dict:
    """Mean/std over seeds of one model choice; local is each seed's mean over sites."""
    per_site = [[site[local] for site in r["local"]] for r in group]
    entry = {
        "federated": _stats([r[fed] for r in group]),
        "central": _stats([r[central] for r in group]),
        "local_mean": _stats([statistics.fmean(v) for v in per_site]),
        "local_min": min(min(v) for v in per_site),
        "local_max": max(max(v) for v in per_site),
    }
    entry["federated_minus_central"] = entry["federated"]["mean"] - entry["central"]["mean"]
    entry["within_0.02_of_central"] = abs(entry["federated_minus_central"]) <= 0.02
    entry["above_local_mean"] = entry["federated"]["mean"] > entry["local_mean"]["mean"]
    return entry


def summarize(runs: list[dict]) -> dict:
    """Per site count: AUROC of each method and model choice; overhead over seeds."""
    summary = {}
    for num_sites in sorted({r["num_sites"] for r in runs}):
        group = [r for r in runs if r["num_sites"] == num_sites]
        rows = [overhead_rows(r["metrics"]) for r in group]
        steady = [row for rs in rows for row in rs if row["round"] > 1]
        every = [row for rs in rows for row in rs]
        summary[str(num_sites)] = {
            "final": _compare(group, "federated_auroc", "central_auroc", "auroc"),
            "best_val": _compare(
                group, "federated_auroc_best_val", "central_auroc_best_val", "auroc_best_val"
            ),
            "local_own_modalities": _compare(
                group, "federated_auroc", "central_auroc", "auroc_own_modalities"
            ),
            "ratio_round_1": statistics.fmean(rs[0]["ratio"] for rs in rows),
            "ratio_rounds_2_on": _ratio(steady) if steady else None,
            "ratio_all_rounds": _ratio(every),
            # the engine's start-up (Ray, actors importing torch), timed before round 1
            "startup_seconds": statistics.fmean(r["startup"]["startup_seconds"] for r in group)
            if all(r.get("startup") for r in group)
            else None,
            # what a round costs beyond local training, per client (rounds 2..R)
            "overhead_seconds_per_client": statistics.median(
                (r["wall_seconds"] - r["train_seconds_sum"]) / num_sites for r in steady
            )
            if steady
            else None,
        }
    return summary


def _ratio(rows: list[dict]) -> float:
    return sum(r["wall_seconds"] for r in rows) / sum(r["train_seconds_sum"] for r in rows)


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(title: str, columns: str) -> Table:
    table = Table(title=title)
    for column in columns.split("|"):
        table.add_column(column, justify="right")
    return table


def _ms(stats: dict) -> str:
    return f"{_f(stats['mean'])} ± {_f(stats['std'])}"


def print_report(result: dict, console: Console) -> None:
    config, summary = result["config"], result["summary"]
    auroc = _table(
        f"Test AUROC, {config['rounds']} rounds x {config['local_epochs']} local epochs "
        "(mean ± std over seeds)",
        "sites|model|seeds|federated|centralised|fed - central|local mean|local [min, max]",
    )
    choices = {"final": "final", "best_val": "best val", "local_own_modalities": "final*"}
    for num_sites, s in summary.items():
        for key, label in choices.items():
            c = s[key]
            fed_central = f"{c['federated_minus_central']:+.3f}"
            spread = f"[{_f(c['local_min'])}, {_f(c['local_max'])}]"
            methods = [_ms(c[k]) for k in ("federated", "central")]
            auroc.add_row(
                num_sites,
                label,
                str(c["federated"]["n"]),
                *methods,
                fed_central,
                _ms(c["local_mean"]),
                spread,
            )
    console.print(auroc)
    console.print("final*: local models scored on the test set restricted to the site's modalities")
    for run in result["runs"]:
        table = _table(
            f"{run['num_sites']} sites, seed {run['seed']}: per round",
            "round|wall s|Σ client train s|wall / Σ train|bytes sent|bytes received"
            "|fed. val AUROC|test AUROC",
        )
        for row in overhead_rows(run["metrics"]):
            seconds = [_f(row[k], 2) for k in ("wall_seconds", "train_seconds_sum", "ratio")]
            sizes = [f"{row[k]:,}" for k in ("bytes_sent", "bytes_received")]
            aurocs = [_f(row["val_auroc"]), _f(row["test_auroc"])]
            table.add_row(str(row["round"]), *seconds, *sizes, *aurocs)
        console.print(table)
    overhead = _table(
        "Simulation overhead: round wall time / Σ client training time",
        "sites|start-up s (before round 1)|round 1|rounds 2..R|all rounds|extra s per client-round",
    )
    keys = (
        "startup_seconds",
        "ratio_round_1",
        "ratio_rounds_2_on",
        "ratio_all_rounds",
        "overhead_seconds_per_client",
    )
    for num_sites, s in summary.items():
        overhead.add_row(num_sites, *[_f(s[k], 2) for k in keys])
    console.print(overhead)
    for num_sites, s in summary.items():
        for key in ("final", "best_val"):
            console.print(
                f"{num_sites} sites, {key}: federated within 0.02 of centralised: "
                f"{s[key]['within_0.02_of_central']}; above local-only mean: "
                f"{s[key]['above_local_mean']}"
            )
    console.print(f"total {result['seconds']:.0f} s")

"""Rich tables of the scale benchmark (``simulation.benchmarks.scale``)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def summary_table(runs: list[dict]) -> Table:
    """One row per run: memory peaks, time per round, fixed cost, loading share, load."""
    table = Table(title="scale: one row per federation run")
    for column in (
        "sites",
        "cpus/client",
        "at once",
        "peak RSS GiB",
        "peak anon GiB",
        "procs",
        "wall s/round",
        "fixed s/client/round",
        "load share max",
        "load avg",
    ):
        table.add_column(column, justify="right")
    for run in runs:
        memory = run["memory"]
        table.add_row(
            str(run["sites"]),
            str(run["client_cpus"]),
            str(run["concurrent_clients"]),
            _gib(memory["peak_rss_bytes"]),
            _gib(memory["peak_anonymous_bytes"]),
            str(memory["max_processes"]),
            f"{run['wall_seconds_per_round']:.1f}",
            f"{run['fixed_seconds_per_client_rounds_2_on']:.3f}",
            f"{100 * run['load_share_max']:.2f}%",
            f"{memory['load_1min_mean']:.1f} (max {memory['load_1min_max']:.1f})",
        )
    return table


def rounds_table(run: dict) -> Table:
    """Per round of one run: wall, client training and loading seconds, derived costs."""
    table = Table(title=f"{run['sites']} sites, {run['client_cpus']} CPU(s) per client: rounds")
    for column in (
        "round",
        "wall s",
        "train s sum",
        "train s max",
        "load s sum",
        "load s max",
        "load share",
        "fixed s/client",
        "wall / train sum",
    ):
        table.add_column(column, justify="right")
    for row in run["rounds_table"]:
        ratio = row["wall_over_train_sum"]
        table.add_row(
            str(row["round"]),
            f"{row['wall_seconds']:.1f}",
            f"{row['train_seconds_sum']:.1f}",
            f"{row['train_seconds_max']:.1f}",
            f"{row['load_seconds_sum']:.2f}",
            f"{row['load_seconds_max']:.2f}",
            f"{100 * row['load_share']:.2f}%",
            f"{row['fixed_seconds_per_client']:.3f}",
            "-" if ratio is None else f"{ratio:.2f}",
        )
    return table


def print_runs(runs: list[dict], console: Console) -> None:
    console.print(summary_table(runs))
    for run in runs:
        console.print(rounds_table(run))

"""The mechanism suite's outputs: a markdown report, a console table and two PNG plots.

``markdown_report`` and ``console_table`` show one row per MechanismResult: scenario,
mechanism, control, expected sign, paired difference with its 95% CI, holds, and where the
scenario has an oracle bound, that bound and each arm's distance to it. ``write_plots`` draws
the differences with their CIs (mechanisms_ci.png) and the distances to the oracle
(mechanisms_oracle.png).
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.table import Table

from simulation.benchmarks.mechanism_result import MechanismResult

SIGN_TEXT = {"positive": "> 0", "zero": "= 0", "non-positive": "<= 0"}


def _number(value: object, digits: int = 3) -> str:
    if not isinstance(value, int | float) or math.isnan(float(value)):
        return "-"
    return f"{float(value):+.{digits}f}" if digits else str(value)


def _plain(value: object) -> str:
    if not isinstance(value, int | float) or math.isnan(float(value)):
        return "-"
    return f"{float(value):.3f}"


def oracle_distances(result: MechanismResult) -> tuple[float | None, float | None]:
    """(method, reference) distance to the oracle: the central scenarios' keys
    ``method_oracle_distance`` / ``reference_oracle_distance``, or the federated ones'
    ``<arm>_distance_to_oracle``; None where the scenario has none."""
    details = result.details
    # the federated arms are named 'fed_f: ...' (key, then a description)
    method_key, reference_key = result.method.split(":")[0], result.reference.split(":")[0]
    method = details.get("method_oracle_distance", details.get(f"{method_key}_distance_to_oracle"))
    reference = details.get(
        "reference_oracle_distance", details.get(f"{reference_key}_distance_to_oracle")
    )
    return method, reference


def row_cells(result: MechanismResult) -> list[str]:
    """The report's cells for one result (same order as HEADER)."""
    details = result.details
    method_distance, reference_distance = oracle_distances(result)
    return [
        result.name,
        result.mechanism,
        "yes" if result.control else "no",
        SIGN_TEXT[result.expected_sign],
        f"{_number(result.paired_diff)} [{_number(result.ci_low)}, {_number(result.ci_high)}]",
        "**yes**" if result.holds else "**no**",
        _plain(details.get("oracle_auroc")),
        _plain(method_distance),
        _plain(reference_distance),
    ]


HEADER = [
    "scenario",
    "mechanism",
    "control",
    "expected",
    "diff [95% CI]",
    "holds",
    "oracle AUROC",
    "method to oracle",
    "reference to oracle",
]


def markdown_table(results: list[MechanismResult]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in results]
    return "\n".join(lines)


def _arms_table(results: list[MechanismResult]) -> str:
    lines = [
        "| scenario | method | reference | metric | seeds | method per seed | reference per seed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        method = ", ".join(f"{v:.3f}" for v in r.method_values)
        reference = ", ".join(f"{v:.3f}" for v in r.reference_values)
        lines.append(
            f"| {r.name} | {r.method} | {r.reference} | {r.metric} | {r.n_seeds} | "
            f"{method} | {reference} |"
        )
    return "\n".join(lines)


def markdown_report(payload: dict, results: list[MechanismResult]) -> str:
    """The whole DIR/mechanisms.md: command, timing, verdict table, per-seed values."""
    timing, machine = payload["timing"], payload["machine"]
    held = sum(r.holds for r in results)
    parts = [
        "# Mechanism suite",
        "",
        f"Command: `{payload['command']}`  ",
        f"Seeds: {payload['seeds']}; quick: {payload['quick']}; federated scenarios: "
        f"{payload['federated']['status']}.  ",
        f"Wall time {timing['wall_seconds']:.0f} s, process CPU time "
        f"{timing['cpu_seconds']:.0f} s (share {timing['cpu_share']:.2f} of one core); load "
        f"average {timing['loadavg_start']} at start, {timing['loadavg_end']} at the end; "
        f"{machine['cpu_count']} CPUs, {machine['torch_threads']} torch thread(s).",
        "",
        f"{held} of {len(results)} results hold. Rules (stated before the run): positive: "
        "CI low > 0; non-positive: CI low <= 0 and diff <= tolerance; zero: CI holds 0 or "
        "|diff| <= tolerance (tolerance 0.01 unless the JSON says otherwise). Diff = mean "
        "over seeds of method - reference; CI = paired 95% percentile bootstrap over seeds. "
        "Distances to the oracle are oracle AUROC minus the arm's AUROC (mean over seeds).",
        "",
        markdown_table(results),
        "",
        "## Per-seed values",
        "",
        _arms_table(results),
        "",
        "Plots: `mechanisms_ci.png` (differences and CIs), `mechanisms_oracle.png` "
        "(distances to the oracle bound).",
        "",
    ]
    return "\n".join(parts)


def console_table(results: list[MechanismResult]) -> Table:
    table = Table(title="Mechanism suite (paired diff, 95% bootstrap CI over seeds)")
    for column in ("scenario", "ctl", "exp", "diff [95% CI]", "holds"):
        table.add_column(column, overflow="fold")
    for r in results:
        cells = row_cells(r)
        table.add_row(cells[0], cells[2], cells[3], cells[4], cells[5].strip("*"))
    return table


def write_plots(results: list[MechanismResult], out: Path) -> list[Path]:
    """mechanisms_ci.png and mechanisms_oracle.png under ``out``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [out / "mechanisms_ci.png", out / "mechanisms_oracle.png"]
    height = 0.45 * len(results) + 1.5
    figure, axis = plt.subplots(figsize=(9, height))
    for i, r in enumerate(results):
        colour = "tab:green" if r.holds else "tab:red"
        axis.plot([r.ci_low, r.ci_high], [i, i], color=colour, linewidth=2)
        axis.plot(r.paired_diff, i, "s" if r.control else "o", color=colour)
    axis.axvline(0.0, color="black", linewidth=0.8)
    axis.set_yticks(range(len(results)), [r.name for r in results], fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("method - reference (mean over seeds), 95% CI; square = control")
    axis.set_title("Mechanism suite: green holds, red does not")
    figure.tight_layout()
    figure.savefig(paths[0], dpi=120)
    plt.close(figure)

    with_oracle = [r for r in results if None not in oracle_distances(r)]
    figure, axis = plt.subplots(figsize=(9, 0.45 * max(len(with_oracle), 1) + 1.5))
    for i, r in enumerate(with_oracle):
        method_distance, reference_distance = oracle_distances(r)
        axis.barh(i - 0.2, method_distance, height=0.4, color="tab:blue")
        axis.barh(i + 0.2, reference_distance, height=0.4, color="tab:gray")
    axis.set_yticks(range(len(with_oracle)), [r.name for r in with_oracle], fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("oracle AUROC - arm AUROC (blue: method, grey: reference)")
    axis.set_title("Distance to the Bayes/oracle bound")
    figure.tight_layout()
    figure.savefig(paths[1], dpi=120)
    plt.close(figure)
    return paths

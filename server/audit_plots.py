"""PNG figures of the audit report, drawn from the report's plain data (see ``audit_report``).

Every figure is built on its own ``Figure`` with an Agg canvas, so nothing here touches
pyplot's global state or the process-wide backend. Missing values (None) are skipped (a
line joins the rounds around them); a line whose values are all missing is not drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

AUROC_PNG = "auroc_per_round.png"
TIMELINE_PNG = "lazy_combination_timeline.png"
WEIGHTS_PNG = "modality_weights.png"
AVAILABILITY_PNG = "availability.png"
NO_LAZY_COLOUR = "#e0e0e0"


def combination_colours(combinations: Sequence[str]) -> dict[str, tuple]:
    """One categorical colour per label (combination or modality), stable across figures."""
    cmap = colormaps["tab20" if len(combinations) > 10 else "tab10"]
    return {label: cmap(index % cmap.N) for index, label in enumerate(combinations)}


def _defined(rounds: Sequence[int], values: Sequence[float | None]) -> tuple[list, list]:
    """The (round, value) points that have a value: missing rounds are skipped, so a line
    joins the rounds around a gap and its markers show which rounds reported."""
    points = [(r, float(v)) for r, v in zip(rounds, values, strict=True) if v is not None]
    return [r for r, _ in points], [v for _, v in points]


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=100)
    return path


def _round_axis(axes, rounds: Sequence[int]) -> None:
    """Integer round ticks with half a round of margin (also for one round or no data)."""
    axes.set_xticks(list(rounds))
    if rounds:
        axes.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)


def _empty_note(axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="grey")


def plot_auroc(
    path: Path,
    rounds: list[int],
    local_val_auroc: dict[str, list[float | None]],
    round_metrics: list[dict],
) -> Path:
    """Each site's local validation AUROC, the federated evaluation and server test AUROC."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    drawn = 0
    for site, values in local_val_auroc.items():
        if any(v is not None for v in values):
            axes.plot(*_defined(rounds, values), marker="o", alpha=0.7, label=f"{site} (local val)")
            drawn += 1
    metric_rounds = [m["round"] for m in round_metrics]
    for key, label, style in (
        ("federated_val_auroc", "federated evaluation", {"color": "black", "marker": "s"}),
        ("server_test_auroc", "server test", {"color": "dimgrey", "marker": "D", "ls": "--"}),
    ):
        values = [m[key] for m in round_metrics]
        if any(v is not None for v in values):
            axes.plot(*_defined(metric_rounds, values), lw=2, label=label, **style)
            drawn += 1
    axes.set(xlabel="round", ylabel="AUROC", title="AUROC per round")
    _round_axis(axes, sorted(set(rounds) | set(metric_rounds)))
    if drawn:
        axes.legend(fontsize="small")
    else:
        _empty_note(axes, "no AUROC values reported")
    return _save(figure, path)


def plot_lazy_timeline(
    path: Path,
    sites: list[str],
    rounds: list[int],
    timeline: dict[str, list[str | None]],
    combinations: list[str],
) -> Path:
    """Sites x rounds grid, one colour per lazy combination (grey: none reported)."""
    colours = combination_colours(combinations)
    used = [c for c in combinations if any(c in timeline[s] for s in sites)]
    index = {label: i + 1 for i, label in enumerate(used)}
    grid = [[index.get(label, 0) if label else 0 for label in timeline[s]] for s in sites]
    cmap = ListedColormap([NO_LAZY_COLOUR, *(colours[c] for c in used)])
    figure = Figure(figsize=(max(6.0, 3.5 + 0.7 * len(rounds)), 1.5 + 0.5 * len(sites)))
    figure.set_layout_engine("constrained")
    axes = figure.add_subplot()
    axes.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(used) + 0.5, aspect="auto")
    if len(sites) * len(rounds) <= 200:  # label cells while they stay legible
        for row, site in enumerate(sites):
            for column, label in enumerate(timeline[site]):
                axes.text(column, row, label or "-", ha="center", va="center", fontsize="small")
    axes.set_xticks(range(len(rounds)), [str(r) for r in rounds])
    axes.set_yticks(range(len(sites)), sites)
    axes.set(xlabel="round", title="Lazy combination per site and round")
    handles = [Patch(color=colours[c], label=c) for c in used]
    handles.append(Patch(color=NO_LAZY_COLOUR, label="none reported"))
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return _save(figure, path)


def plot_modality_weights(
    path: Path,
    sites: list[str],
    rounds: list[int],
    series: dict[str, dict[str, list[float | None]]],
    modalities: list[str],
) -> Path:
    """One panel per site: mean DWFuse weight of each modality over rounds.

    A modality keeps its colour in every panel; one legend for the figure lists those drawn.
    """
    colours = combination_colours(modalities)
    columns = min(3, len(sites))
    rows = math.ceil(len(sites) / columns)
    figure = Figure(figsize=(4.0 * columns + 1.0, 3.2 * rows), layout="constrained")
    panels = figure.subplots(rows, columns, squeeze=False, sharey=True)
    drawn: set[str] = set()
    for position, site in enumerate(sites):
        axes = panels[position // columns][position % columns]
        for modality in modalities:
            values = series[site].get(modality, [None] * len(rounds))
            if any(v is not None for v in values):
                axes.plot(*_defined(rounds, values), marker="o", color=colours[modality])
                drawn.add(modality)
        axes.set(title=site, xlabel="round")
        _round_axis(axes, rounds)
        if not axes.lines:
            _empty_note(axes, "no weights reported")
    for position in range(len(sites), rows * columns):
        panels[position // columns][position % columns].set_visible(False)
    panels[0][0].set_ylabel("mean DWFuse weight")
    figure.suptitle("Mean DWFuse weight per modality")
    handles = [
        Line2D([], [], color=colours[m], marker="o", label=m) for m in modalities if m in drawn
    ]
    if handles:
        figure.legend(handles=handles, loc="outside right upper", fontsize="small")
    return _save(figure, path)


def plot_availability(
    path: Path,
    sites: list[str],
    availability: dict[str, dict],
    combinations: list[str],
    min_count: int,
) -> Path:
    """Stacked bars of samples per exact modality combination; suppressed cells omitted."""
    colours = combination_colours(combinations)
    figure = Figure(figsize=(max(5.0, 1.2 * len(sites) + 3.0), 4.5), layout="constrained")
    axes = figure.add_subplot()
    bottoms = [0] * len(sites)
    suppressed = {s: 0 for s in sites}
    for label in combinations:
        heights = []
        for site in sites:
            counts = availability[site]["counts"]
            value = counts.get(label)
            if label in counts and value is None:
                suppressed[site] += 1
            heights.append(value or 0)
        if any(heights):
            axes.bar(range(len(sites)), heights, bottom=bottoms, color=colours[label], label=label)
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    axes.set_xticks(range(len(sites)), sites)
    axes.set_xlim(-0.6, len(sites) - 0.4)
    axes.set(ylabel="training samples (last round)", title="Modality availability per site")
    if any(bottoms):
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:
        _empty_note(axes, "no unsuppressed counts")
    hidden = [f"{site}: {n}" for site, n in suppressed.items() if n]
    note = f"cells < {min_count} suppressed and omitted"
    figure.supxlabel(f"{note} ({', '.join(hidden)})" if hidden else note, fontsize="small")
    return _save(figure, path)


def write_plots(out_dir: Path, data: dict) -> dict[str, Path]:
    """All four figures of the report from its data section; returns name -> path."""
    sites, rounds = data["sites"], data["rounds"]
    return {
        "auroc_per_round": plot_auroc(
            out_dir / AUROC_PNG, rounds, data["local_val_auroc"], data["round_metrics"]
        ),
        "lazy_combination_timeline": plot_lazy_timeline(
            out_dir / TIMELINE_PNG, sites, rounds, data["lazy_timeline"], data["combinations"]
        ),
        "modality_weights": plot_modality_weights(
            out_dir / WEIGHTS_PNG, sites, rounds, data["dwfuse_weight_series"], data["modalities"]
        ),
        "availability": plot_availability(
            out_dir / AVAILABILITY_PNG,
            sites,
            data["availability"],
            data["combinations"],
            data["min_count"],
        ),
    }

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
from matplotlib.patches import Patch, Rectangle

AUROC_PNG = "auroc_per_round.png"
TIMELINE_PNG = "lazy_combination_timeline.png"
WEIGHTS_PNG = "modality_weights.png"
AVAILABILITY_PNG = "availability.png"
FREQUENCY_PNG = "lazy_frequency.png"
PROFILE_PNG = "weight_profile.png"
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


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _empty_note(axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="grey")


def _auroc_limits(values: list[float]) -> tuple[float, float]:
    """The AUROC axis: 0.5 (chance) to 1, or 0 to 1 when a value or interval is below
    chance; never zoomed onto the data, so small test sets do not look like big effects."""
    return (0.0, 1.0) if any(v < 0.5 for v in values) else (0.5, 1.0)


def plot_auroc(
    path: Path,
    rounds: list[int],
    local_val_auroc: dict[str, list[float | None]],
    round_metrics: list[dict],
) -> Path:
    """Each site's local validation AUROC, the federated evaluation and the server test AUROC
    with its 95% bootstrap interval (error bars) on a fixed 0.5-1 (or 0-1) axis."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    shown: list[float] = []
    for site, values in local_val_auroc.items():
        if any(v is not None for v in values):
            x, y = _defined(rounds, values)
            axes.plot(x, y, marker="o", alpha=0.6, label=f"{site} (local val)")
            shown += y
    metric_rounds = [m["round"] for m in round_metrics]
    values = [m["federated_val_auroc"] for m in round_metrics]
    if any(v is not None for v in values):
        x, y = _defined(metric_rounds, values)
        axes.plot(x, y, lw=2, color="black", marker="s", label="federated evaluation")
        shown += y
    tested = [m for m in round_metrics if m["server_test_auroc"] is not None]
    if tested:
        low = [m["server_test_auroc_low"] for m in tested]
        high = [m["server_test_auroc_high"] for m in tested]
        y = [m["server_test_auroc"] for m in tested]
        has_ci = all(v is not None for v in low + high)
        errors = [[a - b for a, b in zip(y, low, strict=True)],
                  [b - a for a, b in zip(y, high, strict=True)]] if has_ci else None  # fmt: skip
        n = {int(m["server_test_n"]) for m in tested if m["server_test_n"]}
        label = "server test" + (f" (n = {', '.join(map(str, sorted(n)))}" if n else " (")
        label += ", 95% CI)" if has_ci else ")"
        axes.errorbar([m["round"] for m in tested], y, yerr=errors, color="dimgrey", marker="D",
                      ls="--", lw=2, capsize=4, label=label)  # fmt: skip
        shown += y + ([v for v in low if v is not None] if has_ci else [])
    axes.axhline(0.5, color="grey", lw=0.8, ls=":")
    axes.set_ylim(*_auroc_limits(shown))
    axes.set(xlabel="round", ylabel="AUROC", title="AUROC per round")
    _round_axis(axes, sorted(set(rounds) | set(metric_rounds)))
    if shown:
        axes.legend(fontsize="small", loc="lower right")
    else:
        _empty_note(axes, "no AUROC values reported")
    return _save(figure, path)


def plot_lazy_timeline(
    path: Path,
    sites: list[str],
    rounds: list[int],
    timeline: dict[str, list[str | None]],
    combinations: list[str],
    near_tie: dict[str, list[bool]] | None = None,
) -> Path:
    """Sites x rounds grid, one colour per lazy combination (grey: none reported); a near
    tie (``near_tie``) is hatched and labelled 'label?' (not a finding)."""
    colours = combination_colours(combinations)
    used = [c for c in combinations if any(c in timeline[s] for s in sites)]
    index = {label: i + 1 for i, label in enumerate(used)}
    grid = [[index.get(label, 0) if label else 0 for label in timeline[s]] for s in sites]
    cmap = ListedColormap([NO_LAZY_COLOUR, *(colours[c] for c in used)])
    figure = Figure(figsize=(max(6.0, 3.5 + 0.7 * len(rounds)), 1.5 + 0.5 * len(sites)))
    figure.set_layout_engine("constrained")
    axes = figure.add_subplot()
    axes.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(used) + 0.5, aspect="auto")
    ties = near_tie or {s: [False] * len(rounds) for s in sites}
    for row, site in enumerate(sites):
        for column, tie in enumerate(ties[site]):
            if tie:
                axes.add_patch(Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False,
                                         hatch="///", edgecolor="white", lw=0))  # fmt: skip
    if len(sites) * len(rounds) <= 200:  # label cells while they stay legible
        for row, site in enumerate(sites):
            for column, label in enumerate(timeline[site]):
                tie = ties[site][column]
                box = {"facecolor": "white", "alpha": 0.85, "lw": 0, "pad": 1.5} if tie else None
                text = (label or "-") + ("?" if tie else "")
                axes.text(column, row, text, ha="center", va="center", fontsize="small", bbox=box)
    axes.set_xticks(range(len(rounds)), [str(r) for r in rounds])
    axes.set_yticks(range(len(sites)), sites)
    axes.set(xlabel="round", title="Lazy combination per site and round")
    handles = [Patch(color=colours[c], label=c) for c in used]
    handles.append(Patch(color=NO_LAZY_COLOUR, label="none reported"))
    if any(any(v) for v in ties.values()):
        handles.append(Patch(facecolor="grey", hatch="///", edgecolor="white", label="? near tie"))
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return _save(figure, path)


def plot_modality_weights(
    path: Path,
    sites: list[str],
    rounds: list[int],
    series: dict[str, dict[str, list[float | None]]],
    modalities: list[str],
    observed: dict[str, list[str] | None] | None = None,
) -> Path:
    """One panel per site: mean test-time DWFuse confidence weight of each modality over
    rounds (``audit_tables.TEST_TIME_WEIGHT_NOTE`` says what it is).

    A modality keeps its colour in every panel; one legend for the figure lists those drawn.
    A modality the site does not hold (``observed``) is drawn dashed with hollow markers and
    named 'imputed' in the panel: its weight is that of an imputed embedding.
    """
    colours = combination_colours(modalities)
    columns = min(3, len(sites))
    rows = math.ceil(len(sites) / columns)
    figure = Figure(figsize=(4.0 * columns + 1.0, 3.2 * rows), layout="constrained")
    panels = figure.subplots(rows, columns, squeeze=False, sharey=True)
    drawn: set[str] = set()
    for position, site in enumerate(sites):
        axes = panels[position // columns][position % columns]
        held = (observed or {}).get(site)
        imputed = [m for m in modalities if held is not None and m not in held]
        for modality in modalities:
            values = series[site].get(modality, [None] * len(rounds))
            if any(v is not None for v in values):
                style = {"ls": "--", "mfc": "white"} if modality in imputed else {}
                axes.plot(*_defined(rounds, values), marker="o", color=colours[modality], **style)
                drawn.add(modality)
        title = site + (f" ({', '.join(imputed)} imputed)" if imputed else "")
        axes.set(title=title, xlabel="round", ylim=(0.0, 1.0))  # weights are shares: 0 to 1
        _round_axis(axes, rounds)
        if not axes.lines:
            _empty_note(axes, "no weights reported")
    for position in range(len(sites), rows * columns):
        panels[position // columns][position % columns].set_visible(False)
    panels[0][0].set_ylabel("test-time confidence weight")
    figure.suptitle(
        "DWFuse weight per modality at test time (validation, no labels: head confidences "
        "stand in for p; not the training omega)"
    )
    handles = [
        Line2D([], [], color=colours[m], marker="o", label=m) for m in modalities if m in drawn
    ]
    if any((observed or {}).values()):
        handles.append(
            Line2D([], [], color="grey", ls="--", marker="o", mfc="white", label="imputed")
        )
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


# -- cross-site views ------------------------------------------------------------------------
def plot_lazy_frequency(
    path: Path, sites: list[str], frequency: dict[str, dict], combinations: list[str]
) -> Path:
    """Sites x combinations: share of a site's rounds in which each combination was lazy
    (cells labelled 'k/n'; near ties counted in the row label)."""
    used = [c for c in combinations if any(c in frequency[s]["counts"] for s in sites)]
    grid = [
        [frequency[s]["counts"].get(c, 0) / frequency[s]["rounds"] if frequency[s]["rounds"]
         else 0.0 for c in used]
        for s in sites
    ]  # fmt: skip
    figure = Figure(figsize=(max(5.5, 2.5 + 1.1 * len(used)), 1.8 + 0.5 * len(sites)))
    figure.set_layout_engine("constrained")
    axes = figure.add_subplot()
    image = axes.imshow(grid if used else [[0.0]], cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for row, site in enumerate(sites):
        for column, label in enumerate(used):
            k, n = frequency[site]["counts"].get(label, 0), frequency[site]["rounds"]
            colour = "white" if grid[row][column] > 0.6 else "black"
            axes.text(column, row, f"{k}/{n}", ha="center", va="center", color=colour)
    axes.set_xticks(range(len(used)), used, rotation=20, ha="right")
    axes.set_yticks(
        range(len(sites)),
        [f"{s} ({_plural(frequency[s]['near_ties'], 'near tie')})" for s in sites],
    )
    axes.set(title="How often each combination was lazy (share of rounds)")
    figure.colorbar(image, ax=axes, label="share of rounds", shrink=0.8)
    if not used:
        _empty_note(axes, "no lazy combination reported")
    return _save(figure, path)


def plot_weight_profile(
    path: Path, sites: list[str], profile: dict[str, dict], modalities: list[str]
) -> Path:
    """Per site: mean DWFuse weight per modality (bars; hatched and pale = imputed, the
    site holds none of it) next to the share of training samples holding it (black ticks)."""
    colours = combination_colours(modalities)
    columns = min(3, len(sites))
    rows = math.ceil(len(sites) / columns)
    figure = Figure(figsize=(3.6 * columns + 1.6, 3.0 * rows), layout="constrained")
    panels = figure.subplots(rows, columns, squeeze=False, sharey=True)
    for position, site in enumerate(sites):
        axes = panels[position // columns][position % columns]
        for index, modality in enumerate(modalities):
            entry = profile[site][modality]
            imputed = entry["observed"] is False
            if entry["mean_weight"] is not None:
                axes.bar(index, entry["mean_weight"], color=colours[modality],
                         alpha=0.35 if imputed else 1.0, hatch="//" if imputed else None,
                         edgecolor=colours[modality])  # fmt: skip
            if entry["share"] is not None:
                axes.plot([index - 0.4, index + 0.4], [entry["share"]] * 2, color="black", lw=2.5)
        axes.set_xticks(range(len(modalities)), modalities)
        axes.set(title=site, ylim=(0.0, 1.05))
    for position in range(len(sites), rows * columns):
        panels[position // columns][position % columns].set_visible(False)
    panels[0][0].set_ylabel("weight / share of samples")
    figure.suptitle("Test-time DWFuse confidence weight (mean over rounds) and availability")
    figure.legend(
        handles=[
            Patch(facecolor="grey", label="test-time confidence weight (observed)"),
            Patch(facecolor="grey", alpha=0.35, hatch="//", label="weight of imputed modality"),
            Line2D([], [], color="black", lw=2.5, label="share of samples holding it"),
        ],
        loc="outside lower center",
        ncols=3,
        fontsize="small",
    )
    return _save(figure, path)


def write_plots(out_dir: Path, data: dict) -> dict[str, Path]:
    """Every figure of the report from its data section; returns name -> path."""
    sites, rounds = data["sites"], data["rounds"]
    near_tie = {s: [bool(c and c["near_tie"]) for c in data["lazy_calls"][s]] for s in sites}
    observed = {s: data["observed"][s]["modalities"] for s in sites}
    return {
        "auroc_per_round": plot_auroc(
            out_dir / AUROC_PNG, rounds, data["local_val_auroc"], data["round_metrics"]
        ),
        "lazy_combination_timeline": plot_lazy_timeline(
            out_dir / TIMELINE_PNG,
            sites,
            rounds,
            data["lazy_timeline"],
            data["combinations"],
            near_tie,
        ),
        "lazy_frequency": plot_lazy_frequency(
            out_dir / FREQUENCY_PNG, sites, data["lazy_frequency"], data["combinations"]
        ),
        "modality_weights": plot_modality_weights(
            out_dir / WEIGHTS_PNG,
            sites,
            rounds,
            data["dwfuse_weight_series"],
            data["modalities"],
            observed,
        ),
        "weight_profile": plot_weight_profile(
            out_dir / PROFILE_PNG, sites, data["weight_profile"], data["modalities"]
        ),
        "availability": plot_availability(
            out_dir / AVAILABILITY_PNG,
            sites,
            data["availability"],
            data["combinations"],
            data["min_count"],
        ),
    }

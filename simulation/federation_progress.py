"""What `omnifuse federate` shows while `flwr run` works: one line per finished round (round k
of N, the global test AUROC, which sites replied, which failed or were rejected), a progress
bar, and a summary table at the end.

Everything is read from the files the ServerApp rewrites after each round, so the display
never talks to Flower: ``metrics.json`` (per-round metrics, failures and rejections) and
``audit.json`` (one row per site that replied, with its update status).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from simulation.site_names import SiteLegend


@dataclass(frozen=True)
class RoundProgress:
    """One finished round as the run directory tells it."""

    round: int
    auroc: float | None
    accepted: tuple[str, ...] = ()
    rejected: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    seconds: float | None = None


def _read_json(path: Path) -> object:
    """The file's JSON, or None while it is absent or half-written (the server rewrites it)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _auroc(entry: dict) -> float | None:
    """The global model's test AUROC of a round (server-side evaluation), else the sites'
    weighted validation AUROC."""
    for group in ("server", "evaluate_clients"):
        metrics = entry.get(group) or {}
        for key in sorted(metrics):
            value = metrics[key]
            if "auroc" in key and isinstance(value, int | float) and 0 <= value <= 1:
                return float(value)
    return None


def _problem_name(problem: dict) -> str:
    return str(problem.get("site") or f"node {problem.get('node', '?')}")


def read_rounds(run_dir: Path) -> list[RoundProgress]:
    """Every round recorded in ``run_dir`` so far, in order (empty before round 1)."""
    history = _read_json(Path(run_dir) / "metrics.json")
    rows = _read_json(Path(run_dir) / "audit.json")
    if not isinstance(history, dict):
        return []
    replies: dict[int, list[dict]] = {}
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict) and isinstance(row.get("round"), int):
            replies.setdefault(row["round"], []).append(row)
    rounds = []
    for key, entry in history.items():
        if not (key.isdigit() and isinstance(entry, dict)):
            continue
        number = int(key)
        mine = replies.get(number, [])
        problems = entry.get("failed_or_rejected") or []
        rounds.append(
            RoundProgress(
                round=number,
                auroc=_auroc(entry),
                accepted=tuple(
                    sorted(r["site"] for r in mine if r.get("update_status") == "accepted")
                ),
                rejected=tuple(
                    sorted(_problem_name(p) for p in problems if p.get("status") == "rejected")
                ),
                failed=tuple(
                    sorted(_problem_name(p) for p in problems if p.get("status") != "rejected")
                ),
                seconds=entry.get("wall_seconds"),
            )
        )
    return sorted(rounds, key=lambda r: r.round)


def _auroc_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def round_line(done: RoundProgress, total: int, legend: SiteLegend) -> str:
    """``round 2 of 5  AUROC 0.812  replied: A, B  failed: C`` (names abbreviated by legend)."""
    parts = [f"round {done.round} of {total}", f"AUROC {_auroc_text(done.auroc)}"]
    parts.append("replied: " + (", ".join(legend.short(s) for s in done.accepted) or "none"))
    for label, names in (("rejected", done.rejected), ("failed", done.failed)):
        if names:
            parts.append(f"{label}: " + ", ".join(legend.short(s) for s in names))
    return "  ".join(parts)


@dataclass
class FederationProgress:
    """Polled by `run_federation` about once a second; prints each newly finished round.

    Rounds already in ``run_dir`` when it starts (a resumed run) are not announced again,
    unless the server rewrites them (a fresh run into an old run dir).
    """

    run_dir: Path
    total_rounds: int
    sites: list[str]
    console: Console
    seen: dict[int, RoundProgress] = field(default_factory=dict)
    _progress: Progress | None = None
    _task: int | None = None

    def __post_init__(self) -> None:
        self.legend = SiteLegend.for_width(self.sites, self.console.width)
        self.seen = {r.round: r for r in read_rounds(self.run_dir)}

    def __enter__(self) -> FederationProgress:
        self._progress = Progress(
            TextColumn("[bold]federated rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("rounds", total=self.total_rounds)
        if self.legend.abbreviated:
            self.console.print(self.legend.text())
        return self

    def __exit__(self, *_: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self) -> None:
        for done in read_rounds(self.run_dir):
            if self.seen.get(done.round) == done:
                continue
            self.seen[done.round] = done
            self.console.print(round_line(done, self.total_rounds, self.legend))
            if self._progress is not None and self._task is not None:
                self._progress.update(self._task, completed=min(done.round, self.total_rounds))


def summary_table(rounds: list[RoundProgress], legend: SiteLegend) -> Table:
    """Per round: AUROC, seconds, sites accepted / rejected / failed (abbreviated names)."""
    table = Table(title="Federation summary", expand=False)
    table.add_column("round", justify="right")
    table.add_column("AUROC", justify="right")
    table.add_column("s", justify="right")
    for column in ("replied", "rejected", "failed"):
        table.add_column(column, overflow="fold")
    for done in rounds:
        table.add_row(
            str(done.round),
            _auroc_text(done.auroc),
            "-" if done.seconds is None else f"{done.seconds:.0f}",
            *(
                ", ".join(legend.short(s) for s in names) or "-"
                for names in (done.accepted, done.rejected, done.failed)
            ),
        )
    return table

"""`omnifuse experiment CONFIG.toml --out DIR`: a grid of methods x scenarios x seeds.

Each cell (method, scenario variant, seed) writes ``DIR/cells/<method>/<variant>/seed<k>/
result.json`` with its full config and result. A rerun skips every cell whose result.json
holds the same config (a changed config reruns that cell), so an interrupted experiment
resumes where it stopped. At the end ``DIR/results.json`` holds the config, every cell and
the summary (``simulation.experiment_report``), and ``DIR/report.md`` the tables and plots.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from rich.console import Console

DESCRIPTION = "run an experiment grid (methods x scenarios x seeds) with a report"
RESULT_FILE = "result.json"
RESULTS_FILE = "results.json"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `experiment` on the `omnifuse` command parser."""
    experiment = commands.add_parser("experiment", help=DESCRIPTION, description=__doc__)
    experiment.add_argument("config", help="experiment config TOML (docs/EXPERIMENTS.md)")
    experiment.add_argument("--out", required=True, help="experiment folder (resumable)")
    experiment.add_argument(
        "--scenario-dir",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="use DIR for the config's scenario NAME (repeatable)",
    )
    experiment.add_argument(
        "--dry-run", action="store_true", help="validate, list the cells and load no data"
    )
    experiment.set_defaults(handler=run)


def _scenario_dirs(values: list[str]) -> dict[str, Path]:
    dirs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--scenario-dir {value!r}: expected NAME=DIR")
        dirs[name] = Path(path)
    return dirs


def run(args: argparse.Namespace) -> int:
    from simulation.experiment_config import cells, load_experiment_config

    config = load_experiment_config(args.config, _scenario_dirs(args.scenario_dir))
    console = Console()
    if args.dry_run:
        for entry in config.scenarios:
            if entry.dir is not None and not (entry.dir / "scenario.json").is_file():
                raise FileNotFoundError(
                    f"scenario '{entry.name}': {entry.dir / 'scenario.json'} not found "
                    "(make one with `omnifuse partition` and `omnifuse prepare`)"
                )
        planned = cells(config)
        console.print(f"experiment '{config.name}': {len(planned)} cells")
        for cell in planned:
            console.print(f"  {cell.key} ({cell.method.mode})")
        return 0
    run_experiment(config, Path(args.out), console)
    return 0


def _cell_dir(out: Path, cell) -> Path:
    return out / "cells" / cell.method.name / cell.variant.key / f"seed{cell.seed}"


def _finished(path: Path, fingerprint: dict) -> dict | None:
    """The stored result when ``path`` holds this cell's finished result, else None."""
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return stored if stored.get("config") == fingerprint and "result" in stored else None


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    )


def run_experiment(config, out: Path, console: Console | None = None) -> dict:
    """Run (or resume) every cell, then write results.json, report.md and the plots."""
    from simulation import experiment_cells
    from simulation.experiment_config import cells

    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    planned = cells(config)
    prepared, data_cache, results = {}, {}, []
    counts = {"total": len(planned), "trained": 0, "skipped": 0}
    with _progress() as progress:
        task = progress.add_task(f"experiment {config.name}", total=len(planned))
        for cell in planned:
            progress.update(task, description=cell.key)
            path = _cell_dir(out, cell) / RESULT_FILE
            fingerprint = cell.fingerprint(config)
            stored = _finished(path, fingerprint)
            if stored is None:
                data_key = (cell.variant.key, cell.seed)
                if data_key not in data_cache:
                    data_cache.clear()  # one variant's data in memory at a time
                    name = cell.variant.scenario
                    if name not in prepared:
                        entry = next(s for s in config.scenarios if s.name == name)
                        prepared[name] = experiment_cells.load_prepared(entry, out)
                    data_cache[data_key] = experiment_cells.variant_data(
                        prepared[name], cell.variant, cell.seed
                    )
                result = experiment_cells.run_cell(cell, data_cache[data_key], config)
                stored = {"config": fingerprint, "result": _json_safe(result)}
                path.parent.mkdir(parents=True, exist_ok=True)
                temp = path.with_suffix(".tmp")
                temp.write_text(json.dumps(stored, indent=2), encoding="utf-8")
                temp.replace(path)
                counts["trained"] += 1
            else:
                counts["skipped"] += 1
            results.append(_entry(cell, stored))
            progress.advance(task)
    return _write_outputs(config, out, results, counts, console)


def _entry(cell, stored: dict) -> dict:
    return {
        "cell": {
            "key": cell.key,
            "method": cell.method.name,
            "mode": cell.method.mode,
            "variant_key": cell.variant.key,
            "variant": cell.variant.model_dump(mode="json"),
            "seed": cell.seed,
        },
        "config": stored["config"],
        "result": {k: (math.nan if v is None else v) for k, v in stored["result"].items()},
    }


def _write_outputs(config, out: Path, results: list[dict], counts: dict, console) -> dict:
    from simulation.experiment_report import REPORT_FILE, markdown, summarize, write_plots

    summary = summarize(config, results)
    plots = write_plots(config, summary, out)
    document = {
        "config": config.model_dump(mode="json"),
        "cells": counts,
        "results": results,
        "summary": summary,
    }
    (out / RESULTS_FILE).write_text(json.dumps(_json_safe(document), indent=2), encoding="utf-8")
    (out / REPORT_FILE).write_text(markdown(config, summary, plots, counts), encoding="utf-8")
    console.print(
        f"experiment '{config.name}': {counts['trained']} cells trained, {counts['skipped']} "
        f"finished before; report {out / REPORT_FILE}"
    )
    return document

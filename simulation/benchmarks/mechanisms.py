"""The mechanism suite: does each OmniFuse mechanism do what it claims, where it should?

Run ``python -m simulation.benchmarks.mechanisms [--quick] [--seeds N] --out DIR``. It writes
DIR/mechanisms.json (every MechanismResult, the run's settings and the machine facts),
DIR/mechanisms.md (the verdict table) and two plots (``mechanisms_report``), and prints the
table.

Scenarios (each states its expected sign before it runs; see each module's docstring):
- central, from this package: ``mechanisms_central_imputation`` (CRA imputation of a modality
  missing at test), ``mechanisms_central_dwfuse`` (per-sample reliability),
  ``mechanisms_central_tla`` (an under-trained slow modality);
- federated, from ``simulation.benchmarks.mechanisms_federated`` *if that module exists*:
  the suite calls ``federated_scenarios(quick: bool, seeds: list[int], progress:
  CellProgress) -> list[MechanismResult]`` and appends its results. Without the module the
  suite runs the central scenarios alone and says so in the JSON and the report
  (``federated.status``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console

from simulation.benchmarks import (
    mechanisms_central_dwfuse,
    mechanisms_central_imputation,
    mechanisms_central_tla,
)
from simulation.benchmarks.mechanism_result import MechanismResult
from simulation.benchmarks.mechanisms_central import suite_settings
from simulation.benchmarks.mechanisms_progress import CellProgress, RichCellProgress
from simulation.benchmarks.mechanisms_report import console_table, markdown_report, write_plots

FEDERATED_MODULE = "simulation.benchmarks.mechanisms_federated"
FULL_SEEDS = 8
QUICK_SEEDS = 2
ScenarioSource = Callable[[bool, list[int], CellProgress], list[MechanismResult]]


def central_scenarios(
    quick: bool, seeds: list[int], progress: CellProgress
) -> list[MechanismResult]:
    """Imputation, DWFuse and TLA scenarios, trained centrally with the shipped ``fit``."""
    settings = suite_settings(quick, seeds)
    modules = (mechanisms_central_imputation, mechanisms_central_dwfuse, mechanisms_central_tla)
    progress.plan(sum(module.planned_cells(seeds) for module in modules))
    results = mechanisms_central_imputation.imputation_scenarios(settings, progress)
    results += mechanisms_central_dwfuse.dwfuse_scenarios(settings, progress)
    results += mechanisms_central_tla.tla_scenarios(settings, progress)
    return results


def federated_source() -> ScenarioSource | None:
    """``mechanisms_federated.federated_scenarios`` when that module exists, else None."""
    if importlib.util.find_spec(FEDERATED_MODULE) is None:
        return None
    return importlib.import_module(FEDERATED_MODULE).federated_scenarios


def machine_facts() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def run_suite(
    quick: bool,
    seeds: list[int],
    progress: CellProgress,
    sources: dict[str, ScenarioSource | None] | None = None,
    command: str = "python -m simulation.benchmarks.mechanisms",
) -> tuple[dict, list[MechanismResult]]:
    """Run every scenario source; return the JSON payload and the results.

    ``sources``: name -> scenario function (default: central, and federated if present).
    """
    if sources is None:
        sources = {"central": central_scenarios, "federated": federated_source()}
    loadavg_start, wall, cpu = _loadavg(), time.perf_counter(), time.process_time()
    results: list[MechanismResult] = []
    for source in sources.values():
        if source is not None:
            results += source(quick, seeds, progress)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    federated = sources.get("federated")
    payload = {
        "benchmark": "mechanisms",
        "command": command,
        "quick": quick,
        "seeds": seeds,
        "settings": suite_settings(quick, seeds).model_dump(mode="json"),
        "federated": {
            "status": "included"
            if federated is not None
            else f"not run ({FEDERATED_MODULE} is absent)",
            "module": FEDERATED_MODULE,
        },
        "machine": machine_facts(),
        "timing": {
            "wall_seconds": wall,
            "cpu_seconds": cpu,
            "cpu_share": cpu / wall if wall > 0 else float("nan"),
            "loadavg_start": loadavg_start,
            "loadavg_end": _loadavg(),
        },
        "results": [r.model_dump(mode="json") for r in results],
    }
    return payload, results


def write_outputs(payload: dict, results: list[MechanismResult], out: Path) -> list[Path]:
    """mechanisms.json, mechanisms.md and the plots under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "mechanisms.json", out / "mechanisms.md"
    json_path.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")
    md_path.write_text(markdown_report(payload, results))
    return [json_path, md_path, *write_plots(results, out)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulation.benchmarks.mechanisms", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run (2 seeds)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds: expected a positive count, got {args.seeds}")
    torch.set_num_threads(args.threads)
    count = args.seeds or (QUICK_SEEDS if args.quick else FULL_SEEDS)
    console = Console()
    command = "python -m simulation.benchmarks.mechanisms " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    with RichCellProgress() as progress:
        payload, results = run_suite(args.quick, list(range(count)), progress, command=command)
    paths = write_outputs(payload, results, args.out)
    console.print(console_table(results))
    timing = payload["timing"]
    console.print(
        f"wall {timing['wall_seconds']:.0f} s, CPU {timing['cpu_seconds']:.0f} s, load "
        f"{timing['loadavg_start']} -> {timing['loadavg_end']}; wrote "
        + ", ".join(str(p) for p in paths)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

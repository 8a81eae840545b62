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
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from rich.console import Console

from simulation.benchmarks import (
    mechanisms_central_dwfuse,
    mechanisms_central_imputation,
    mechanisms_central_tla,
)
from simulation.benchmarks.mechanism_result import MechanismResult
from simulation.benchmarks.mechanisms_central import SeedValues, suite_settings
from simulation.benchmarks.mechanisms_progress import (
    CellProgress,
    QueueProgress,
    RichCellProgress,
    drain,
)
from simulation.benchmarks.mechanisms_report import console_table, markdown_report, write_plots

FEDERATED_MODULE = "simulation.benchmarks.mechanisms_federated"
FULL_SEEDS = 8
QUICK_SEEDS = 2
ScenarioSource = Callable[[bool, list[int], CellProgress], list[MechanismResult]]


SCENARIO_MODULES = {
    "imputation": mechanisms_central_imputation,
    "dwfuse": mechanisms_central_dwfuse,
    "tla": mechanisms_central_tla,
}


def central_scenarios(
    quick: bool, seeds: list[int], progress: CellProgress, jobs: int = 1
) -> list[MechanismResult]:
    """Imputation, DWFuse and TLA scenarios, trained centrally with the shipped ``fit``.

    The work splits into (scenario, seed) units; ``jobs`` > 1 runs them in that many worker
    processes (each with this process's torch thread count). Results are the same either
    way: every unit is seeded by its own seed, and units are merged in seed order.
    """
    progress.plan(sum(module.planned_cells(seeds) for module in SCENARIO_MODULES.values()))
    units = [(name, seed) for seed in seeds for name in SCENARIO_MODULES]
    if jobs <= 1:
        measured = [_measure_unit(name, quick, seed, progress) for name, seed in units]
    else:
        measured = _measure_in_workers(units, quick, progress, jobs)
    results: list[MechanismResult] = []
    for name, module in SCENARIO_MODULES.items():
        parts = [values for (unit, _), values in zip(units, measured, strict=True) if unit == name]
        results += module.summarise(SeedValues.merged(parts))
    return results


def _measure_unit(name: str, quick: bool, seed: int, progress: CellProgress) -> SeedValues:
    return SCENARIO_MODULES[name].measure(suite_settings(quick, [seed]), progress)


def _worker_unit(name: str, quick: bool, seed: int, queue) -> SeedValues:
    return _measure_unit(name, quick, seed, QueueProgress(queue))


def _measure_in_workers(
    units: list[tuple[str, int]], quick: bool, progress: CellProgress, jobs: int
) -> list[SeedValues]:
    """Run the units in ``jobs`` spawned processes; replay their progress here."""
    context = multiprocessing.get_context("spawn")
    with (
        context.Manager() as manager,
        ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=context,
            initializer=torch.set_num_threads,
            initargs=(torch.get_num_threads(),),
        ) as pool,
    ):
        queue = manager.Queue()
        futures = [pool.submit(_worker_unit, name, quick, seed, queue) for name, seed in units]
        while not all(future.done() for future in futures):
            drain(queue, progress, timeout=0.5)
        drain(queue, progress, timeout=0.0)
        return [future.result() for future in futures]


def federated_source() -> ScenarioSource | None:
    """``mechanisms_federated.federated_scenarios`` when that module exists, else None."""
    if importlib.util.find_spec(FEDERATED_MODULE) is None:
        return None
    return importlib.import_module(FEDERATED_MODULE).federated_scenarios


def default_sources(jobs: int = 1, part: str = "all") -> dict[str, ScenarioSource | None]:
    """Central (``jobs`` worker processes) and federated (if present); ``part`` keeps one."""
    sources: dict[str, ScenarioSource | None] = {
        "central": lambda q, s, p: central_scenarios(q, s, p, jobs=jobs),
        "federated": federated_source(),
    }
    if part == "all":
        return sources
    if part not in sources:
        raise ValueError(f"part: expected 'all', 'central' or 'federated', got {part!r}")
    return {name: source if name == part else None for name, source in sources.items()}


def machine_facts() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished worker processes (user + system)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


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
    jobs: int = 1,
) -> tuple[dict, list[MechanismResult]]:
    """Run every scenario source; return the JSON payload and the results.

    ``sources``: name -> scenario function (default: central, and federated if present).
    """
    if sources is None:
        sources = default_sources(jobs)
    loadavg_start, wall, cpu = _loadavg(), time.perf_counter(), _cpu_seconds()
    results: list[MechanismResult] = []
    for source in sources.values():
        if source is not None:
            results += source(quick, seeds, progress)
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    federated = sources.get("federated")
    absent = "not run (" + FEDERATED_MODULE + " is absent)"
    payload = {
        "benchmark": "mechanisms",
        "command": command,
        "quick": quick,
        "seeds": seeds,
        "jobs": jobs,
        "settings": suite_settings(quick, seeds).model_dump(mode="json"),
        "federated": {
            "status": "included"
            if federated is not None
            else (absent if federated_source() is None else "not run (only central asked)"),
            "module": FEDERATED_MODULE,
        },
        "machine": machine_facts(),
        "timing": {
            "wall_seconds": wall,
            "cpu_seconds": cpu,  # this process + its reaped workers
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
    parser.add_argument(
        "--jobs", type=int, default=1, help="worker processes for the central scenarios"
    )
    parser.add_argument(
        "--part",
        choices=["all", "central", "federated"],
        default="all",
        help="run only the central or the federated scenarios (default: all)",
    )
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
        payload, results = run_suite(
            args.quick,
            list(range(count)),
            progress,
            sources=default_sources(args.jobs, args.part),
            command=command,
            jobs=args.jobs,
        )
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

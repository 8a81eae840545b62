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
import signal
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
from simulation.benchmarks.mechanism_result import MechanismResult, merge_over_seeds
from simulation.benchmarks.mechanisms_central import SeedValues, suite_settings
from simulation.benchmarks.mechanisms_progress import (
    CellProgress,
    QueueProgress,
    RichCellProgress,
    drain,
)
from simulation.benchmarks.mechanisms_report import console_table, markdown_report, write_plots

FEDERATED_MODULE = "simulation.benchmarks.mechanisms_federated"
FULL_SEEDS = 6
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
    tasks = _central_tasks(quick, seeds, progress)
    return _central_results(tasks, run_tasks(tasks, progress, jobs))


def _central_tasks(quick: bool, seeds: list[int], progress: CellProgress) -> list[tuple]:
    progress.plan(sum(module.planned_cells(seeds) for module in SCENARIO_MODULES.values()))
    return [("central", (name, quick, seed)) for seed in seeds for name in SCENARIO_MODULES]


def _central_results(tasks: list[tuple], outputs: list) -> list[MechanismResult]:
    """Each scenario's summary over its per-seed units (in seed order)."""
    results: list[MechanismResult] = []
    for name, module in SCENARIO_MODULES.items():
        parts = [out for (_, args), out in zip(tasks, outputs, strict=True) if args[0] == name]
        results += module.summarise(SeedValues.merged(parts))
    return results


def _run_task(task: tuple, progress: CellProgress):
    """('central', (scenario, quick, seed)) -> SeedValues; ('federated', (quick, seeds))
    -> list[MechanismResult]."""
    kind, args = task
    if kind == "central":
        name, quick, seed = args
        return SCENARIO_MODULES[name].measure(suite_settings(quick, [seed]), progress)
    source = federated_source()
    if source is None:
        raise ValueError(f"federated task: {FEDERATED_MODULE} is absent")
    return source(*args, progress)


def _worker_task(task: tuple, queue):
    return _run_task(task, QueueProgress(queue))


def run_tasks(tasks: list[tuple], progress: CellProgress, jobs: int) -> list:
    """Run the tasks here (``jobs`` <= 1) or in ``jobs`` spawned processes, replaying their
    progress here; outputs in task order. Interrupted, it terminates its workers."""
    if jobs <= 1:
        return [_run_task(task, progress) for task in tasks]
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        pool = ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=context,
            initializer=torch.set_num_threads,
            initargs=(torch.get_num_threads(),),
        )
        try:
            queue = manager.Queue()
            futures = [pool.submit(_worker_task, task, queue) for task in tasks]
            while not all(future.done() for future in futures):
                drain(queue, progress, timeout=0.5)
            drain(queue, progress, timeout=0.0)
            outputs = [future.result() for future in futures]
        except BaseException:
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return outputs


def federated_source() -> ScenarioSource | None:
    """``mechanisms_federated.federated_scenarios`` when that module exists, else None."""
    if importlib.util.find_spec(FEDERATED_MODULE) is None:
        return None
    return importlib.import_module(FEDERATED_MODULE).federated_scenarios


def _default_run(
    quick: bool, seeds: list[int], progress: CellProgress, jobs: int, part: str
) -> tuple[list[MechanismResult], str]:
    """Central and federated scenarios in one pool (the federated tasks first: they are the
    longest), one task per (scenario, seed) and one federated task per seed; returns the
    results and the federated status. The federated per-seed results are merged by
    ``merge_over_seeds`` (per-seed values concatenated, CI recomputed)."""
    if part not in ("all", "central", "federated"):
        raise ValueError(f"part: expected 'all', 'central' or 'federated', got {part!r}")
    tasks: list[tuple] = []
    federated = part != "central" and federated_source() is not None
    if federated:  # one task per seed, merged below (with jobs > 1 they run side by side)
        tasks += [("federated", (quick, [seed])) for seed in seeds]
    central = _central_tasks(quick, seeds, progress) if part != "federated" else []
    outputs = run_tasks(tasks + central, progress, jobs)
    results = _central_results(central, outputs[len(tasks) :]) if central else []
    if federated:
        results += merge_over_seeds(outputs[: len(tasks)])
        return results, "included"
    if federated_source() is None:
        return results, f"not run ({FEDERATED_MODULE} is absent)"
    return results, "not run (--part central)"


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
    part: str = "all",
) -> tuple[dict, list[MechanismResult]]:
    """Run the scenarios; return the JSON payload and the results.

    Default: the central scenarios and, if its module exists, the federated ones (``part``
    keeps one of them), in ``jobs`` processes. ``sources`` (name -> scenario function, run
    in this process) replaces them, e.g. in tests.
    """
    loadavg_start, wall, cpu = _loadavg(), time.perf_counter(), _cpu_seconds()
    if sources is None:
        results, status = _default_run(quick, seeds, progress, jobs, part)
    else:
        results = []
        for source in sources.values():
            if source is not None:
                results += source(quick, seeds, progress)
        status = "included" if sources.get("federated") is not None else "not run"
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    payload = {
        "benchmark": "mechanisms",
        "command": command,
        "quick": quick,
        "seeds": seeds,
        "jobs": jobs,
        "settings": suite_settings(quick, seeds).model_dump(mode="json"),
        "federated": {"status": status, "module": FEDERATED_MODULE},
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
    # A SIGTERM unwinds like Ctrl-C, so that run_tasks terminates its worker processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
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
            command=command,
            jobs=args.jobs,
            part=args.part,
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

"""Site-data loading: what a site pays, per Flower message, to load its data.

    python -m simulation.benchmarks.site_loading --scenario DIR [--repeats 10] [--threads 1]
        [--sites hospital_a ...] [--code DIR] [--out benchmark_results/site_loading.json]
    python -m simulation.benchmarks.site_loading --quick [--work DIR]   (CI: a tiny scenario)

Every train and evaluate message makes the ClientApp call ``load_site_datasets`` (the train
and val splits; reported as ``load-seconds``). Per site, in a fresh Python process (imports
done first, not timed):

* **cold**: the first load in the process: it maps and SHA-256-hashes every shard it uses
  and parses the shard headers;
* **warm**: ``--repeats`` further loads, the previous datasets dropped first (as a ClientApp
  drops them after its reply): median and minimum wall seconds, and the median CPU seconds
  of the process (less inflated than wall time when other work shares the cores);
* **memory**: the process's RSS and its anonymous memory after the last load minus before
  the first. RSS counts the pages of mapped shards the loads touched (hashing touches all of
  them): page cache, shared between processes and reclaimable; anonymous memory is the
  process's own (EHR and image features, masks, indexes).

``--threads`` sets torch's threads in the measuring process (default 1: a simulated ClientApp
gets one CPU and one torch thread, docs/SCALING.md). ``--code DIR`` measures the
``omnifuse_model`` of another checkout (e.g. the commit before a change) with this script,
for before/after figures. ``--quick`` builds a tiny scenario first (``synth`` ->
``partition`` -> ``prepare``, as ``simulation.benchmarks.gpu_round --quick``). The 1-minute
load average is recorded before and after: timings on a shared machine are inflated by
other work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

REPOSITORY = Path(__file__).resolve().parents[2]
MIB = 2**20


def _memory() -> dict[str, int | None]:
    """This process's resident and anonymous memory in bytes (None off Linux)."""
    found: dict[str, int | None] = {"rss": None, "anon": None}
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon"):
            found["rss" if name == "VmRSS" else "anon"] = int(value.split()[0]) * 1024
    return found


def _load_average() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def measure_site(scenario_dir: Path, site_path: Path, repeats: int, threads: int) -> dict:
    """Load one site cold, then ``repeats`` times warm, in this process (see the module
    docstring); the ``omnifuse_model`` imported is the first on ``sys.path``."""
    import torch

    from omnifuse_model.scenario import Scenario
    from omnifuse_model.site_config import load_site_config
    from omnifuse_model.site_data import load_site_datasets

    torch.set_num_threads(threads)
    model = Scenario.load(scenario_dir).model
    site = load_site_config(site_path)
    before = _memory()
    started, cpu = time.perf_counter(), time.process_time()
    datasets = load_site_datasets(site, model)
    cold, cold_cpu = time.perf_counter() - started, time.process_time() - cpu
    warm, warm_cpu = [], []
    for _ in range(repeats):
        datasets = None  # the previous message's data is gone before the next one arrives
        started, cpu = time.perf_counter(), time.process_time()
        datasets = load_site_datasets(site, model)
        warm.append(time.perf_counter() - started)
        warm_cpu.append(time.process_time() - cpu)
    after = _memory()
    return {
        "site": site.name,
        "train_stays": len(datasets.train),
        "val_stays": len(datasets.val),
        "cold_seconds": cold,
        "cold_cpu_seconds": cold_cpu,
        "warm_seconds": warm,
        "warm_seconds_median": statistics.median(warm),
        "warm_seconds_min": min(warm),
        "warm_cpu_seconds_median": statistics.median(warm_cpu),
        "rss_increase_bytes": _difference(after["rss"], before["rss"]),
        "anon_increase_bytes": _difference(after["anon"], before["anon"]),
        "torch_threads": torch.get_num_threads(),
        "omnifuse_model": str(Path(sys.modules["omnifuse_model"].__file__).parent.parent),
    }


def _difference(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


def _measure_in_child(args: argparse.Namespace, site_path: Path) -> dict:
    """:func:`measure_site` in a fresh interpreter (so the first load is cold)."""
    command = [
        sys.executable,
        "-m",
        "simulation.benchmarks.site_loading",
        "--child",
        str(site_path),
    ]
    command += ["--scenario", str(args.scenario), "--repeats", str(args.repeats)]
    command += ["--threads", str(args.threads)] + (["--code", str(args.code)] if args.code else [])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), env.get("PYTHONPATH")]))
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"measuring {site_path} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _site_paths(scenario_dir: Path, names: list[str] | None) -> list[Path]:
    """The scenario's site configs (all, or those of the sites ``names``)."""
    from omnifuse_model.scenario import Scenario
    from omnifuse_model.site_config import load_site_config

    paths = [Path(p) for p in Scenario.load(scenario_dir).site_configs]
    paths = [p if p.is_absolute() else scenario_dir / p for p in paths]
    if names is None:
        return paths
    by_name = {load_site_config(path).name: path for path in paths}
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise ValueError(f"--sites {unknown}: not in {scenario_dir} (sites: {sorted(by_name)})")
    return [by_name[name] for name in names]


def build_quick_scenario(work: Path, console: Console) -> Path:
    """A tiny prepared MIMIC-format scenario under ``work`` (reused when present)."""
    from simulation.benchmarks.gpu_round import build_scenario

    options = argparse.Namespace(
        stays=60, seed=0, image_size=32, sites=2, d=8, workers=0, skip_prepare=False
    )
    build_scenario(work, options, console)
    return work / "scenario"


def _table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    table.add_column("site", no_wrap=True)
    for column in ("stays", "cold s", "warm s med", "warm s min", "warm CPU s", "RSS +MiB"):
        table.add_column(column, justify="right")
    table.add_column("anon +MiB", justify="right")

    def mib(value: int | None) -> str:
        return "-" if value is None else f"{value / MIB:.1f}"

    for row in rows:
        table.add_row(
            row["site"], str(row["train_stays"] + row["val_stays"]), f"{row['cold_seconds']:.3f}",
            f"{row['warm_seconds_median']:.4f}", f"{row['warm_seconds_min']:.4f}",
            f"{row['warm_cpu_seconds_median']:.4f}",
            mib(row["rss_increase_bytes"]), mib(row["anon_increase_bytes"]),
        )  # fmt: skip
    return table


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulation.benchmarks.site_loading")
    parser.add_argument("--scenario", type=Path, help="a prepared scenario folder")
    parser.add_argument("--quick", action="store_true", help="CI: build and load a tiny one")
    parser.add_argument("--work", type=Path, help="--quick: build it here (default: a temp dir)")
    parser.add_argument("--sites", nargs="+", help="only these sites (default: every site)")
    parser.add_argument("--repeats", type=int, default=10, help="warm loads per site")
    parser.add_argument("--threads", type=int, default=1, help="torch threads when loading")
    parser.add_argument("--code", type=Path, help="measure the omnifuse_model of this checkout")
    parser.add_argument("--out", type=Path, default=Path("benchmark_results/site_loading.json"))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    return parser


def run(args: argparse.Namespace, paths: list[Path], console: Console) -> dict:
    """Measure the sites of ``paths`` (their configs) in turn; the JSON result."""
    load_before = _load_average()
    rows = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=True) as bars:
        task = bars.add_task("sites (a fresh process each)", total=len(paths))
        for path in paths:
            rows.append(_measure_in_child(args, path))
            bars.advance(task)
    return {
        "benchmark": "site-loading",
        "scenario": str(args.scenario),
        "code": str(args.code or REPOSITORY),
        "repeats": args.repeats,
        "threads": args.threads,
        "cores": os.cpu_count(),
        "load_average_1min": {"before": load_before, "after": _load_average()},
        "sites": rows,
        "cold_seconds_mean": statistics.fmean(row["cold_seconds"] for row in rows),
        "warm_seconds_median_mean": statistics.fmean(row["warm_seconds_median"] for row in rows),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child is not None:  # the measuring process
        if args.code is not None:
            sys.path.insert(0, str(args.code.resolve()))
        print(json.dumps(measure_site(args.scenario, args.child, args.repeats, args.threads)))
        return 0
    console = Console()
    if args.repeats < 1 or args.threads < 1:
        console.print("[red]--repeats and --threads must be at least 1[/red]")
        return 2
    with tempfile.TemporaryDirectory(prefix="omnifuse-loading-") as tmp:
        if args.quick:
            args.scenario = build_quick_scenario(args.work or Path(tmp), console)
            args.repeats = min(args.repeats, 3)
        if args.scenario is None:
            console.print("[red]--scenario DIR (a prepared scenario) or --quick[/red]")
            return 2
        args.scenario = args.scenario.resolve()
        try:
            paths = _site_paths(args.scenario, args.sites)
        except ValueError as error:
            console.print(f"[red]{error}[/red]")
            return 2
        result = run(args, paths, console)
    result["argv"] = sys.argv[1:] if argv is None else argv
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    load = result["load_average_1min"]
    title = (
        f"Site loading (train+val, {result['threads']} torch thread(s), {result['repeats']} "
        f"warm repeats; load average {load['before']} -> {load['after']})"
    )
    console.print(_table(result["sites"], title))
    console.print(f"code: {result['code']}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

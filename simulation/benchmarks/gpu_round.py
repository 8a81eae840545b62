"""One machine, one GPU: a full-MIMIC-sized synthetic dataset and federated rounds of 10 sites.

    python -m simulation.benchmarks.gpu_round --work DIR [--stays 20000] [--sites 10]
        [--rounds 2] [--device cuda] [--out benchmark_results/gpu_round.json]
    python -m simulation.benchmarks.gpu_round --quick --device cpu ...   (CI: tiny, on CPU)

Steps (each timed): ``omnifuse synth`` (the synthetic MIMIC writer), ``partition`` into
``--sites`` hospitals with the paper-size model (d 128), ``prepare`` (frozen backbones on
the device: site configs say ``device = "auto"``), then ``--rounds`` FedAvg rounds in this
process: every site in turn loads its data (memory-mapped token states), starts from the
global weights, trains ``--local-epochs`` on the device with bfloat16 autocast
(``TrainConfig.mixed_precision``; CUDA only) and hands back its float32 state; the states are
averaged weighted by training samples. Sites take turns on the one device, as Flower's
simulation engine runs them with ``num-gpus = 1`` per client; Flower's messaging is not in
these figures (``simulation.benchmarks.scale`` measures it on CPU).

Reported per round: wall seconds (device synchronised), seconds loading site data, seconds
training, and the device's peak allocated and reserved memory (``torch.cuda`` counters;
None on CPU) and, from the operating system, this process's peak RSS. Re-running with the
same ``--work`` reuses the data and the feature caches (``--skip-prepare``: without checking
them again).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from omnifuse_model.config import TrainConfig
from omnifuse_model.model import OmniFuse
from omnifuse_model.scenario import Scenario
from omnifuse_model.site_config import load_site_config
from omnifuse_model.site_data import load_site_datasets
from omnifuse_model.training import fit
from simulation.partition import PartitionConfig, default_site_plans, partition
from simulation.preparation import prepare_scenario as prepare
from simulation.synthetic_mimic.writer import SyntheticMimicConfig, write_synthetic_mimic


def _timed(timings: dict[str, float], key: str, action):
    started = time.perf_counter()
    result = action()
    timings[key] = time.perf_counter() - started
    return result


def build_scenario(work: Path, args: argparse.Namespace, console: Console) -> dict[str, float]:
    """Synthetic data, partition and prepared caches under ``work`` (reused when present)."""
    timings: dict[str, float] = {}
    data, scenario_dir = work / "data", work / "scenario"
    if not (data / "synthetic_summary.json").is_file():
        config = SyntheticMimicConfig(
            num_stays=args.stays, seed=args.seed, image_size=args.image_size
        )
        _timed(timings, "synth", lambda: write_synthetic_mimic(config, data))
    if not (scenario_dir / "scenario.json").is_file():
        plans = default_site_plans(args.sites, seed=args.seed)
        config = PartitionConfig(data_dir=data, sites=plans, seed=args.seed, d=args.d)
        _timed(timings, "partition", lambda: partition(config, scenario_dir, console))
    if not args.skip_prepare:
        _timed(timings, "prepare", lambda: prepare(scenario_dir, console, args.workers))
    return timings


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _average(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict:
    total = float(sum(weights)) or 1.0
    return {
        key: sum(state[key].float() * (w / total) for state, w in zip(states, weights, strict=True))
        for key in states[0]
    }


def run_rounds(scenario_dir: Path, args: argparse.Namespace, console: Console) -> list[dict]:
    """``args.rounds`` FedAvg rounds over every site of the scenario on ``args.device``."""
    device = torch.device(args.device)
    scenario = Scenario.load(scenario_dir)
    sites = [load_site_config(path) for path in scenario.site_configs]
    model = OmniFuse(scenario.model).to(device)
    global_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    train_config = TrainConfig(
        epochs=args.local_epochs, batch_size=args.batch_size, device=args.device,
        mixed_precision=True, patience=0, progress=False, bootstrap_samples=0, seed=args.seed,
    )  # fmt: skip
    rows = []
    for round_id in range(1, args.rounds + 1):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _synchronize(device)
        started, load, train = time.perf_counter(), 0.0, 0.0
        states, weights = [], []
        for site in sites:
            clock = time.perf_counter()
            datasets = load_site_datasets(site, scenario.model)
            load += time.perf_counter() - clock
            clock = time.perf_counter()
            model.load_state_dict(global_state)
            fit(model, datasets.train, None, train_config, keep_best=False)
            _synchronize(device)
            train += time.perf_counter() - clock
            states.append({k: v.detach().cpu() for k, v in model.state_dict().items()})
            weights.append(len(datasets.train))
        global_state = _average(states, weights)
        wall = time.perf_counter() - started
        cuda = device.type == "cuda"
        rows.append(
            {
                "round": round_id,
                "wall_seconds": wall,
                "load_seconds": load,
                "train_seconds": train,
                "train_samples": sum(weights),
                "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else None,
            }
        )
        console.print(f"round {round_id}: {wall:.1f} s ({load:.2f} s loading)")
    return rows


def _table(rows: list[dict]) -> Table:
    table = Table(title="GPU rounds (sites in turn on one device, bfloat16 autocast)")
    for column in ("round", "wall s", "load s", "train s", "samples", "peak alloc GiB"):
        table.add_column(column, justify="right")
    for row in rows:
        peak = row["peak_allocated_bytes"]
        table.add_row(
            str(row["round"]), f"{row['wall_seconds']:.1f}", f"{row['load_seconds']:.2f}",
            f"{row['train_seconds']:.1f}", str(row["train_samples"]),
            "-" if peak is None else f"{peak / 2**30:.2f}",
        )  # fmt: skip
    return table


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulation.benchmarks.gpu_round")
    parser.add_argument("--work", required=True, help="data, scenario and caches (reused)")
    parser.add_argument("--stays", type=int, default=20000)
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--d", type=int, default=128, help="model width (paper: 128)")
    parser.add_argument("--workers", type=int, default=4, help="prepare's DataLoader workers")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny: 60 stays, 2 sites, 1 round")
    parser.add_argument(
        "--skip-prepare", action="store_true", help="the caches are prepared: do not re-check"
    )
    parser.add_argument("--out", default="benchmark_results/gpu_round.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        console.print(f"[red]--device {args.device}: no CUDA device here; use --device cpu[/red]")
        return 2
    if args.quick:
        args.stays, args.sites, args.rounds, args.image_size, args.workers = 60, 2, 1, 32, 0
    work = Path(args.work).resolve()
    timings = build_scenario(work, args, console)
    rows = run_rounds(work / "scenario", args, console)
    result = {
        "benchmark": "gpu-round",
        "argv": sys.argv[1:] if argv is None else argv,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "stays": args.stays,
        "sites": args.sites,
        "local_epochs": args.local_epochs,
        "step_seconds": timings,
        "rounds": rows,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    console.print(_table(rows))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

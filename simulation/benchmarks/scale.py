"""Scale benchmark: memory, time per round, data-loading share and fixed cost per client.

    python -m simulation.benchmarks.scale mimic --scenario DIR [--rounds 2] [--client-cpus N]
    python -m simulation.benchmarks.scale sites [--sites 10 100] [--rounds 3] [--client-cpus 2 1]
    python -m simulation.benchmarks.scale ... --quick      (CI: tiny, seconds of training)

``mimic``: a prepared MIMIC-format scenario (``omnifuse synth`` -> ``partition`` ->
``prepare``, see docs/SCALING.md), federated through the real Flower simulation engine.
``sites``: feature-level synthetic scenarios (``simulation.scenarios``) of N small sites,
once per (N, CPUs reserved per client).

Every run is wrapped in a :class:`~simulation.benchmarks.scale_memory.TreeMemorySampler`
(the whole tree: SuperLink, ServerApp, simulation engine, Ray, every ClientApp; 0.5 s). Per
round, from the ServerApp's ``metrics.json``: ``wall_seconds`` (the server's round clock:
train phase, federated evaluation, server-side test evaluation, checkpoint), the sites'
``train-seconds`` and ``load-seconds`` (sum and maximum over sites; load = the ClientApp
reading its site data for the train message). Derived:

* load share = sum of load seconds / sum of (load + train) seconds of the round's sites;
* fixed cost per client and round = (wall - slowest path of client training) / sites, where
  the slowest path is the summed training seconds divided by the clients that run at once
  (exact when they run one at a time; with two at once the sum split evenly, a lower bound
  on the real critical path, so the fixed cost is an upper bound). It holds everything that
  is not local training: messages, (de)serialisation, the evaluate round trip, aggregation,
  checkpointing and the server's test evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from omnifuse_model.scenario import Scenario
from simulation.benchmarks.scale_memory import TreeMemorySampler
from simulation.benchmarks.scale_report import print_runs
from simulation.federation import run_federation
from simulation.scenarios import write_feature_scenario

CORES = os.cpu_count() or 1
DEFAULT_CLIENT_CPUS = 1


def concurrent_clients(client_cpus: int | None, sites: int) -> int:
    """How many ClientApps Ray runs at once: cores // CPUs per client (Flower default 2)."""
    return max(1, min(sites, CORES // (client_cpus or 2)))


def round_rows(history: dict, sites: int, concurrent: int) -> list[dict]:
    """Per round: wall, train/load seconds, load share and fixed cost per client."""
    rows = []
    for round_id in sorted(history, key=int):
        record = history[round_id]
        train = record.get("train", {})
        train_sum = float(train.get("train-seconds-sum", 0.0))
        load_sum = float(train.get("load-seconds-sum", 0.0))
        wall = float(record["wall_seconds"])
        rows.append(
            {
                "round": int(round_id),
                "wall_seconds": wall,
                "train_seconds_sum": train_sum,
                "train_seconds_max": float(train.get("train-seconds-max", 0.0)),
                "load_seconds_sum": load_sum,
                "load_seconds_max": float(train.get("load-seconds-max", 0.0)),
                "load_share": load_sum / (load_sum + train_sum) if load_sum + train_sum else 0.0,
                "fixed_seconds_per_client": (wall - train_sum / concurrent) / sites,
                "wall_over_train_sum": wall / train_sum if train_sum else None,
                "bytes_sent": record.get("bytes", {}).get("sent", 0),
                "bytes_received": record.get("bytes", {}).get("received", 0),
            }
        )
    return rows


def federate_measured(
    scenario_dir: Path,
    run_dir: Path,
    sites: int,
    rounds: int,
    *,
    client_cpus: int | None = None,
    torch_threads: int = 0,
    extra: dict | None = None,
) -> dict:
    """One `flwr run` of ``scenario_dir`` under the memory sampler; its measurements."""
    run_config = {
        "scenario-dir": str(scenario_dir),
        "run-dir": str(run_dir),
        "num-server-rounds": rounds,
        "local-epochs": 1,
        "min-train-nodes": sites,
        "min-evaluate-nodes": sites,
        "min-available-nodes": sites,
        "client-torch-threads": torch_threads,
        **(extra or {}),
    }
    started = time.perf_counter()
    with TreeMemorySampler() as sampler:
        run_federation(
            run_config,
            num_supernodes=sites,
            work_dir=run_dir.parent / f"{run_dir.name}_flwr",
            timeout=6 * 3600,
            client_cpus=client_cpus,
        )
    total = time.perf_counter() - started
    history = json.loads((run_dir / "metrics.json").read_text())
    startup = run_dir / "startup.json"
    concurrent = concurrent_clients(client_cpus, sites)
    rows = round_rows(history, sites, concurrent)
    later = rows[1:] or rows
    return {
        "sites": sites,
        "rounds": rounds,
        "client_cpus": client_cpus or 2,
        "torch_threads": torch_threads,
        "concurrent_clients": concurrent,
        "total_seconds": total,
        "startup": json.loads(startup.read_text()) if startup.is_file() else None,
        "memory": sampler.summary(),
        "rounds_table": rows,
        "load_share_max": max(r["load_share"] for r in rows),
        "fixed_seconds_per_client_rounds_2_on": statistics.median(
            r["fixed_seconds_per_client"] for r in later
        ),
        "wall_seconds_per_round": statistics.fmean(r["wall_seconds"] for r in rows),
    }


def site_scenario(out: Path, sites: int, train: int, val: int, model: dict) -> Path:
    """N small feature-level sites, every modality held (the cost under test is per client)."""
    from simulation.central import default_synthetic

    data = default_synthetic()
    from omnifuse_model.config import OmniFuseConfig

    config = OmniFuseConfig.model_validate(
        {"modalities": data.modality_specs(), "task": data.task, **model}
    )
    names = config.modality_names
    write_feature_scenario(
        out, data, config, [list(names)] * sites, [(train, val)] * sites, test_size=200
    )
    return out


def run_sites(args: argparse.Namespace, root: Path, console: Console) -> list[dict]:
    runs = []
    for cpus in args.client_cpus:
        for sites in args.sites:
            scenario = site_scenario(
                root / f"s{sites}_c{cpus}" / "scenario", sites, args.train, args.val, args.model
            )
            console.print(f"[bold]{sites} sites, {cpus} CPU(s) per client[/bold]")
            run = federate_measured(
                scenario,
                root / f"s{sites}_c{cpus}" / "run",
                sites,
                args.rounds,
                client_cpus=cpus,
                torch_threads=args.threads or cpus,
                extra={"server-eval": True},
            )
            runs.append({"kind": "sites", **run})
    return runs


def run_mimic(args: argparse.Namespace, root: Path, console: Console) -> list[dict]:
    scenario = Scenario.load(args.scenario)
    sites = len(scenario.site_configs)
    console.print(f"[bold]{args.scenario}: {sites} sites, {args.rounds} rounds[/bold]")
    run = federate_measured(
        Path(args.scenario).resolve(),
        root / "mimic_run",
        sites,
        args.rounds,
        client_cpus=args.client_cpus[0],
        torch_threads=args.threads or args.client_cpus[0],
    )
    return [{"kind": "mimic", "scenario": str(args.scenario), **run}]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulation.benchmarks.scale")
    parser.add_argument("kind", choices=["mimic", "sites"])
    parser.add_argument("--scenario", help="mimic: a prepared scenario folder")
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--client-cpus", type=int, nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per client")
    parser.add_argument("--train", type=int, default=40, help="sites: train samples per site")
    parser.add_argument("--val", type=int, default=20, help="sites: val samples per site")
    parser.add_argument("--small-model", action="store_true", help="sites: d 32, K 2")
    parser.add_argument("--quick", action="store_true", help="CI: 2-3 tiny sites, 1 round")
    parser.add_argument("--work", help="keep runs here (default: a temporary folder)")
    parser.add_argument("--out", default="benchmark_results/scale.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    if args.kind == "mimic" and not args.scenario:
        console.print("[red]mimic needs --scenario (a prepared scenario folder)[/red]")
        return 2
    args.model = {"d": 32, "num_blocks": 2, "cra_hidden": [64, 32]} if args.small_model else {}
    if args.quick:
        args.sites, args.train, args.val = [2, 3], 16, 8
        args.model = {"d": 8, "num_blocks": 1, "cra_hidden": [8]}
    args.rounds = args.rounds or (1 if args.quick else 2 if args.kind == "mimic" else 3)
    # one CPU (and torch thread) per client: measured faster than Flower's 2 (docs/BENCHMARKS.md)
    args.client_cpus = args.client_cpus or [DEFAULT_CLIENT_CPUS]
    with tempfile.TemporaryDirectory(prefix="omnifuse-scale-") as tmp:
        root = Path(args.work).resolve() if args.work else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        runs = (run_mimic if args.kind == "mimic" else run_sites)(args, root, console)
    result = {
        "benchmark": f"scale-{args.kind}",
        "argv": sys.argv[1:] if argv is None else argv,
        "cores": CORES,
        "quick": args.quick,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print_runs(runs, console)
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

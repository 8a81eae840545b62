"""Federation benchmark: federated vs centralised vs local-only AUROC, and simulation overhead.

    python -m simulation.benchmarks.federation [--sites 3 10] [--rounds R] [--local-epochs E]
        [--seeds 0 1] [--quick] [--out benchmark_results/federation.json]

One feature-level synthetic scenario (``simulation.central.default_synthetic``: ehr strong,
cxr medium, rep the planted lazy modality; random missingness) is split over N sites with
skewed sizes (site i holds a share proportional to 1 / (i + 1)) and different modality
availability (sites cycle through: all three, no rep, no cxr). For each N and seed:

- federated: FedAvg with modality-aware aggregation, R rounds x E local epochs, through the
  real Flower simulation engine (``run_federation``); the global model after round R.
- centralised: one model trained with ``fit`` on the union of the sites' train splits (each
  with its absent modalities marked) for R x E epochs.
- local-only: each site trains alone for R x E epochs; mean, min and max over sites.

Every model has the same config, batch size, learning rate and initialisation seed, trains
without early stopping (as a federated site does) and is scored on the scenario's
server_test set, the one the ServerApp evaluates on. Local models are scored twice: on the
full test set, and with the test set restricted to the site's own modalities (what the site
would see when deployed; samples left with none are dropped).

Overhead: per round, ``wall_seconds`` (the server's round clock: train phase, federated
evaluation, server-side test evaluation, and the previous round's checkpoint write) over
``train-seconds-sum`` (the sites' local training plus their audit validation pass).
Flower's Ray backend gives each simulated client 2 CPUs by default, so on a 2-core machine
clients run one after another and the ratio cannot fall below 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import flwr
import torch
from pydantic import Field
from rich.console import Console
from rich.table import Table

from omnifuse_model.batch import InMemoryMultimodalDataset
from omnifuse_model.config import OmniFuseConfig, StrictModel, TrainConfig
from omnifuse_model.model import OmniFuse
from omnifuse_model.site_config import load_site_config
from omnifuse_model.site_data import load_site_datasets
from omnifuse_model.synthetic import SyntheticFeatureConfig
from omnifuse_model.training import evaluate, fit
from simulation.central import default_synthetic
from simulation.federation import run_federation
from simulation.scenarios import write_feature_scenario

PATTERNS = (("ehr", "cxr", "rep"), ("ehr", "cxr"), ("ehr", "rep"))
TARGETS = {"auroc_gap_to_central_max": 0.02, "overhead_ratio_max_at_10_sites": 1.3}


class BenchmarkConfig(StrictModel):
    """Everything that fixes the benchmark's numbers (written to the JSON as is)."""

    data: SyntheticFeatureConfig = Field(default_factory=default_synthetic)
    model: dict = Field(
        default_factory=lambda: {"d": 32, "num_blocks": 2, "cra_hidden": [64, 32]},
        description="OmniFuseConfig overrides (modalities and task come from the data).",
    )
    total_train: dict[int, int] = Field(
        default_factory=lambda: {3: 1800, 10: 5000},
        description="Train samples over all sites, per site count (default 600 per site).",
    )
    val_fraction: float = Field(default=0.25, gt=0, description="Site val size / train size.")
    min_val: int = Field(default=40, gt=0)
    test_size: int = Field(default=1000, gt=0)
    rounds: int = Field(default=8, gt=0)
    local_epochs: int = Field(default=2, gt=0)
    batch_size: int = Field(default=64, gt=0)
    lr: float = Field(default=3e-3, gt=0)
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)

    def omnifuse_config(self) -> OmniFuseConfig:
        base = {"modalities": self.data.modality_specs(), "task": self.data.task}
        return OmniFuseConfig.model_validate({**base, **self.model})

    def train_config(self, seed: int) -> TrainConfig:
        """Centralised and local runs: the federation's whole epoch budget, no early stop."""
        return TrainConfig(
            epochs=self.rounds * self.local_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=seed,
            patience=0,
            progress=False,
            bootstrap_samples=0,
        )

    def site_layout(self, num_sites: int) -> tuple[list[list[str]], list[tuple[int, int]]]:
        """Modalities and (train, val) sizes per site: skewed 1 / (i + 1) shares."""
        total = self.total_train.get(num_sites, 600 * num_sites)
        shares = [1 / (i + 1) for i in range(num_sites)]
        trains = [max(20, round(total * s / sum(shares))) for s in shares]
        sizes = [(n, max(self.min_val, round(n * self.val_fraction))) for n in trains]
        modalities = [list(PATTERNS[i % len(PATTERNS)]) for i in range(num_sites)]
        return modalities, sizes


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _auroc(model: OmniFuse, test: InMemoryMultimodalDataset, seed: int) -> float:
    config = TrainConfig(batch_size=256, progress=False, bootstrap_samples=0, seed=seed)
    return float(evaluate(model, test, config).metrics["auroc"])


def _train(config: BenchmarkConfig, data: InMemoryMultimodalDataset, seed: int) -> OmniFuse:
    torch.manual_seed(seed)  # same initialisation as the ServerApp's global model
    model = OmniFuse(config.omnifuse_config())
    fit(model, data, None, config.train_config(seed))
    return model


def _pool(parts: list[InMemoryMultimodalDataset]) -> InMemoryMultimodalDataset:
    return InMemoryMultimodalDataset(
        {k: torch.cat([p.inputs[k] for p in parts]) for k in parts[0].inputs},
        torch.cat([p.availability for p in parts]),
        torch.cat([p.labels for p in parts]),
        sample_ids=[f"{i}:{s}" for i, p in enumerate(parts) for s in p.sample_ids],
    )


def run_scenario(config: BenchmarkConfig, num_sites: int, seed: int, root: Path) -> dict:
    """Federated, centralised and local-only runs on the N-site scenario for one seed."""
    model_config = config.omnifuse_config()
    scenario_dir = root / f"sites{num_sites}" / "scenario"
    modalities, sizes = config.site_layout(num_sites)
    write_feature_scenario(
        scenario_dir, config.data, model_config, modalities, sizes, config.test_size
    )
    sites = [load_site_config(scenario_dir / f"site_{i}.toml") for i in range(num_sites)]
    site_data = [load_site_datasets(site, model_config) for site in sites]
    test_site = load_site_config(scenario_dir / "server_test.toml")
    test = load_site_datasets(test_site, model_config).val

    run_dir = root / f"sites{num_sites}" / f"seed{seed}" / "run"
    started = time.perf_counter()
    run_federation(
        {
            "scenario-dir": str(scenario_dir),
            "run-dir": str(run_dir),
            "num-server-rounds": config.rounds,
            "local-epochs": config.local_epochs,
            "batch-size": config.batch_size,
            "lr": config.lr,
            "strategy": "fedavg",
            "modality-aware": True,
            "min-train-nodes": num_sites,
            "min-evaluate-nodes": num_sites,
            "min-available-nodes": num_sites,
            "seed": seed,
        },
        num_supernodes=num_sites,
        work_dir=run_dir.parent / "flwr",
        http_port=_free_port(),
        timeout=1800,
    )
    federated_seconds = time.perf_counter() - started
    history = json.loads((run_dir / "metrics.json").read_text())

    started = time.perf_counter()
    central = _train(config, _pool([d.train for d in site_data]), seed)
    central_seconds = time.perf_counter() - started
    local = []
    started = time.perf_counter()
    for site, data in zip(sites, site_data, strict=True):
        model = _train(config, data.train, seed)
        own_site = test_site.model_copy(update={"modalities": site.modalities})
        own = load_site_datasets(own_site, model_config).val
        local.append(
            {
                "site": site.name,
                "modalities": site.modalities,
                "train_size": len(data.train),
                "auroc": _auroc(model, test, seed),
                "auroc_own_modalities": _auroc(model, own, seed),
            }
        )
    return {
        "num_sites": num_sites,
        "seed": seed,
        "sites": [
            {"site": s.name, "modalities": s.modalities, "train": len(d.train), "val": len(d.val)}
            for s, d in zip(sites, site_data, strict=True)
        ],
        "federated_auroc": history[str(config.rounds)]["server"]["test-auroc"],
        "central_auroc": _auroc(central, test, seed),
        "local": local,
        "seconds": {
            "federated": federated_seconds,
            "central": central_seconds,
            "local": time.perf_counter() - started,
        },
        "metrics": history,
    }


def overhead_rows(history: dict) -> list[dict]:
    """Per round: wall seconds, summed client training seconds, their ratio, bytes."""
    rows = []
    for round_id in sorted(history, key=int):
        record = history[round_id]
        wall, train = record["wall_seconds"], record["train"]["train-seconds-sum"]
        rows.append(
            {
                "round": int(round_id),
                "wall_seconds": wall,
                "train_seconds_sum": train,
                "ratio": wall / train,
                "bytes_sent": record["bytes"].get("sent", 0),
                "bytes_received": record["bytes"].get("received", 0),
                "test_auroc": record["server"].get("test-auroc"),
            }
        )
    return rows


def _stats(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def summarize(runs: list[dict]) -> dict:
    """Per site count: AUROC mean/std over seeds of each method, overhead over seeds."""
    summary = {}
    for num_sites in sorted({r["num_sites"] for r in runs}):
        group = [r for r in runs if r["num_sites"] == num_sites]
        local = [[s["auroc"] for s in r["local"]] for r in group]
        own = [[s["auroc_own_modalities"] for s in r["local"]] for r in group]
        rows = [overhead_rows(r["metrics"]) for r in group]
        steady = [row for rs in rows for row in rs if row["round"] > 1]
        federated = _stats([r["federated_auroc"] for r in group])
        central = _stats([r["central_auroc"] for r in group])
        local_mean = _stats([statistics.fmean(v) for v in local])
        summary[str(num_sites)] = {
            "federated": federated,
            "central": central,
            "local_mean": local_mean,
            "local_min": min(min(v) for v in local),
            "local_max": max(max(v) for v in local),
            "local_own_mean": _stats([statistics.fmean(v) for v in own]),
            "local_own_min": min(min(v) for v in own),
            "local_own_max": max(max(v) for v in own),
            "gap_to_central": central["mean"] - federated["mean"],
            "ratio_all_rounds": sum(r["wall_seconds"] for rs in rows for r in rs)
            / sum(r["train_seconds_sum"] for rs in rows for r in rs),
            "ratio_round_1": statistics.fmean(rs[0]["ratio"] for rs in rows),
            "ratio_rounds_2_on": sum(r["wall_seconds"] for r in steady)
            / sum(r["train_seconds_sum"] for r in steady)
            if steady
            else None,
        }
        entry = summary[str(num_sites)]
        entry["within_0.02_of_central"] = entry["gap_to_central"] <= 0.02
        entry["above_local_mean"] = federated["mean"] > local_mean["mean"]
    return summary


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(result: dict, console: Console) -> None:
    config = result["config"]
    auroc = Table(
        title=f"Test AUROC ({config['rounds']} rounds x {config['local_epochs']} local epochs; "
        "mean ± std over seeds)"
    )
    for column in (
        "sites",
        "seeds",
        "federated",
        "centralised",
        "gap",
        "local mean [min, max]",
        "local, own modalities",
    ):
        auroc.add_column(column, justify="right")
    for num_sites, s in result["summary"].items():
        auroc.add_row(
            num_sites,
            str(s["federated"]["n"]),
            f"{_f(s['federated']['mean'])} ± {_f(s['federated']['std'])}",
            f"{_f(s['central']['mean'])} ± {_f(s['central']['std'])}",
            f"{s['gap_to_central']:+.3f}",
            f"{_f(s['local_mean']['mean'])} [{_f(s['local_min'])}, {_f(s['local_max'])}]",
            f"{_f(s['local_own_mean']['mean'])} "
            f"[{_f(s['local_own_min'])}, {_f(s['local_own_max'])}]",
        )
    console.print(auroc)
    for run in result["runs"]:
        table = Table(title=f"{run['num_sites']} sites, seed {run['seed']}: per round")
        for column in (
            "round",
            "wall s",
            "Σ client train s",
            "wall / Σ train",
            "bytes sent",
            "bytes received",
            "test AUROC",
        ):
            table.add_column(column, justify="right")
        for row in overhead_rows(run["metrics"]):
            table.add_row(
                str(row["round"]),
                _f(row["wall_seconds"], 2),
                _f(row["train_seconds_sum"], 2),
                _f(row["ratio"], 2),
                f"{row['bytes_sent']:,}",
                f"{row['bytes_received']:,}",
                _f(row["test_auroc"]),
            )
        console.print(table)
    overhead = Table(title="Simulation overhead: round wall time / Σ client training time")
    for column in ("sites", "round 1", "rounds 2..R", "all rounds"):
        overhead.add_column(column, justify="right")
    for num_sites, s in result["summary"].items():
        overhead.add_row(
            num_sites,
            _f(s["ratio_round_1"], 2),
            _f(s["ratio_rounds_2_on"], 2),
            _f(s["ratio_all_rounds"], 2),
        )
    console.print(overhead)
    for num_sites, s in result["summary"].items():
        console.print(
            f"{num_sites} sites: federated within 0.02 of centralised: "
            f"{s['within_0.02_of_central']}; above local-only mean: {s['above_local_mean']}"
        )
    console.print(f"total {result['seconds']:.0f} s")


def run(config: BenchmarkConfig, site_counts: list[int], console: Console) -> dict:
    started = time.perf_counter()
    load_before = os.getloadavg()  # the cores are shared: other load skews every timing
    runs = []
    with tempfile.TemporaryDirectory(prefix="omnifuse-fed-bench-") as tmp:
        for num_sites in site_counts:
            for seed in config.seeds:
                console.print(f"[bold]{num_sites} sites, seed {seed}[/bold] ...")
                runs.append(run_scenario(config, num_sites, seed, Path(tmp)))
                done, seconds = runs[-1], runs[-1]["seconds"]
                console.print(
                    f"  federated {done['federated_auroc']:.3f} ({seconds['federated']:.0f} s), "
                    f"centralised {done['central_auroc']:.3f} ({seconds['central']:.0f} s), "
                    f"local mean {statistics.fmean(s['auroc'] for s in done['local']):.3f} "
                    f"({seconds['local']:.0f} s)"
                )
    return {
        "config": config.model_dump(mode="json"),
        "model_config": config.omnifuse_config().model_dump(mode="json"),
        "site_counts": site_counts,
        "targets": TARGETS,
        "machine": {
            "platform": platform.platform(),
            "cpus": torch.get_num_threads(),
            "torch": torch.__version__,
            "flwr": flwr.__version__,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "summary": summarize(runs),
        "runs": runs,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--rounds", type=int, help="default 8 (2 with --quick)")
    parser.add_argument("--local-epochs", type=int, help="default 2")
    parser.add_argument("--lr", type=float, help="default 0.003")
    parser.add_argument("--seeds", type=int, nargs="+", help="default 0 1 (0 with --quick)")
    parser.add_argument("--quick", action="store_true", help="3 sites, 2 rounds, one seed")
    parser.add_argument("--out", default="benchmark_results/federation.json")
    args = parser.parse_args(argv)
    overrides: dict = {}
    if args.quick:
        args.sites = [3]
        overrides.update(rounds=2, seeds=[0])
    for key in ("rounds", "local_epochs", "lr", "seeds"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    config = BenchmarkConfig.model_validate(overrides)
    console = Console()
    result = run(config, args.sites, console)
    result["argv"] = sys.argv[1:] if argv is None else argv
    print_report(result, console)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    console.print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

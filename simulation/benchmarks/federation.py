"""Federation benchmark: federated vs centralised vs local-only AUROC, and simulation overhead.

    python -m simulation.benchmarks.federation [--sites 3 10] [--rounds R] [--local-epochs E]
        [--seeds 0 1] [--model paper|small] [--quick] [--out benchmark_results/federation.json]

One feature-level synthetic scenario (``simulation.central.default_synthetic``: ehr strong,
cxr medium, rep the planted lazy modality; random missingness) is split over N sites with
skewed sizes (site i holds a share proportional to 1 / (i + 1)) and different modality
availability (sites cycle through: all three, no rep, no cxr). For each N and seed:

- federated: FedAvg with modality-aware aggregation, R rounds x E local epochs, through the
  real Flower simulation engine (``run_federation``).
- centralised: one model trained with ``fit`` on the union of the sites' train splits (each
  with its absent modalities marked) for R x E epochs.
- local-only: each site trains alone for R x E epochs; mean, min and max over sites.

Every model has the same config, batch size, learning rate and initialisation seed, trains
without early stopping (as a federated site does) and is scored on the scenario's
server_test set, the one the ServerApp evaluates on. Each method is scored at its final model
and at the round/epoch with the best validation AUROC (federated: the sites' federated
evaluation; centralised: the pooled site val splits; local: the site's own val split), since
on this easy task the models overfit well before R x E epochs. Local models are also scored
on the test set restricted to the site's own modalities (what the site would see when
deployed; samples left with none are dropped).

Overhead: per round, ``wall_seconds`` (the server's round clock: train phase, federated
evaluation, server-side test evaluation, and the previous round's checkpoint write) over
``train-seconds-sum`` (the sites' local training plus their audit validation pass). The
simulation engine's start-up (Ray, the ClientApp actors importing torch) is timed on its own
before round 1 (the ServerApp's warm-up query, ``startup.json``) and reported separately.
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

from omnifuse_model.batch import InMemoryMultimodalDataset
from omnifuse_model.config import OmniFuseConfig, StrictModel, TrainConfig
from omnifuse_model.model import OmniFuse
from omnifuse_model.site_config import load_site_config
from omnifuse_model.site_data import load_site_datasets
from omnifuse_model.synthetic import SyntheticFeatureConfig
from omnifuse_model.training import evaluate, fit
from simulation.benchmarks.federation_report import print_report, summarize
from simulation.central import default_synthetic
from simulation.federation import run_federation
from simulation.scenarios import write_feature_scenario

PATTERNS = (("ehr", "cxr", "rep"), ("ehr", "cxr"), ("ehr", "rep"))
# --model small: a fast model for quick checks (about a fifth of the paper model's training)
SMALL_MODEL = {"d": 32, "num_blocks": 2, "cra_hidden": [64, 32]}
TARGETS = {"auroc_gap_to_central_max": 0.02, "overhead_ratio_max_at_10_sites": 1.3}


class BenchmarkConfig(StrictModel):
    """Everything that fixes the benchmark's numbers (written to the JSON as is)."""

    data: SyntheticFeatureConfig = Field(default_factory=default_synthetic)
    model: dict = Field(
        default_factory=dict,
        description=(
            "OmniFuseConfig overrides (modalities and task come from the data); empty = the "
            "paper's model (d 128, K 5)."
        ),
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
    lr: float = Field(default=1e-3, gt=0)
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
    return float(evaluate(model, test, config, imputation_error=False).metrics["auroc"])


def _train(
    config: BenchmarkConfig,
    data: InMemoryMultimodalDataset,
    seed: int,
    val: InMemoryMultimodalDataset | None = None,
) -> OmniFuse:
    """The whole epoch budget; the last epoch, or with ``val`` its best-AUROC epoch."""
    torch.manual_seed(seed)  # same initialisation as the ServerApp's global model
    model = OmniFuse(config.omnifuse_config())
    fit(model, data, val, config.train_config(seed))
    return model


def _pool(parts: list[InMemoryMultimodalDataset]) -> InMemoryMultimodalDataset:
    return InMemoryMultimodalDataset(
        {k: torch.cat([p.inputs[k] for p in parts]) for k in parts[0].inputs},
        torch.cat([p.availability for p in parts]),
        torch.cat([p.labels for p in parts]),
        sample_ids=[f"{i}:{s}" for i, p in enumerate(parts) for s in p.sample_ids],
    )


def _federate(
    config: BenchmarkConfig, scenario_dir: Path, run_dir: Path, num_sites: int, seed: int
) -> dict:
    """R rounds through `flwr run`; returns the server's per-round metrics.json."""
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
    return json.loads((run_dir / "metrics.json").read_text())


def run_scenario(config: BenchmarkConfig, num_sites: int, seed: int, root: Path) -> dict:
    """Federated, centralised and local-only runs on the N-site scenario for one seed.

    Each method is scored twice: its final model (last round / epoch) and the round or epoch
    with the best validation AUROC (federated: the sites' federated evaluation; centralised:
    the pooled site val splits; local: the site's own val split). The test set plays no part
    in the choice.
    """
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

    clock = time.perf_counter()
    run_dir = root / f"sites{num_sites}" / f"seed{seed}" / "run"
    history = _federate(config, scenario_dir, run_dir, num_sites, seed)
    seconds = {"federated": time.perf_counter() - clock}
    startup_file = run_dir / "startup.json"
    startup = json.loads(startup_file.read_text()) if startup_file.is_file() else None
    best_round = max(history, key=lambda r: history[r]["evaluate_clients"].get("val-auroc", -1))

    clock = time.perf_counter()
    pooled = _pool([d.train for d in site_data])
    central = _auroc(_train(config, pooled, seed), test, seed)
    pooled_val = _pool([d.val for d in site_data])
    central_best = _auroc(_train(config, pooled, seed, pooled_val), test, seed)
    seconds["central"] = time.perf_counter() - clock

    clock = time.perf_counter()
    local = [
        _local_only(config, site, data, test_site, test, seed)
        for site, data in zip(sites, site_data, strict=True)
    ]
    seconds["local"] = time.perf_counter() - clock
    return {
        "num_sites": num_sites,
        "seed": seed,
        "federated_auroc": history[str(config.rounds)]["server"]["test-auroc"],
        "federated_best_val_round": int(best_round),
        "federated_auroc_best_val": history[best_round]["server"]["test-auroc"],
        "central_auroc": central,
        "central_auroc_best_val": central_best,
        "local": local,
        "seconds": seconds,
        "startup": startup,
        "metrics": history,
    }


def _local_only(
    config: BenchmarkConfig, site, data, test_site, test, seed: int
) -> dict[str, object]:
    """A site trained alone, scored on the shared test set and on the test set restricted to
    its own modalities (its last epoch, and its best-validation epoch)."""
    model = _train(config, data.train, seed)
    own_site = test_site.model_copy(update={"modalities": site.modalities})
    own = load_site_datasets(own_site, config.omnifuse_config()).val
    return {
        "site": site.name,
        "modalities": site.modalities,
        "train": len(data.train),
        "val": len(data.val),
        "auroc": _auroc(model, test, seed),
        "auroc_own_modalities": _auroc(model, own, seed),
        "auroc_best_val": _auroc(_train(config, data.train, seed, data.val), test, seed),
    }


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
                    f"  federated {done['federated_auroc']:.3f} "
                    f"({seconds['federated']:.0f} s), "
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
    parser.add_argument("--lr", type=float, help="default 0.001")
    parser.add_argument("--seeds", type=int, nargs="+", help="default 0 1 (0 with --quick)")
    parser.add_argument("--quick", action="store_true", help="3 sites, 2 rounds, one seed")
    parser.add_argument(
        "--model",
        choices=("paper", "small"),
        default="paper",
        help="paper: OmniFuse's defaults (d 128, K 5); small: d 32, K 2",
    )
    parser.add_argument("--out", default="benchmark_results/federation.json")
    args = parser.parse_args(argv)
    overrides: dict = {}
    if args.quick:
        args.sites = [3]
        overrides.update(rounds=2, seeds=[0])
    if args.model == "small":
        overrides["model"] = SMALL_MODEL
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

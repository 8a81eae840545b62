"""Transport benchmark: bytes on the wire and test AUROC of the 16-bit formats against float32.

    python -m simulation.benchmarks.transport [--seeds 0 1 2] [--rounds 8] [--local-epochs 2]
        [--transports float32 float16 bfloat16] [--quick]
        [--out benchmark_results/transport.json]

(a) Bytes per site and direction at the paper size (d 128, K 5; the federation benchmark's
modalities), for every set of modalities a site may hold: the downlink ``ArrayRecord`` the
strategy sends (``server.strategy.downlink_arrays``) and the uplink one the ClientApp sends
(``client.transport.encode_update``), counted with Flower's ``count_bytes`` (array bytes and
key names), for float32 (today's wire), 16-bit, and 16-bit with omission; as a % of float32.

(b) Test AUROC, paired over seeds: the federation benchmark's 3-site feature-level scenario
(``simulation.benchmarks.federation``: skewed sizes, sites holding all three / no rep / no
cxr) federated in process for R rounds x E local epochs with modality-aware FedAvg, through
the functions the apps use each round: the strategy's downlink encoding, the ClientApp's
decoding, ``train_round``, the ClientApp's update encoding and the strategy's screening
read (``server.update_rows``), norm (``server.update_stream``) and ``apply_updates``. Only
the Flower messaging is left out. Each seed fixes data, initialisation and site training
seeds for every transport, so the per-seed AUROC difference (16-bit - float32) is paired;
reported with its mean and a 95% t interval. The target: the interval within +-0.005.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from scipy import stats

from client.local_training import RoundInstructions, train_round
from client.registration import site_declaration
from client.transport import decode_global, encode_update
from omnifuse_model.config import OmniFuseConfig, TrainConfig
from omnifuse_model.federation_replies import parse_train_metrics
from omnifuse_model.federation_schema import ROUND_PLAN
from omnifuse_model.model import OmniFuse
from omnifuse_model.round_plan import RoundPlan
from omnifuse_model.site_config import load_site_config
from omnifuse_model.site_data import load_site_datasets
from omnifuse_model.training import evaluate
from omnifuse_model.wire_format import TRANSPORT_DTYPES, WireFormat, held_modalities, uplink_keys
from server.master_weights import downlink_arrays
from server.reply_screening import AcceptedTrain
from server.run_config import FederationRunConfig
from server.site_registry import SiteRegistry
from server.strategy import OmniFuseStrategy
from server.update_rows import read_update
from server.update_stream import stream_updates
from simulation.benchmarks.federation import SMALL_MODEL, BenchmarkConfig
from simulation.scenarios import write_feature_scenario

AUROC_TOLERANCE = 0.005
BYTES_TARGET = 0.5


# -- (a) bytes --------------------------------------------------------------------------------
def bytes_rows(config: OmniFuseConfig) -> list[dict]:
    """Downlink and uplink bytes per held-modality set and wire format."""
    torch.manual_seed(0)
    master = OmniFuse(config).state_dict()
    arrays = {k: v.numpy() for k, v in master.items()}
    float32 = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    local = {k: v + 0.01 * torch.randn(v.shape) for k, v in master.items()}
    names = config.modality_names
    rows = []
    for size in range(len(names), 0, -1):
        for held in itertools.combinations(names, size):
            for label, wire in (
                ("float32", WireFormat()),
                ("float16", WireFormat(dtype="float16")),
                ("float16 + omission", WireFormat(dtype="float16", omit_unheld=True)),
                ("bfloat16 + omission", WireFormat(dtype="bfloat16", omit_unheld=True)),
            ):
                down = downlink_arrays(arrays, wire, float32).count_bytes()
                sent = list(held) if wire.omit_unheld else None
                up = encode_update(local, master, wire, names, sent).count_bytes()
                rows.append({"held": "+".join(held), "format": label, "down": down, "up": up})
    for row in rows:
        base = next(r for r in rows if r["held"] == row["held"] and r["format"] == "float32")
        row["down_pct"] = 100.0 * row["down"] / base["down"]
        row["up_pct"] = 100.0 * row["up"] / base["up"]
    return rows


# -- (b) AUROC --------------------------------------------------------------------------------
class Federation:
    """One scenario's sites, datasets, registry and test set (shared by every transport)."""

    def __init__(self, config: BenchmarkConfig, root: Path, num_sites: int) -> None:
        self.config = config
        self.model_config = config.omnifuse_config()
        scenario_dir = root / "scenario"
        modalities, sizes = config.site_layout(num_sites)
        write_feature_scenario(
            scenario_dir, config.data, self.model_config, modalities, sizes, config.test_size
        )
        self.sites = [load_site_config(scenario_dir / f"site_{i}.toml") for i in range(num_sites)]
        self.data = [load_site_datasets(site, self.model_config) for site in self.sites]
        test_site = load_site_config(scenario_dir / "server_test.toml")
        self.test = load_site_datasets(test_site, self.model_config).val
        self.registry = SiteRegistry()
        for node, (site, data) in enumerate(zip(self.sites, self.data, strict=True)):
            declaration = site_declaration(site.name, data, self.model_config, threshold=5)
            self.registry.bind(node, declaration, connected=set())
        self.root = root


def federate(federation: Federation, transport: str, seed: int) -> dict:
    """R rounds through the apps' encode/decode functions; the final model's test AUROC."""
    config, model_config = federation.config, federation.model_config
    run = FederationRunConfig(
        scenario_dir=federation.root, run_dir=federation.root, transport=transport,
        num_server_rounds=config.rounds, local_epochs=config.local_epochs,
        batch_size=config.batch_size, lr=config.lr, seed=seed, min_train_nodes=1,
    )  # fmt: skip
    strategy = OmniFuseStrategy(run, model_config, registry=federation.registry)
    wire = run.wire_format()
    torch.manual_seed(seed)  # the ServerApp's initialisation
    master = {k: v.numpy() for k, v in OmniFuse(model_config).state_dict().items()}
    started = time.perf_counter()
    for server_round in range(1, config.rounds + 1):
        strategy.previous = master
        plan = RoundPlan.model_validate_json(
            str(strategy.round_config(server_round, ConfigRecord())[ROUND_PLAN])
        )  # type: ignore[arg-type]
        downlink = downlink_arrays(
            master, wire, ArrayRecord({k: Array(v) for k, v in master.items()})
        )
        accepted = [
            _site_round(federation, strategy, plan, downlink, node)
            for node in range(len(federation.sites))
        ]
        metrics = [a.metrics.as_metrics() for a in accepted]
        master = {k: np.array(v) for k, v in strategy.apply_updates(accepted, metrics).items()}
    model = OmniFuse(model_config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in master.items()})
    eval_config = TrainConfig(batch_size=256, progress=False, bootstrap_samples=0, seed=seed)
    auroc = float(
        evaluate(model, federation.test, eval_config, imputation_error=False).metrics["auroc"]
    )
    return {"transport": transport, "seed": seed, "test_auroc": auroc,
            "seconds": time.perf_counter() - started}  # fmt: skip


def _site_round(
    federation: Federation, strategy: OmniFuseStrategy, plan: RoundPlan, downlink, node: int
) -> AcceptedTrain:
    """One site's round as the ClientApp runs it, and its reply as the server decodes it."""
    site, names, wire = federation.sites[node], federation.model_config.modality_names, plan.wire
    received = decode_global(downlink)
    result = train_round(
        site.name, federation.data[node], RoundInstructions.for_site(plan, site), received
    )
    declared = federation.registry.declarations[site.name].num_present
    held = held_modalities(declared) if wire.omit_unheld else None
    record = encode_update(result.state, received, wire, names, held)
    layout = strategy.layout()
    expected = uplink_keys(layout.master, names, held)
    update = read_update(record, layout, expected, wire)
    squared = stream_updates([update], layout, None, deltas=wire.deltas).squared_norms[0]
    if not np.isfinite(squared):
        raise RuntimeError(f"site {site.name}: a non-finite update")
    metrics = parse_train_metrics(result.metrics, names)
    return AcceptedTrain(node, site.name, metrics, update, result.audit, None, record.count_bytes())


def paired(runs: list[dict], transport: str) -> dict:
    """Per-seed AUROC(transport) - AUROC(float32): mean and 95% t interval."""
    base = {r["seed"]: r["test_auroc"] for r in runs if r["transport"] == "float32"}
    other = {r["seed"]: r["test_auroc"] for r in runs if r["transport"] == transport}
    seeds = sorted(set(base) & set(other))
    differences = [other[s] - base[s] for s in seeds]
    mean = statistics.fmean(differences) if differences else math.nan
    if len(differences) >= 2:
        spread = statistics.stdev(differences) / math.sqrt(len(differences))
        half = float(stats.t.ppf(0.975, len(differences) - 1)) * spread
    else:
        half = math.nan
    low, high = mean - half, mean + half
    within = bool(math.isfinite(half) and low >= -AUROC_TOLERANCE and high <= AUROC_TOLERANCE)
    return {"transport": transport, "seeds": seeds, "differences": differences,
            "mean": mean, "ci95": [low, high], "within_tolerance": within}  # fmt: skip


def run_benchmark(config: BenchmarkConfig, num_sites: int, transports: list[str]) -> dict:
    load_before = os.getloadavg()
    bytes_table = bytes_rows(config.omnifuse_config())
    runs = []
    with tempfile.TemporaryDirectory() as tmp, Progress(transient=True) as progress:
        task = progress.add_task("federations", total=len(config.seeds) * len(transports))
        for seed in config.seeds:
            data = config.data.model_copy(update={"seed": seed})
            federation = Federation(
                config.model_copy(update={"data": data}), Path(tmp) / f"seed{seed}", num_sites
            )
            for transport in transports:
                runs.append(federate(federation, transport, seed))
                progress.advance(task)
    comparisons = [paired(runs, t) for t in transports if t != "float32"]
    return {
        "benchmark": "transport",
        "config": json.loads(config.model_dump_json()),
        "num_sites": num_sites,
        "bytes": bytes_table,
        "bytes_target_pct": 100 * BYTES_TARGET,
        "runs": runs,
        "paired": comparisons,
        "auroc_tolerance": AUROC_TOLERANCE,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
    }


def print_report(result: dict, console: Console) -> None:
    table = Table(title="Bytes per site and direction, % of float32 (count_bytes)")
    for column in ("site holds", "format", "down bytes", "down %", "up bytes", "up %"):
        table.add_column(column, justify="left" if column in ("site holds", "format") else "right")
    for row in result["bytes"]:
        table.add_row(row["held"], row["format"], f"{row['down']:,}", f"{row['down_pct']:.2f}",
                      f"{row['up']:,}", f"{row['up_pct']:.2f}")  # fmt: skip
    console.print(table)
    runs = Table(title=f"Test AUROC, {result['num_sites']} sites, in process")
    runs.add_column("seed", justify="right")
    transports = sorted({r["transport"] for r in result["runs"]}, key=TRANSPORT_DTYPES.index)
    for transport in transports:
        runs.add_column(transport, justify="right")
    for seed in sorted({r["seed"] for r in result["runs"]}):
        auroc = {r["transport"]: r["test_auroc"] for r in result["runs"] if r["seed"] == seed}
        cells = [f"{auroc[t]:.4f}" if t in auroc else "-" for t in transports]
        runs.add_row(str(seed), *cells)
    console.print(runs)
    for item in result["paired"]:
        low, high = item["ci95"]
        verdict = "within" if item["within_tolerance"] else "NOT within"
        console.print(
            f"{item['transport']} - float32: mean {item['mean']:+.4f}, 95% t CI "
            f"[{low:+.4f}, {high:+.4f}] over seeds {item['seeds']}: {verdict} "
            f"+-{result['auroc_tolerance']}"
        )
    load = ", ".join(f"{v:.2f}" for v in result["loadavg_before"])
    console.print(f"load average before: {load}")


def benchmark_config(args: argparse.Namespace) -> BenchmarkConfig:
    if args.quick:
        return BenchmarkConfig(
            model=SMALL_MODEL, total_train={2: 80}, min_val=20, test_size=100, rounds=1,
            local_epochs=1, seeds=[0, 1],
        )  # fmt: skip
    return BenchmarkConfig(
        model=SMALL_MODEL if args.model == "small" else {},
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        seeds=args.seeds,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--model", choices=("paper", "small"), default="paper")
    parser.add_argument(
        "--transports", nargs="+", choices=TRANSPORT_DTYPES,
        default=["float32", "float16", "bfloat16"],
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true", help="small model, 2 sites, 1 round, float32 vs float16"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmark_results/transport.json"))
    args = parser.parse_args(argv)
    if "float32" not in args.transports:
        parser.error("--transports must include float32 (the reference of the paired difference)")
    config = benchmark_config(args)
    transports = ["float32", "float16"] if args.quick else args.transports
    result = run_benchmark(config, 2 if args.quick else 3, transports)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_report(result, Console())
    return result


if __name__ == "__main__":
    main()

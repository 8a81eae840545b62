"""Training throughput of the full OmniFuse step against a concat model with the same encoders,
and the cost of per-epoch TLA mining relative to the epoch's training time.

    python -m simulation.benchmarks.speed [--batch 256] [--samples 2048] [--repeats 3]

Targets (model-core issue): full step <= 2.0x the concat step; mining <= 25% of an epoch's
training time. Inputs are random tensors with the MIMIC shapes (EHR 24 x 76, CXR ResNet34
features 512, report token states L x 768 + mask); speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from omnifuse_model.batch import InMemoryMultimodalDataset
from omnifuse_model.config import ModalitySpec, OmniFuseConfig, TrainConfig
from omnifuse_model.laziness import LazinessReport
from omnifuse_model.model import OmniFuse
from omnifuse_model.training import mine_laziness, seed_everything, train_epoch


def make_inputs(
    n: int, report_tokens: int, seed: int = 0
) -> tuple[list, InMemoryMultimodalDataset]:
    """Random inputs with the MIMIC shapes and ~70% availability of CXR and reports."""
    generator = torch.Generator().manual_seed(seed)
    specs = [
        ModalitySpec(name="ehr", kind="timeseries", input_dim=76, seq_len=24),
        ModalitySpec(name="cxr", kind="image_features", input_dim=512),
        ModalitySpec(name="rep", kind="token_states", input_dim=768, seq_len=report_tokens),
    ]
    inputs = {s.name: torch.randn(n, *s.input_shape, generator=generator) for s in specs}
    lengths = torch.randint(10, report_tokens + 1, (n, 1), generator=generator)
    masks = {"rep": torch.arange(report_tokens).unsqueeze(0) < lengths}
    availability = torch.rand(n, 3, generator=generator) < 0.7
    availability[:, 0] = True
    labels = (torch.rand(n, 1, generator=generator) < 0.3).float()
    return specs, InMemoryMultimodalDataset(inputs, availability, labels, masks)


def full_config(specs: list, d: int, blocks: int) -> OmniFuseConfig:
    return OmniFuseConfig(modalities=specs, task="binary", d=d, num_blocks=blocks)


def concat_config(specs: list, d: int) -> OmniFuseConfig:
    return OmniFuseConfig(
        modalities=specs,
        task="binary",
        d=d,
        fusion="concat",
        use_tla=False,
        use_forward_imputation=False,
        use_backward_imputation=False,
    )


def time_epoch(model: OmniFuse, data: InMemoryMultimodalDataset, train: TrainConfig) -> dict:
    """One training epoch and (if TLA is on) one mining pass; seconds of each."""
    generator = seed_everything(train.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
    start = time.perf_counter()
    train_epoch(model, data, optimizer, train, generator)
    train_seconds = time.perf_counter() - start
    mining_seconds = 0.0
    if model.config.use_tla:
        start = time.perf_counter()
        mine_laziness(model, data, train)
        mining_seconds = time.perf_counter() - start
    return {"train_seconds": train_seconds, "mining_seconds": mining_seconds}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    specs, data = make_inputs(args.samples, args.report_tokens)
    train = TrainConfig(batch_size=args.batch, progress=False, epochs=1)
    models = {
        "concat": OmniFuse(concat_config(specs, args.d)),
        "full": OmniFuse(full_config(specs, args.d, args.blocks)),
    }
    # TLA is active from the second epoch on: time the steady state, with a lazy combination.
    models["full"].set_laziness(LazinessReport(lazy_combination=("cxr", "rep")))
    time_epoch(models["concat"], data.subset(torch.arange(args.batch)), train)  # warm-up
    time_epoch(models["full"], data.subset(torch.arange(args.batch)), train)
    runs: dict[str, list[dict]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            runs[name].append(time_epoch(model, data, train))
    summary = {}
    for name, timings in runs.items():
        train_s = statistics.median(t["train_seconds"] for t in timings)
        mining_s = statistics.median(t["mining_seconds"] for t in timings)
        summary[name] = {
            "samples_per_second": args.samples / train_s,
            "epoch_train_seconds": train_s,
            "mining_seconds": mining_s,
            "runs": timings,
        }
    full, concat = summary["full"], summary["concat"]
    return {
        "settings": vars(args),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "models": summary,
        "step_cost_ratio_full_vs_concat": concat["samples_per_second"] / full["samples_per_second"],
        "mining_fraction_of_epoch": full["mining_seconds"] / full["epoch_train_seconds"],
        "targets": {"step_cost_ratio_max": 2.0, "mining_fraction_max": 0.25},
    }


def print_report(result: dict, console: Console) -> None:
    table = Table(
        title="Training throughput (batch {batch}, d {d}, K {blocks})".format(**result["settings"])
    )
    for column in ("model", "samples/s", "epoch train s", "mining s"):
        table.add_column(column, justify="right")
    for name, row in result["models"].items():
        table.add_row(
            name,
            f"{row['samples_per_second']:.0f}",
            f"{row['epoch_train_seconds']:.2f}",
            f"{row['mining_seconds']:.2f}",
        )
    console.print(table)
    ratio, mining = result["step_cost_ratio_full_vs_concat"], result["mining_fraction_of_epoch"]
    console.print(f"full step / concat step cost: {ratio:.2f}x (target <= 2.0x)")
    console.print(f"TLA mining / epoch training time: {mining:.1%} (target <= 25%)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--samples", type=int, default=2048, help="samples per timed epoch")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--report-tokens", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="benchmark_results/speed.json")
    args = parser.parse_args(argv)
    result = run(args)
    print_report(result, Console())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

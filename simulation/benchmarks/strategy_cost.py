"""Strategy cost benchmark: the server's whole per-round work against the number of sites.

    python -m simulation.benchmarks.strategy_cost [--sites 1 2 5 10 20 50 100]
        [--transports float16 float32] [--repeats 5] [--quick]
        [--out benchmark_results/strategy_cost.json]

Times ``OmniFuseStrategy.aggregate_train`` on N ready replies of the paper-size model (d 128,
K 5, the federation benchmark's modalities): screening every reply (records, metrics, audit
row, counts against the registration), decoding the weights into rows, the update norm and
finiteness, modality-aware FedAvg in float32, the new master weights and the round record.
Nothing waits: the replies are real Flower ``Message``s built before the clock starts (site i
lacks modality ``i mod 4`` when that is one of the three; its weights are the global ones plus
noise of std 0.01, encoded by the ClientApp's own ``client.transport.encode_update``).

Reports the median wall time of ``repeats`` timed calls per site count (after one warm-up)
and the median process CPU time (numpy runs these loops on one thread, so on a loaded
machine CPU time is the closer estimate of the idle wall time), a least-squares line
ms = intercept + slope x sites (wall and CPU) with its R^2, a table, the JSON and a plot. The
target (issue #14 point 4): at most 20 ms at 10 sites, linear up to 100 sites. Times depend
on the machine's load: the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from client.transport import encode_update
from omnifuse_model import federation_schema as wire
from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.federation_replies import SiteDeclaration
from omnifuse_model.model import OmniFuse
from omnifuse_model.wire_format import TRANSPORT_DTYPES, held_modalities
from server.run_config import FederationRunConfig
from server.site_registry import SiteRegistry
from server.strategy import OmniFuseStrategy
from simulation.benchmarks.federation import SMALL_MODEL, BenchmarkConfig

SITES = (1, 2, 5, 10, 20, 50, 100)
TARGET_MS_AT_10 = 20.0
TRAIN_SIZE = 200


def model_config(quick: bool) -> OmniFuseConfig:
    """The paper-size model (``--model paper`` of the federation benchmark), or a small one."""
    return BenchmarkConfig(model=SMALL_MODEL if quick else {}).omnifuse_config()


def site_counts(index: int, names: list[str]) -> dict[str, int]:
    lacking = names[index % 4] if index % 4 < len(names) else None
    present = {m: 0 if m == lacking else TRAIN_SIZE // 2 for m in names}
    return {wire.NUM_EXAMPLES: TRAIN_SIZE, **{wire.present_key(m): n for m, n in present.items()}}


def _reply(node: int, content: RecordDict) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"reply-{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id=f"request-{node}",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=MessageType.TRAIN,
    )
    return Message(metadata=metadata, content=content)


def site_replies(
    config: OmniFuseConfig,
    master: dict[str, torch.Tensor],
    run: FederationRunConfig,
    sites: int,
    server_round: int = 1,
) -> tuple[SiteRegistry, list[Message]]:
    """A registry binding ``sites`` nodes, and one valid train reply per node for
    ``server_round``."""
    names = config.modality_names
    registry = SiteRegistry()
    replies = []
    generator = torch.Generator().manual_seed(sites)
    for index in range(sites):
        counts = site_counts(index, names)
        present = {m: counts[wire.present_key(m)] for m in names}
        declaration = SiteDeclaration(
            site=f"site_{index:03d}", num_train=TRAIN_SIZE, num_val=50, num_present=present
        )
        registry.bind(100 + index, declaration, connected=set())
        local = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in master.items()}
        wire_format = run.wire_format()
        held = held_modalities(present) if wire_format.omit_unheld else None
        audit = wire.AuditRow(
            site=declaration.site,
            round=server_round,
            num_examples=TRAIN_SIZE,
            availability_counts={},
            tla_scores={},
            lazy_combination=None,
            mean_dwfuse_weight={},
            imputation_error={},
            val_auroc=0.75,
            min_count=run.audit_min_count,
        )
        metrics = {
            **counts,
            wire.TRAIN_LOSS: 0.5,
            wire.TRAIN_SECONDS: 1.0,
            wire.VAL_AUROC: 0.75,
            wire.VAL_AUPRC: 0.5,
        }
        content = RecordDict(
            {
                wire.ARRAYS: encode_update(local, master, wire_format, names, held),
                wire.METRICS: MetricRecord(metrics),
                wire.AUDIT: ConfigRecord(wire.encode_audit(audit)),
            }
        )
        replies.append(_reply(100 + index, content))
    return registry, replies


def time_rounds(transport: str, sites: int, repeats: int, quick: bool) -> dict:
    """Median ms of a round's strategy work over ``repeats`` fresh strategies (one warm-up).

    Per strategy: round 1 (``aggregate_train`` on the initial weights: the layout is built),
    then round 2, the steady state of every later round: ``aggregate_train`` alone
    (``ms``), and with the arrays work of the next evaluate and train configuration
    (``round_ms``: ``round_arrays`` of the record it returned, the master weights and the
    downlink, twice, as Flower asks for them)."""
    config = model_config(quick)
    torch.manual_seed(0)
    master = OmniFuse(config).state_dict()
    root = Path(".")
    run = FederationRunConfig(
        scenario_dir=root, run_dir=root, transport=transport, min_train_nodes=1
    )
    registry, replies = site_replies(config, master, run, sites)
    _, second = site_replies(config, master, run, sites, server_round=2)
    first = ArrayRecord({k: Array(v.numpy()) for k, v in master.items()})
    timed: dict[str, list[float]] = {k: [] for k in ("first", "ms", "cpu", "round", "round_cpu")}
    for repeat in range(repeats + 1):
        strategy = OmniFuseStrategy(run, config, registry=registry)
        strategy.previous, _ = strategy.weights.round_arrays(first)  # round 1's configure_train
        started = time.perf_counter()
        result, _ = strategy.aggregate_train(1, replies)
        first_ms = 1000 * (time.perf_counter() - started)
        if result is None:  # timing the refusal path would be meaningless
            raise RuntimeError(f"round 1 not aggregated: {strategy.records[1].problems[:2]}")
        strategy.previous, _ = strategy.weights.round_arrays(result)  # round 2's configure_train
        started, started_cpu = time.perf_counter(), time.process_time()
        result, _ = strategy.aggregate_train(2, second)
        elapsed, elapsed_cpu = time.perf_counter() - started, time.process_time() - started_cpu
        strategy.weights.round_arrays(result)  # configure_evaluate of round 2
        strategy.weights.round_arrays(result)  # configure_train of round 3
        whole, whole_cpu = time.perf_counter() - started, time.process_time() - started_cpu
        for round_id in (1, 2):
            if len(strategy.records[round_id].accepted_sites) != sites:
                raise RuntimeError(f"{sites} sites, {transport}: not every reply was accepted")
        if repeat:
            for key, value in zip(
                timed, (first_ms, elapsed, elapsed_cpu, whole, whole_cpu), strict=True
            ):
                timed[key].append(value if key == "first" else 1000 * value)
    return {
        "transport": transport,
        "sites": sites,
        "ms": statistics.median(timed["ms"]),
        "ms_all": timed["ms"],
        "cpu_ms": statistics.median(timed["cpu"]),
        "round_ms": statistics.median(timed["round"]),
        "round_cpu_ms": statistics.median(timed["round_cpu"]),
        "first_round_ms": statistics.median(timed["first"]),
        "server_threads": strategy.weights.threads,
        "received_bytes": strategy.records[2].bytes["received"],
    }


def fit_line(rows: list[dict], field: str = "ms") -> dict:
    """Least squares ``field`` = intercept + slope x sites, and its R^2."""
    x = np.array([r["sites"] for r in rows], dtype=float)
    y = np.array([r[field] for r in rows], dtype=float)
    if len(rows) < 2:
        return {"slope_ms_per_site": None, "intercept_ms": None, "r2": None}
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else 1.0
    return {"slope_ms_per_site": float(slope), "intercept_ms": float(intercept), "r2": r2}


def run_benchmark(sites: list[int], transports: list[str], repeats: int, quick: bool) -> dict:
    load_before = os.getloadavg()
    rows: list[dict] = []
    with Progress(transient=True) as progress:
        task = progress.add_task("strategy rounds", total=len(sites) * len(transports))
        for transport in transports:
            for count in sites:
                rows.append(time_rounds(transport, count, repeats, quick))
                progress.advance(task)
    fits = {t: fit_line([r for r in rows if r["transport"] == t]) for t in transports}
    cpu_fits = {t: fit_line([r for r in rows if r["transport"] == t], "cpu_ms") for t in transports}
    at_ten = {t: next((r["ms"] for r in rows if r["transport"] == t and r["sites"] == 10), None)
              for t in transports}  # fmt: skip
    return {
        "benchmark": "strategy_cost",
        "model": "small" if quick else "paper (d 128, K 5)",
        "parameters": int(sum(v.numel() for v in OmniFuse(model_config(quick)).parameters())),
        "repeats": repeats,
        "rows": rows,
        "fits": fits,
        "cpu_fits": cpu_fits,
        "ms_at_10_sites": at_ten,
        "target_ms_at_10_sites": TARGET_MS_AT_10,
        "meets_target": {t: v is not None and v <= TARGET_MS_AT_10 for t, v in at_ten.items()},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def print_report(result: dict, console: Console) -> None:
    table = Table(title=f"aggregate_train, median ms per round ({result['model']})")
    table.add_column("sites", justify="right")
    transports = list(result["fits"])
    for transport in transports:
        table.add_column(f"{transport} wall ms", justify="right")
        table.add_column(f"{transport} CPU ms", justify="right")
    for count in sorted({r["sites"] for r in result["rows"]}):
        cells = []
        for transport in transports:
            row = next(
                (r for r in result["rows"] if r["sites"] == count and r["transport"] == transport),
                None,
            )
            cells += [f"{row['ms']:.1f}", f"{row['cpu_ms']:.1f}"] if row else ["-", "-"]
        table.add_row(str(count), *cells)
    console.print(table)
    for kind, fits in (("wall", result["fits"]), ("CPU", result["cpu_fits"])):
        for transport, fit in fits.items():
            if fit["slope_ms_per_site"] is not None:
                console.print(
                    f"{transport} {kind}: ms = {fit['intercept_ms']:.2f} + "
                    f"{fit['slope_ms_per_site']:.3f} x sites, R^2 {fit['r2']:.4f}"
                )
    load = ", ".join(f"{v:.2f}" for v in result["loadavg_before"])
    console.print(f"load average before: {load}; target <= {TARGET_MS_AT_10} ms at 10 sites")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(6, 4))
    for transport, fit in result["fits"].items():
        rows = [r for r in result["rows"] if r["transport"] == transport]
        x = [r["sites"] for r in rows]
        axis.plot(x, [r["ms"] for r in rows], "o", label=f"{transport} wall (median)")
        axis.plot(x, [r["cpu_ms"] for r in rows], "x", label=f"{transport} CPU (median)")
        if fit["slope_ms_per_site"] is not None:
            line = [fit["intercept_ms"] + fit["slope_ms_per_site"] * s for s in x]
            axis.plot(x, line, "-", alpha=0.6, label=f"{transport} fit, R^2 {fit['r2']:.3f}")
    axis.axhline(TARGET_MS_AT_10, color="grey", linestyle=":", label="20 ms (target at 10 sites)")
    axis.set_xlabel("sites")
    axis.set_ylabel("ms per round (aggregate_train)")
    axis.set_title(f"Strategy cost, {result['model']}")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=list(SITES))
    parser.add_argument(
        "--transports",
        nargs="+",
        choices=TRANSPORT_DTYPES,
        default=["float16", "bfloat16", "float32"],
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small model, 1 and 2 sites, 1 repeat")
    parser.add_argument("--out", type=Path, default=Path("benchmark_results/strategy_cost.json"))
    args = parser.parse_args(argv)
    sites, repeats = ([1, 2], 1) if args.quick else (args.sites, args.repeats)
    if min(sites) < 1 or repeats < 1:
        parser.error(f"--sites {sites} and --repeats {repeats}: expected positive integers")
    result = run_benchmark(sites, args.transports, repeats, args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print_report(result, Console())
    return result


if __name__ == "__main__":
    main()

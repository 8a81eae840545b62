"""Local DP-SGD: test AUROC against the privacy budget, and the cost of a DP-SGD step.

    python -m simulation.benchmarks.privacy [--seeds 2] [--epochs 10] [--n-train 2000]

(a) Utility: the fidelity benchmark's feature-level scenario (ehr strong and always present,
cxr medium and often missing, rep the planted lazy modality) trained centrally as one DP
'site' through ``client.privacy.private_fit`` (Opacus, Poisson sampling, the noise planned for
all epochs) at each target epsilon, and without DP (epsilon = inf: the plain ``fit``, same
epochs, no early stopping), then scored on a held-out test split.
(b) Cost: one training step of the full model (d 128, K 5) at batch 64 on inputs with the
MIMIC shapes (EHR 24 x 76, CXR features 512, report tokens L x 768), TLA active: the plain
model, the DP-SGD variant without Opacus (DPLSTM, per-sample placeholders), and the DP-SGD
step (per-sample gradients, clipping, noise).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from opacus import PrivacyEngine
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from client.privacy import PrivacyLedger, PrivacyPlan, collate_tensors, private_fit
from omnifuse_model.config import OmniFuseConfig, TrainConfig
from omnifuse_model.laziness import LazinessReport
from omnifuse_model.model import OmniFuse
from omnifuse_model.site_config import PrivacyConfig
from omnifuse_model.synthetic import make_synthetic_features
from omnifuse_model.training import evaluate, fit, sample_training_drop
from simulation.benchmarks.fidelity_data import default_scenario
from simulation.benchmarks.speed import full_config, make_inputs

DELTA = 1e-5


def utility_run(epsilon: float, seed: int, args: argparse.Namespace) -> dict:
    """Train at one budget (inf = no DP) and score the test split."""
    scenario = default_scenario()
    splits = {
        name: make_synthetic_features(scenario.model_copy(update={"seed": 100 * seed + i}), n)
        for i, (name, n) in enumerate((("train", args.n_train), ("test", args.n_test)))
    }
    config = OmniFuseConfig(
        modalities=scenario.modality_specs(),
        task="binary",
        d=32,
        num_blocks=2,
        cra_hidden=(64, 32),
        dp_compatible=math.isfinite(epsilon),
    )
    train = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch,
        lr=args.lr,
        seed=seed,
        patience=0,
        progress=False,
        bootstrap_samples=0,
    )
    torch.manual_seed(seed)
    model = OmniFuse(config)
    start = time.perf_counter()
    noise = 0.0
    if math.isfinite(epsilon):
        with tempfile.TemporaryDirectory() as directory:
            plan = PrivacyPlan(args.epochs, PrivacyLedger(Path(directory) / "l.json"), 1)
            privacy = PrivacyConfig(dp_sgd=True, target_epsilon=epsilon, target_delta=DELTA)
            outcome = private_fit("central", model, splits["train"], train, privacy, plan)
        spent, noise = outcome.epsilon, outcome.noise_multiplier
    else:
        fit(model, splits["train"], None, train, keep_best=False)
        spent = math.inf
    seconds = time.perf_counter() - start
    metrics = evaluate(model, splits["test"], train).metrics
    return {
        "target_epsilon": epsilon,
        "seed": seed,
        "epsilon_spent": spent,
        "noise_multiplier": noise,
        "test_auroc": metrics["auroc"],
        "test_auprc": metrics["auprc"],
        "train_seconds": seconds,
    }


def _step_inputs(batch: int, report_tokens: int):
    specs, data = make_inputs(batch, report_tokens, seed=0)
    generator = torch.Generator().manual_seed(0)
    drop = sample_training_drop(data.availability, 0.5, generator)
    inputs = (data.inputs, data.availability, data.masks, data.labels, drop)
    return specs, data, inputs


def time_steps(model: OmniFuse, optimizer, inputs: tuple, steps: int) -> list[float]:
    """Seconds of each of ``steps`` forward/backward/optimizer steps on one fixed batch."""
    model.train()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(*inputs).losses["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def step_cost(args: argparse.Namespace) -> dict:
    """Median step time of the plain model, the DP variant, and the DP-SGD step."""
    specs, data, inputs = _step_inputs(args.step_batch, args.report_tokens)
    base = full_config(specs, 128, 5)
    lazy = LazinessReport(lazy_combination=("cxr", "rep"))
    results = {}
    for name, dp_variant, private in (
        ("plain", False, False),
        ("dp variant, no Opacus", True, False),
        ("DP-SGD (Opacus)", True, True),
    ):
        torch.manual_seed(0)
        model = OmniFuse(base.model_copy(update={"dp_compatible": dp_variant}))
        model.set_laziness(lazy)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        hooks = None
        if private:
            loader = DataLoader(data, batch_size=args.step_batch, collate_fn=collate_tensors)
            hooks, optimizer, _ = PrivacyEngine(accountant="rdp").make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                wrap_model=False,
            )
        time_steps(model, optimizer, inputs, 1)  # warm-up
        times = time_steps(model, optimizer, inputs, args.steps)
        if hooks is not None:
            hooks.cleanup()
        median = statistics.median(times)
        results[name] = {
            "step_seconds": median,
            "samples_per_second": args.step_batch / median,
            "runs": times,
        }
    plain = results["plain"]["step_seconds"]
    for row in results.values():
        row["cost_vs_plain"] = row["step_seconds"] / plain
    return results


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    utility = [utility_run(eps, seed, args) for seed in range(args.seeds) for eps in args.epsilons]
    summary = {}
    for eps in args.epsilons:
        rows = [r for r in utility if r["target_epsilon"] == eps]
        aurocs = [r["test_auroc"] for r in rows]
        summary[str(eps)] = {
            "test_auroc_mean": statistics.mean(aurocs),
            "test_auroc_sd": statistics.stdev(aurocs) if len(aurocs) > 1 else 0.0,
            "epsilon_spent_mean": statistics.mean(r["epsilon_spent"] for r in rows),
            "noise_multiplier": rows[0]["noise_multiplier"],
            "train_seconds_mean": statistics.mean(r["train_seconds"] for r in rows),
        }
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "utility": {"runs": utility, "summary": summary},
        "step_cost": step_cost(args),
    }


def print_report(result: dict, console: Console) -> None:
    settings = result["settings"]
    table = Table(
        title=(
            "Test AUROC against the DP budget (delta {delta:g}; {n_train} training samples, "
            "{epochs} epochs, batch {batch}, {seeds} seeds)"
        ).format(delta=DELTA, **settings)
    )
    for column in ("target epsilon", "epsilon spent", "noise multiplier", "test AUROC", "train s"):
        table.add_column(column, justify="right")
    for eps, row in result["utility"]["summary"].items():
        table.add_row(
            "inf (no DP)" if eps == "inf" else eps,
            "-" if math.isinf(row["epsilon_spent_mean"]) else f"{row['epsilon_spent_mean']:.2f}",
            f"{row['noise_multiplier']:.2f}",
            f"{row['test_auroc_mean']:.3f} ± {row['test_auroc_sd']:.3f}",
            f"{row['train_seconds_mean']:.1f}",
        )
    console.print(table)
    title = "Training step at batch {step_batch} (d 128, K 5, report tokens {report_tokens})"
    cost = Table(title=title.format(**settings))
    for column in ("step", "ms/step", "samples/s", "x plain"):
        cost.add_column(column, justify="right")
    for name, row in result["step_cost"].items():
        cost.add_row(
            name,
            f"{1000 * row['step_seconds']:.0f}",
            f"{row['samples_per_second']:.0f}",
            f"{row['cost_vs_plain']:.2f}",
        )
    console.print(cost)


def _json_safe(value: object) -> object:
    """Infinite budgets as the string 'inf' (JSON has no infinity)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[math.inf, 8.0, 3.0, 1.0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--step-batch", type=int, default=64)
    parser.add_argument("--report-tokens", type=int, default=150)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="benchmark_results/privacy.json")
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        result = run(args)
    print_report(result, Console())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_json_safe(result), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

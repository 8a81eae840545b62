"""Robust aggregation under one malicious site, and the cost of ``aggregate_states``.

    python -m simulation.benchmarks.robust_aggregation [--seeds 0 1] [--rounds R] [--quick]
        [--out benchmark_results/robust/]

(a) Attacks. Ten feature-level synthetic sites (``simulation.central.default_synthetic``: ehr
strong, cxr medium, rep the planted lazy modality; sites cycle through all three / no rep / no
cxr; skewed sizes, site i holds a share proportional to 1 / (i + 1)). Site 0, the largest,
is malicious: it trains honestly with ``client.local_training.train_round`` and then sends,
with its honest counts, global + a * delta where delta is its honest update:

- ``none`` (a = 1), ``scale-x10`` (a = 10), ``scale-x100`` (a = 100),
- ``sign-flip-x10`` (a = -10),
- ``noise``: global + Gaussian noise scaled to the honest update's L2 norm.

Each round runs in-process: every site's ``train_round`` from the global weights, the attack,
the server's update validation as deployed (``server.update_validation.update_rejection``
with the run config's default ``max_update_norm``), ``server.aggregation.aggregate_states``
with the rule (modality-aware; trimmed-mean drops floor(0.2 x n) sites per end: two of ten,
one of the seven that hold cxr or rep), then
the global model's AUROC on a held-out test set. Round 1 starts every (rule, attack) from the
same global weights, so its honest site updates are computed once per seed and reused, and
``deviation_round1`` (L2 distance of the round-1 aggregate to FedAvg of the ten honest updates)
compares rules on the same inputs.

(b) Cost. Milliseconds per call of ``aggregate_states`` per rule on states with the
paper-size model's shapes (d 128, K 5, built as ``simulation.benchmarks.federation`` does),
for 10 and 100 sites, against the former float64 per-key average (``float64_reference``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, model_validator
from rich.console import Console

from client.local_training import RoundInstructions, train_round
from omnifuse_model import federation_schema as wire
from omnifuse_model.config import OmniFuseConfig, StrictModel, TrainConfig
from omnifuse_model.model import OmniFuse
from omnifuse_model.site_config import SiteConfig
from omnifuse_model.site_data import SiteDatasets, load_site_datasets
from omnifuse_model.synthetic import SyntheticFeatureConfig, make_synthetic_features
from omnifuse_model.training import evaluate
from server.aggregation import RULES, aggregate_states
from server.run_config import FederationRunConfig
from server.update_validation import update_rejection
from simulation.benchmarks.federation import PATTERNS, SMALL_MODEL, BenchmarkConfig
from simulation.benchmarks.robust_aggregation_report import print_report, summarize
from simulation.central import default_synthetic

ATTACKS = ("none", "scale-x10", "scale-x100", "sign-flip-x10", "noise")
SCALES = {"none": 1.0, "scale-x10": 10.0, "scale-x100": 100.0, "sign-flip-x10": -10.0}
DEFAULT_MAX_NORM = FederationRunConfig.model_fields["max_update_norm"].default
State = dict[str, np.ndarray]


class RobustBenchmarkConfig(StrictModel):
    """Everything that fixes the attack benchmark's numbers (written to the JSON as is)."""

    data: SyntheticFeatureConfig = Field(default_factory=default_synthetic)
    model: dict = Field(
        default_factory=lambda: dict(SMALL_MODEL),
        description="OmniFuseConfig overrides; default the federation benchmark's small model.",
    )
    num_sites: int = Field(default=10, ge=3)
    malicious_site: int = Field(default=0, ge=0)
    total_train: int = Field(default=1200, gt=0)
    val_fraction: float = Field(default=0.25, gt=0)
    min_val: int = Field(default=20, gt=0)
    test_size: int = Field(default=1000, gt=0)
    rounds: int = Field(default=3, gt=0)
    local_epochs: int = Field(default=1, gt=0)
    batch_size: int = Field(default=32, gt=0)
    lr: float = Field(default=3e-3, gt=0)
    trim_fraction: float = Field(default=0.2, ge=0, lt=0.5)  # the run config's default
    max_update_norm: float = Field(default=DEFAULT_MAX_NORM, ge=0)
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    rules: list[str] = Field(default_factory=lambda: list(RULES))
    attacks: list[str] = Field(default_factory=lambda: list(ATTACKS))

    @model_validator(mode="after")
    def _known_names(self) -> RobustBenchmarkConfig:
        if self.malicious_site >= self.num_sites:
            raise ValueError(f"malicious_site {self.malicious_site}: expected < {self.num_sites}")
        unknown = sorted(set(self.rules) - set(RULES)) + sorted(set(self.attacks) - set(ATTACKS))
        if unknown:
            raise ValueError(f"unknown rules/attacks {unknown}: expected {RULES} and {ATTACKS}")
        return self

    def omnifuse_config(self) -> OmniFuseConfig:
        base = {"modalities": self.data.modality_specs(), "task": self.data.task}
        return OmniFuseConfig.model_validate({**base, **self.model})

    def sites(self, seed: int) -> list[SiteConfig]:
        shares = [1 / (i + 1) for i in range(self.num_sites)]
        sites = []
        for i, share in enumerate(shares):
            train = max(20, round(self.total_train * share / sum(shares)))
            val = max(self.min_val, round(train * self.val_fraction))
            synthetic = self.data.model_copy(update={"seed": 1000 * seed + i})
            data = {"source": "synthetic_features", "synthetic": synthetic}
            sites.append(
                SiteConfig(
                    name=f"site_{i}",
                    modalities=list(PATTERNS[i % len(PATTERNS)]),
                    data={**data, "synthetic_sizes": (train, val)},
                )
            )
        return sites


def attacked(honest: State, global_state: State, attack: str, seed: int) -> State:
    """What the malicious site sends instead of its honest state."""
    if attack in SCALES:
        return {k: global_state[k] + SCALES[attack] * (honest[k] - global_state[k]) for k in honest}
    if attack != "noise":
        raise ValueError(f"attack {attack!r}: expected one of {', '.join(ATTACKS)}")
    rng = np.random.default_rng(seed)
    noise = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in honest.items()}
    norm = _distance(honest, global_state) / math.sqrt(
        sum(float(np.sum(v**2)) for v in noise.values())
    )
    return {k: global_state[k] + norm * noise[k] for k in honest}


def _distance(a: State, b: State) -> float:
    return math.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in a))


class Federation:
    """One seed's sites, test set and initial weights; runs (rule, attack) in-process."""

    def __init__(self, config: RobustBenchmarkConfig, seed: int) -> None:
        self.config, self.seed = config, seed
        self.model_config = config.omnifuse_config()
        self.sites = config.sites(seed)
        self.data: list[SiteDatasets] = [
            load_site_datasets(site, self.model_config) for site in self.sites
        ]
        test_data = config.data.model_copy(update={"seed": 1000 * seed + 999})
        self.test = make_synthetic_features(test_data, config.test_size)
        torch.manual_seed(seed)
        self.initial = {
            k: v.numpy().copy() for k, v in OmniFuse(self.model_config).state_dict().items()
        }
        self.first_round = self._train_all(self.initial, 1, {})

    def _instructions(self, global_round: int, lazy: tuple[str, ...] | None) -> RoundInstructions:
        train = TrainConfig(
            epochs=self.config.local_epochs,
            batch_size=self.config.batch_size,
            lr=self.config.lr,
            seed=self.seed * 1_000_003 + global_round,
            patience=0,
            progress=False,
            bootstrap_samples=0,
        )
        return RoundInstructions(self.model_config, train, global_round, lazy_combination=lazy)

    def _train_all(self, global_state: State, global_round: int, lazy: dict) -> list[tuple]:
        """Every site's honest (state, counts, lazy combination) for one round."""
        torch_state = {k: torch.from_numpy(v.copy()) for k, v in global_state.items()}
        results = []
        for site, data in zip(self.sites, self.data, strict=True):
            instructions = self._instructions(global_round, lazy.get(site.name))
            result = train_round(site.name, data, instructions, torch_state)
            state = {k: v.numpy() for k, v in result.state.items()}
            combination = result.laziness.lazy_combination if result.laziness else None
            results.append((state, result.metrics, combination))
        return results

    def test_auroc(self, state: State) -> float:
        model = OmniFuse(self.model_config)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
        config = TrainConfig(batch_size=256, progress=False, bootstrap_samples=0, seed=self.seed)
        return float(evaluate(model, self.test, config, imputation_error=False).metrics["auroc"])

    def run(self, rule: str, attack: str) -> dict:
        """R rounds of (train, attack, validate, aggregate, test) for one rule and attack."""
        names = self.model_config.modality_names
        global_state, lazy, rejected, aurocs, deviation = self.initial, {}, [], [], None
        for global_round in range(1, self.config.rounds + 1):
            results = (
                self.first_round
                if global_round == 1
                else self._train_all(global_state, global_round, lazy)
            )
            states, counts = [], []
            for index, (state, metrics, combination) in enumerate(results):
                if combination:
                    lazy[self.sites[index].name] = combination
                if index == self.config.malicious_site:
                    state = attacked(state, global_state, attack, self.seed * 7919 + global_round)
                reason = update_rejection(
                    state, global_state, metrics, names, self.config.max_update_norm or None
                )
                if reason is not None:
                    rejected.append({"round": global_round, "site": index, "reason": reason})
                    continue
                states.append(state)
                counts.append(metrics)
            aggregate = (
                aggregate_states(
                    states,
                    counts,
                    names,
                    global_state,
                    rule=rule,
                    trim_fraction=self.config.trim_fraction,
                )
                if states
                else global_state
            )
            if global_round == 1:
                honest = aggregate_states(
                    [r[0] for r in results], [r[1] for r in results], names, global_state
                )
                deviation = _distance(aggregate, honest)
            global_state = aggregate
            aurocs.append(self.test_auroc(global_state))
        return {
            "rule": rule,
            "attack": attack,
            "seed": self.seed,
            "test_auroc": aurocs[-1],
            "test_auroc_per_round": aurocs,
            "rejected": rejected,
            "deviation_round1": deviation,
        }


# -- (b) the cost of aggregate_states ---------------------------------------------------------
def float64_reference(
    states: list[State],
    metrics: list[dict[str, float]],
    modality_names: list[str],
    previous: State | None,
    modality_aware: bool = True,
    uniform: bool = False,
) -> State:
    """The former ``server.strategy.modality_aware_average`` (float64, one key at a time),
    kept verbatim as the reference the float32 FedAvg is tested and timed against."""
    if not states:
        raise ValueError("no site states to aggregate")
    keys = list(states[0])
    for index, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            raise ValueError(f"site state {index} has different parameter keys")
    examples = np.array([float(m[wire.NUM_EXAMPLES]) for m in metrics])
    if uniform:
        examples = np.ones(len(states))
        modality_aware = False
    result: State = {}
    for key in keys:
        modality = wire.parameter_modality(key, modality_names) if modality_aware else None
        weights = (
            np.array([float(m[wire.present_key(modality)]) for m in metrics])
            if modality is not None
            else examples
        )
        if weights.sum() <= 0:
            if previous is None:
                raise ValueError(f"parameter '{key}': no site trained it and no previous value")
            result[key] = previous[key]
            continue
        stacked = np.stack([state[key].astype(np.float64) for state in states])
        average = np.tensordot(weights / weights.sum(), stacked, axes=1)
        result[key] = average.astype(states[0][key].dtype)
    return result


def paper_size_sites(num_sites: int, seed: int = 0) -> tuple[list[State], list[dict], list[str]]:
    """Perturbed copies of the paper-size model's state; site i lacks modality i mod 4 (0..2)."""
    config = BenchmarkConfig().omnifuse_config()
    torch.manual_seed(seed)
    base = {k: v.numpy() for k, v in OmniFuse(config).state_dict().items()}
    rng = np.random.default_rng(seed)
    names = config.modality_names
    states, counts = [], []
    for i in range(num_sites):
        states.append(
            {k: v + 0.01 * rng.standard_normal(v.shape, dtype=np.float32) for k, v in base.items()}
        )
        n = 100 + 10 * i
        lacking = names[i % 4] if i % 4 < len(names) else None
        present = {wire.present_key(m): 0 if m == lacking else n // 2 for m in names}
        counts.append({wire.NUM_EXAMPLES: n, **present})
    return states, counts, names


def _milliseconds(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def _time_rules(states: list[State], counts: list[dict], names: list[str], repeats: int) -> dict:
    row: dict = {}
    for rule in RULES:
        row[rule] = _milliseconds(
            lambda rule=rule: aggregate_states(states, counts, names, None, rule=rule), repeats
        )
    row["float64 reference"] = _milliseconds(
        lambda: float64_reference(states, counts, names, None), max(1, repeats // 3)
    )
    row["speed-up fedavg"] = row["float64 reference"] / row["fedavg"]
    return row


def time_aggregation(site_counts: list[int], repeats: int) -> list[dict]:
    """Median ms per call of each rule and of the float64 reference, per site count."""
    rows = []
    for num_sites in site_counts:
        states, counts, names = paper_size_sites(num_sites)
        parameters = sum(v.size for v in states[0].values())
        rows.append({"sites": num_sites, "parameters": parameters})
        rows[-1].update(_time_rules(states, counts, names, repeats))
        del states
    return rows


# -- command line -----------------------------------------------------------------------------
def run(
    config: RobustBenchmarkConfig, cost_sites: list[int], repeats: int, console: Console
) -> dict:
    started, load_before = time.perf_counter(), os.getloadavg()
    runs = []
    for seed in config.seeds:
        federation = Federation(config, seed)
        for rule in config.rules:
            for attack in config.attacks:
                runs.append(federation.run(rule, attack))
                console.print(
                    f"seed {seed} {rule:>12} {attack:>13}: AUROC {runs[-1]['test_auroc']:.3f}"
                )
    cost = time_aggregation(cost_sites, repeats)
    return {
        "config": config.model_dump(mode="json"),
        "model_config": config.omnifuse_config().model_dump(mode="json"),
        "machine": {
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "numpy": np.__version__,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "summary": summarize(runs),
        "runs": runs,
        "cost": cost,
        "seconds": time.perf_counter() - started,
    }


QUICK = {
    "model": {"d": 16, "num_blocks": 1, "cra_hidden": [16]},
    "total_train": 800,
    "test_size": 300,
    "rounds": 2,
    "seeds": [0],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", help="default 0 1 (0 with --quick)")
    parser.add_argument("--rounds", type=int, help="default 3 (2 with --quick)")
    parser.add_argument(
        "--cost-sites", type=int, nargs="+", help="default 10 100 (10 with --quick)"
    )
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per rule (cost)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny model and data, 2 rounds, 1 seed"
    )
    parser.add_argument("--trim-fraction", type=float, help="trimmed mean, per end (default 0.2)")
    parser.add_argument("--out", default="benchmark_results/robust/", help="folder for the JSON")
    args = parser.parse_args(argv)
    overrides: dict = dict(QUICK) if args.quick else {}
    for key in ("seeds", "rounds", "trim_fraction"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    config = RobustBenchmarkConfig.model_validate(overrides)
    cost_sites = args.cost_sites or ([10] if args.quick else [10, 100])
    repeats = min(args.repeats, 3) if args.quick else args.repeats
    console = Console()
    result = run(config, cost_sites, repeats, console)
    result["argv"] = sys.argv[1:] if argv is None else argv
    print_report(result, console)
    out = Path(args.out) / (
        "robust_aggregation_quick.json" if args.quick else "robust_aggregation.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    console.print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

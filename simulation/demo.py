"""The main job: synthetic MIMIC-format data -> sites -> feature caches -> `flwr run` -> audit.

Every step is the real one a researcher would run by hand (`omnifuse synth`, `partition`,
`prepare`, `federate`, `audit`); this module only strings them together with the embedded
defaults and says where each result went. Re-running reuses the data and the feature caches.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import Field
from rich.console import Console
from rich.rule import Rule

from omnifuse_model.config import StrictModel
from simulation.federate_command import FLWR_WORK_DIR
from simulation.federation import run_federation
from simulation.partition import PartitionConfig, default_site_plans, partition
from simulation.preparation import prepare_scenario
from simulation.safe_paths import remove_tree, writable
from simulation.synthetic_mimic.writer import (
    ModalitySignal,
    SyntheticMimicConfig,
    write_synthetic_mimic,
)


class DemoConfig(StrictModel):
    """The embedded default: small enough for a few minutes on 2 cores."""

    stays: int = Field(default=800, gt=0)
    sites: int = Field(default=3, gt=0)
    rounds: int = Field(default=3, gt=0)
    local_epochs: int = Field(default=2, gt=0)
    d: int = Field(default=32, gt=0)
    seed: int = 0
    label_alpha: float | None = Field(default=None, gt=0)

    def synthetic(self) -> SyntheticMimicConfig:
        # Reports are the planted lazy modality: weak signal under strong noise.
        return SyntheticMimicConfig(
            num_stays=self.stays,
            seed=self.seed,
            report=ModalitySignal(signal=0.3, noise=2.0),
            image_size=64,
        )


def _synthetic_data(out: Path, config: DemoConfig, console: Console) -> Path:
    data = out / "data"
    if (data / "synthetic_summary.json").is_file():
        console.print(f"reusing {data}")
    else:
        remove_tree(out, data)
        write_synthetic_mimic(config.synthetic(), data)
        console.print(f"wrote {config.stays} synthetic stays to {data}")
    return data


def _partition(out: Path, data: Path, config: DemoConfig, console: Console) -> Path:
    scenario_dir = out / "scenario"
    plans = default_site_plans(config.sites, seed=config.seed)
    partition(
        PartitionConfig(
            data_dir=data, sites=plans, label_alpha=config.label_alpha, seed=config.seed, d=config.d
        ),
        scenario_dir,
        console,
    )
    return scenario_dir


def _federate(out: Path, scenario_dir: Path, config: DemoConfig) -> Path:
    run_dir = out / "federation"
    remove_tree(out, run_dir)
    run_federation(
        {
            "scenario-dir": str(scenario_dir),
            "run-dir": str(run_dir),
            "num-server-rounds": config.rounds,
            "local-epochs": config.local_epochs,
            "seed": config.seed,
            "min-train-nodes": min(2, config.sites),
            "min-evaluate-nodes": min(2, config.sites),
            "min-available-nodes": config.sites,
        },
        num_supernodes=config.sites,
        work_dir=run_dir / FLWR_WORK_DIR,  # its own SuperLink state and FLWR_HOME; free port
    )
    return run_dir


Result = TypeVar("Result")


def _step(
    console: Console,
    title: str,
    timings: dict[str, float],
    key: str,
    action: Callable[[], Result],
) -> Result:
    """Run one step under its heading; its seconds go to ``timings[key]``."""
    console.print(Rule(title))
    start = time.perf_counter()
    result = action()
    timings[key] = time.perf_counter() - start
    return result


def run_demo(out: Path, config: DemoConfig, console: Console | None = None) -> dict:
    """Run every step into ``out``; returns where things are."""
    from server.audit_report import build_report, print_report

    console = console or Console()
    out = Path(out).resolve()
    timings: dict[str, float] = {}
    data = _step(
        console,
        "1/5 synthetic MIMIC-format data",
        timings,
        "synth",
        lambda: _synthetic_data(out, config, console),
    )
    scenario_dir = _step(
        console,
        "2/5 partition into sites",
        timings,
        "partition",
        lambda: _partition(out, data, config, console),
    )
    _step(
        console,
        "3/5 prepare feature caches (frozen backbones, once per item)",
        timings,
        "prepare",
        lambda: prepare_scenario(scenario_dir, console),
    )
    run_dir = _step(
        console,
        "4/5 federated training: flwr run (Flower simulation engine)",
        timings,
        "federation",
        lambda: _federate(out, scenario_dir, config),
    )
    console.print(Rule("5/5 audit"))
    report = build_report(run_dir)
    print_report(report, console)
    result = {
        "data": str(data),
        "scenario": str(scenario_dir),
        "run_dir": str(run_dir),
        "audit_report": str(report.out_dir),
        "flwr_log": str(run_dir / FLWR_WORK_DIR / "flwr_run.log"),
        "seconds": timings,
    }
    writable(out, out / "demo_result.json").write_text(json.dumps(result, indent=2))
    console.print(Rule("done"))
    console.print(f"audit report (report.html, report.md, plots, report.json): {report.out_dir}")
    console.print(f"checkpoints, metrics.json, audit.csv: {run_dir}")
    console.print("seconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return result

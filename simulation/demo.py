"""The main job: synthetic MIMIC-format data -> sites -> feature caches -> `flwr run` -> audit.

Every step is the real one a researcher would run by hand (`omnifuse synth`, `partition`,
`prepare`, `federate`, `audit`); this module only strings them together with the embedded
defaults and says where each result went. Re-running reuses the data and the feature caches.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from pydantic import Field
from rich.console import Console
from rich.rule import Rule

from omnifuse_model.config import StrictModel
from simulation.federation import run_federation
from simulation.partition import PartitionConfig, default_site_plans, partition
from simulation.preparation import prepare_scenario
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


def run_demo(out: Path, config: DemoConfig, console: Console | None = None) -> dict:
    """Run every step into ``out``; returns where things are."""
    console = console or Console()
    out = Path(out).resolve()
    timings: dict[str, float] = {}

    console.print(Rule("1/5 synthetic MIMIC-format data"))
    start = time.perf_counter()
    data = out / "data"
    if (data / "synthetic_summary.json").is_file():
        console.print(f"reusing {data}")
    else:
        shutil.rmtree(data, ignore_errors=True)
        write_synthetic_mimic(config.synthetic(), data)
        console.print(f"wrote {config.stays} synthetic stays to {data}")
    timings["synth"] = time.perf_counter() - start

    console.print(Rule("2/5 partition into sites"))
    start = time.perf_counter()
    scenario_dir = out / "scenario"
    partition(
        PartitionConfig(
            data_dir=data,
            sites=default_site_plans(config.sites, seed=config.seed),
            label_alpha=config.label_alpha,
            seed=config.seed,
            d=config.d,
        ),
        scenario_dir,
        console,
    )
    timings["partition"] = time.perf_counter() - start

    console.print(Rule("3/5 prepare feature caches (frozen backbones, once per item)"))
    start = time.perf_counter()
    prepare_scenario(scenario_dir, console)
    timings["prepare"] = time.perf_counter() - start

    console.print(Rule("4/5 federated training: flwr run (Flower simulation engine)"))
    start = time.perf_counter()
    run_dir = out / "federation"
    shutil.rmtree(run_dir, ignore_errors=True)
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
        work_dir=out / "flwr",
    )
    timings["federation"] = time.perf_counter() - start

    console.print(Rule("5/5 audit"))
    from server.audit_report import build_report, print_report

    report = build_report(run_dir)
    print_report(report, console)
    result = {
        "data": str(data),
        "scenario": str(scenario_dir),
        "run_dir": str(run_dir),
        "audit_report": str(report.out_dir),
        "flwr_log": str(out / "flwr" / "flwr_run.log"),
        "seconds": timings,
    }
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    console.print(Rule("done"))
    console.print(f"audit report (tables, plots, report.json): {report.out_dir}")
    console.print(f"checkpoints, metrics.json, audit.csv: {run_dir}")
    console.print("seconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return result

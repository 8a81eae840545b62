"""`omnifuse federate`: `flwr run` a scenario in the local simulation, with progress.

One simulated node per site of the scenario, always (there is no option to differ: a node
count below the site count silently trained only some sites). The SuperLink gets a free
port and the run its own Flower work folder (``RUN_DIR/flwr``: FLWR_HOME, SuperLink state,
logs) unless ``--port`` / ``--work-dir`` say otherwise, so simultaneous runs do not collide.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from simulation.federation import DEFAULT_CLIENT_CPUS

DESCRIPTION = "`flwr run` a scenario in the local simulation, with progress"
FLWR_WORK_DIR = "flwr"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `federate` on the `omnifuse` command parser."""
    federate = commands.add_parser(
        "federate",
        help=DESCRIPTION,
        description=(
            f"{DESCRIPTION}. One simulated node per site of the scenario. Options given in "
            "--run-config are never overridden: --rounds/--resume apply only when given, "
            "and disagreeing values are an error."
        ),
    )
    federate.add_argument("--scenario", required=True, help="folder with scenario.json")
    federate.add_argument(
        "--run-dir", required=True, help="where checkpoints, metrics.json and audit rows go"
    )
    federate.add_argument(
        "--rounds",
        type=int,
        help="rounds to run (num-server-rounds); default: --run-config's, else pyproject's",
    )
    federate.add_argument(
        "--resume", action="store_true", help="continue from RUN_DIR's last checkpoint"
    )
    federate.add_argument(
        "--run-config",
        help="run-config keys as for `flwr run`: 'num-server-rounds=5 strategy=\"fedprox\"'",
    )
    federate.add_argument(
        "--work-dir", help="SuperLink state, FLWR_HOME and logs; default: RUN_DIR/flwr"
    )
    federate.add_argument(
        "--port", type=int, help="the SuperLink's port on 127.0.0.1; default: a free one"
    )
    federate.add_argument(
        "--client-cpus",
        type=_positive_int,
        default=DEFAULT_CLIENT_CPUS,
        help=(
            "CPUs Ray reserves per simulated site (clients at once = cores // this); default "
            f"{DEFAULT_CLIENT_CPUS}, measured fastest on 2 cores (docs/SCALING.md)"
        ),
    )
    federate.set_defaults(handler=run)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected a whole number >= 1")
    return value


def run(args: argparse.Namespace) -> int:
    """Check everything, then run with a progress display and print a summary table."""
    from omnifuse_model.scenario import Scenario
    from omnifuse_model.site_config import load_site_config
    from simulation.federation import run_federation
    from simulation.federation_progress import FederationProgress, read_rounds, summary_table
    from simulation.run_config_args import (
        app_config_defaults,
        federate_run_config,
        parse_run_config,
    )

    scenario_dir = Path(args.scenario).resolve()
    run_dir = Path(args.run_dir).resolve()
    scenario = Scenario.load(scenario_dir)
    known = app_config_defaults()
    values = federate_run_config(
        parse_run_config(args.run_config),
        scenario_dir=scenario_dir,
        run_dir=run_dir,
        num_sites=len(scenario.site_configs),
        rounds=args.rounds,
        resume=args.resume,
        known=known,
    )
    sites = [load_site_config(path).name for path in scenario.site_configs]
    values.setdefault("num-server-rounds", known["num-server-rounds"])  # checked at the end
    total = int(values["num-server-rounds"])  # type: ignore[arg-type]
    work = Path(args.work_dir).resolve() if args.work_dir else run_dir / FLWR_WORK_DIR
    console = Console()
    console.print(
        f"federating {len(scenario.site_configs)} site(s), {total} round(s); "
        f"flwr log: {work / 'flwr_run.log'}"
    )
    progress = FederationProgress(run_dir, total, sites, console)
    try:
        with progress:
            run_federation(
                values,
                num_supernodes=len(scenario.site_configs),
                work_dir=work,
                http_port=args.port,
                on_poll=progress,
                client_cpus=args.client_cpus,
            )
    finally:  # also after a failure: the rounds that did finish
        if rounds := read_rounds(run_dir):
            console.print(summary_table(rounds, progress.legend))
            if progress.legend.abbreviated:
                console.print(progress.legend.text())
    console.print(f"run written to {run_dir}")
    return 0

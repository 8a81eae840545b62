"""The `omnifuse` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

from simulation import (
    evaluate_command,
    experiment_command,
    federate_command,
    predict_command,
    train_command,
)
from simulation.option_types import integer, max_workers, number, seed
from simulation.safe_paths import check_output_folder
from simulation.site_cli import add_kit_command, add_site_commands


def _validate_config(args: argparse.Namespace) -> int:
    from rich.console import Console

    from omnifuse_model.site_config import SiteConfigError, load_site_config

    console, failures = Console(), 0
    for path in args.files:
        try:
            site = load_site_config(path)
        except SiteConfigError as error:
            console.print(f"[red]invalid[/red] {error}")
            failures += 1
            continue
        console.print(
            f"[green]ok[/green] {path}: site '{site.name}', task {site.task}, "
            f"modalities {site.modalities}, data source {site.data.source}"
        )
    return 1 if failures else 0


def _schema(args: argparse.Namespace) -> int:
    from omnifuse_model.scenario import scenario_json_schema
    from omnifuse_model.site_config import site_config_json_schema

    schema = scenario_json_schema if args.command == "scenario-schema" else site_config_json_schema
    text = schema()
    if args.out:
        out = Path(args.out)
        if not out.parent.is_dir():
            raise FileNotFoundError(f"{args.command} --out {out}: folder {out.parent} not found")
        out.write_text(text + "\n")
    else:
        print(text)
    return 0


def _audit(args: argparse.Namespace) -> int:
    from server.audit_report import build_report, print_report

    report = build_report(Path(args.run_dir), Path(args.out) if args.out else None, args.min_count)
    console = Console()
    print_report(report, console)
    console.print(f"audit report written to {report.out_dir}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from simulation.synthetic_mimic.writer import SyntheticMimicConfig, write_synthetic_mimic

    try:
        values = json.loads(args.config_json) if args.config_json else {}
    except json.JSONDecodeError as error:
        raise ValueError(f"synth --config-json: not JSON ({error})") from error
    check_output_folder(Path(args.out), "synth --out")
    values.update({"num_stays": args.stays, "seed": args.seed})
    if args.messy_rate is not None:
        values["messy_rate"] = args.messy_rate
    summary = write_synthetic_mimic(SyntheticMimicConfig.model_validate(values), Path(args.out))
    Console().print(
        f"wrote {args.stays} stays to {args.out} "
        f"({len(summary.messy_files)} messy files listed in synthetic_summary.json)"
    )
    return 0


def _partition(args: argparse.Namespace) -> int:
    from omnifuse_model.scenario import SCENARIO_FILE
    from simulation.partition import PartitionConfig, default_site_plans, partition

    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"partition --config {path}: no such file")
        try:
            config = PartitionConfig.model_validate(tomllib.loads(path.read_text()))
        except ValueError as error:  # TOML or pydantic: name the file
            raise ValueError(f"partition --config {path}: {error}") from error
    elif not args.data:
        raise ValueError(
            "partition: give --data FOLDER (the MIMIC-format data, e.g. from `omnifuse synth`) "
            "or --config FILE.toml"
        )
    else:
        config = PartitionConfig(
            data_dir=Path(args.data),
            task=args.task,
            sites=default_site_plans(args.sites, args.size_skew, args.seed),
            label_alpha=args.alpha,
            seed=args.seed,
        )
    out = check_output_folder(Path(args.out), "partition --out", [config.data_dir], SCENARIO_FILE)
    partition(config, out, min_count=args.min_count, strict=args.strict)
    Console().print(f"site views, site configs and scenario.json written to {args.out}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from omnifuse_model.data.features.cache import prepare_site
    from omnifuse_model.site_config import load_site_config
    from simulation.preparation import prepare_scenario

    if args.scenario:
        prepare_scenario(Path(args.scenario), num_workers=args.workers)
    for path in args.sites:
        summary = prepare_site(load_site_config(path), num_workers=args.workers)
        Console().print(f"{path}: {summary.hits} cache hits, {summary.misses} computed")
    if not args.scenario and not args.sites:
        raise ValueError("prepare: give site config files or --scenario DIR")
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from simulation.certificates import make_certificates, make_supernode_keys

    console = Console()
    if args.deploy_command == "certs":
        from omnifuse_model.site_config import host_problem

        for host in args.host:
            if host_problem(host):
                raise ValueError(f"deploy certs --host {host_problem(host)}")
        paths = make_certificates(Path(args.out), hosts=tuple(args.host), force=args.force)
        console.print(f"CA and SuperLink certificate written: {paths}")
    elif args.deploy_command == "keys":
        for name in args.names:
            keys = make_supernode_keys(Path(args.out), name, force=args.force)
            console.print(f"{name}: {keys}")
    else:
        from simulation.deploy import run_deployment_demo

        result = run_deployment_demo(Path(args.work_dir), Path(args.scenario), rounds=args.rounds)
        console.print_json(data=json.loads(json.dumps(result, default=str)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from simulation.demo import DemoConfig, run_demo

    values = {
        k: v
        for k, v in (("stays", args.stays), ("sites", args.sites), ("rounds", args.rounds))
        if v is not None
    }
    run_demo(Path(args.out), DemoConfig(**values))
    return 0


def _add_synth(commands: argparse._SubParsersAction) -> None:
    synth = commands.add_parser("synth", help="write synthetic data in the real MIMIC layouts")
    synth.add_argument("--out", required=True, help="new or empty folder")
    synth.add_argument("--stays", type=integer(1, 10**7), default=200, help="ICU stays to write")
    synth.add_argument("--seed", type=seed(), default=0, help="random seed")
    synth.add_argument("--messy-rate", type=number(0, 1), help="share of files made messy")
    synth.add_argument("--config-json", help="SyntheticMimicConfig fields as JSON")
    synth.set_defaults(handler=_synth)


def _add_partition_and_prepare(commands: argparse._SubParsersAction) -> None:
    part = commands.add_parser("partition", help="split a MIMIC-format dataset into sites")
    part.add_argument("--data", help="folder with root/, <task>/, mimic-cxr-jpg/, ...")
    part.add_argument("--out", required=True, help="folder for the site views and scenario.json")
    part.add_argument(
        "--task",
        default="in-hospital-mortality",
        choices=["in-hospital-mortality", "phenotyping"],
        help="MIMIC-III benchmark task",
    )
    part.add_argument("--sites", type=integer(1, 999), default=3, help="number of hospitals")
    part.add_argument(
        "--alpha",
        type=number(0, 1e6, low_open=True),
        help="Dirichlet label skew (smaller = more)",
    )
    part.add_argument("--size-skew", type=number(0, 5), default=0.0, help="log-normal size spread")
    part.add_argument("--seed", type=seed(), default=0, help="random seed")
    part.add_argument("--config", help="a PartitionConfig TOML instead of the options above")
    part.add_argument(
        "--min-count",
        type=integer(1, 10**6),
        default=5,
        help="fewest validation/test stays (and, for mortality, positives and negatives) "
        "a site's split needs to be scored; the audit's default suppression threshold",
    )
    part.add_argument(
        "--strict", action="store_true", help="refuse (exit 1) instead of warning on small splits"
    )
    part.set_defaults(handler=_partition)

    prepare = commands.add_parser("prepare", help="run frozen backbones into feature caches")
    prepare.add_argument("sites", nargs="*", help="site config TOML files")
    prepare.add_argument("--scenario", help="every site of a scenario (one shared report fallback)")
    prepare.add_argument(
        "--workers",
        type=integer(0, max_workers()),
        default=0,
        help=f"DataLoader workers (at most {max_workers()}: 4 per CPU, at most 64)",
    )
    prepare.set_defaults(handler=_prepare)


def _add_deploy(commands: argparse._SubParsersAction) -> None:
    deploy = commands.add_parser("deploy", help="TLS certificates, SuperNode keys, loopback demo")
    deploy_commands = deploy.add_subparsers(dest="deploy_command", required=True)
    certs = deploy_commands.add_parser("certs", help="a consortium CA + SuperLink certificate")
    certs.add_argument("--out", required=True, help="folder for the CA and certificate")
    certs.add_argument(
        "--host",
        action="append",
        default=["127.0.0.1", "localhost"],
        help="SuperLink host names / IPs for the certificate (repeatable)",
    )
    keys = deploy_commands.add_parser("keys", help="SuperNode authentication key pairs")
    keys.add_argument("--out", required=True, help="folder for the key pairs")
    keys.add_argument("names", nargs="+", help="one key pair per hospital name")
    for command in (certs, keys):
        command.add_argument("--force", action="store_true", help="replace existing files")
    local = deploy_commands.add_parser(
        "demo", help="TLS SuperLink + one authenticated SuperNode per site on 127.0.0.1"
    )
    local.add_argument("--scenario", required=True, help="folder with scenario.json")
    local.add_argument("--work-dir", required=True, help="certificates, keys, state and logs")
    local.add_argument("--rounds", type=integer(1, 10**4), default=1, help="federated rounds")
    deploy.set_defaults(handler=_deploy)
    add_kit_command(deploy_commands)  # after the group's default: its own handler wins
    from simulation.app_approval import add_approve_parser
    from simulation.fleet_proxy import add_fleet_proxy_parser

    add_approve_parser(deploy_commands)  # each with its own handler
    add_fleet_proxy_parser(deploy_commands)


def _add_demo_and_checks(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="synth -> partition -> prepare -> flwr run -> audit")
    demo.add_argument("--out", default="runs/demo", help="folder for every step's output")
    demo.add_argument("--stays", type=integer(1, 10**7), help="synthetic ICU stays (default 800)")
    demo.add_argument("--sites", type=integer(1, 999), help="hospitals (default 3)")
    demo.add_argument("--rounds", type=integer(1, 10**4), help="federated rounds (default 3)")
    demo.set_defaults(handler=_demo)

    validate = commands.add_parser("validate-config", help="validate site config TOML files")
    validate.add_argument("files", nargs="+", help="site.toml files")
    validate.set_defaults(handler=_validate_config)

    schema = commands.add_parser("site-config-schema", help="JSON schema of a site config")
    schema.add_argument("--out", help="write to this file instead of stdout")
    schema.set_defaults(handler=_schema)
    scenario_schema = commands.add_parser("scenario-schema", help="JSON schema of scenario.json")
    scenario_schema.add_argument("--out", help="write to this file instead of stdout")
    scenario_schema.set_defaults(handler=_schema)

    audit = commands.add_parser("audit", help="per-site lazy-modality audit of a run")
    audit.add_argument("run_dir", help="a federation's run directory (with audit.json)")
    audit.add_argument("--out", help="report folder (default RUN_DIR/audit_report)")
    audit.add_argument(
        "--min-count",
        type=integer(1, 10**6),
        help="suppression threshold shown as '<k'",
    )
    audit.set_defaults(handler=_audit)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, unless there is none to show (None, or
    the help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every (sub)command parser: defaults in --help, its one-line help as description."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def _describe(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give each subcommand without a description its one-line help (recursively)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                sub = action.choices[choice.dest]
                sub.description = sub.description or choice.help
                _describe(sub)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="omnifuse", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    train_command.add_parser(commands)
    _add_synth(commands)
    _add_partition_and_prepare(commands)
    federate_command.add_parser(commands)
    _add_deploy(commands)
    add_site_commands(commands)
    _add_demo_and_checks(commands)
    evaluate_command.add_parser(commands)
    predict_command.add_parser(commands)
    experiment_command.add_parser(commands)
    return _describe(parser)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived: unwinds through every ``finally`` that stops a process."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, _frame: object) -> None:
    for stop in (signal.SIGTERM, signal.SIGINT):  # let the clean-up finish
        signal.signal(stop, signal.SIG_IGN)
    raise Interrupted(signum)


def _run_handler(args: argparse.Namespace) -> int:
    """Run the command; on SIGTERM/SIGINT stop every process it started (the whole tree
    below this one) and return 128 + the signal number. Bad input: one line, exit 1."""
    from omnifuse_model.data.features.shard_checks import CorruptShardError
    from simulation.deploy import DeploymentError
    from simulation.federation import FederationError, OrphanSuperLinkError
    from simulation.flower_processes import stop_descendants

    errors = Console(stderr=True, soft_wrap=True, highlight=False)
    try:
        return args.handler(args)
    except KeyboardInterrupt as interrupt:
        signum = getattr(interrupt, "signum", signal.SIGINT)
        stopped = stop_descendants(os.getpid())
        errors.print(
            f"interrupted by {signal.Signals(signum).name}: stopped {stopped} more process(es)",
            markup=False,
        )
        return 128 + signum
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
        subprocess.TimeoutExpired,
        FederationError,
        OrphanSuperLinkError,
        DeploymentError,
        CorruptShardError,
    ) as error:
        first, *rest = str(error).splitlines() or [type(error).__name__]
        errors.print(Text.assemble(("error: ", "red"), first))
        for line in rest:  # pydantic lists one failing field per line
            errors.print(line, markup=False)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # health polls of the SuperLink
    if threading.current_thread() is not threading.main_thread():
        return _run_handler(args)  # signal handlers can only be set in the main thread
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for stop in saved:
        signal.signal(stop, _interrupt)
    try:
        return _run_handler(args)
    finally:
        for stop, handler in saved.items():
            signal.signal(stop, handler)


if __name__ == "__main__":
    sys.exit(main())

"""The `omnifuse` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler


def _train(args: argparse.Namespace) -> int:
    from simulation.central import load_run_config, run_central

    config = load_run_config(args.config)
    updates = {k: v for k, v in (("epochs", args.epochs), ("seed", args.seed)) if v is not None}
    if updates:
        config.train = config.train.model_copy(update=updates)
        config.train = type(config.train).model_validate(config.train.model_dump())
    run_central(config, args.out)
    return 0


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
    from omnifuse_model.site_config import site_config_json_schema

    text = site_config_json_schema()
    if args.out:
        Path(args.out).write_text(text + "\n")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnifuse", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train", help="centralised training run (feature-level synthetic data by default)"
    )
    train.add_argument("--config", help="TOML run config (see docs); default: built-in")
    train.add_argument("--out", default="runs/train", help="run directory")
    train.add_argument("--epochs", type=int, help="override train.epochs")
    train.add_argument("--seed", type=int, help="override train.seed")
    train.set_defaults(handler=_train)

    validate = commands.add_parser("validate-config", help="validate site config TOML files")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(handler=_validate_config)

    schema = commands.add_parser("site-config-schema", help="JSON schema of a site config")
    schema.add_argument("--out", help="write to this file instead of stdout")
    schema.set_defaults(handler=_schema)

    audit = commands.add_parser("audit", help="per-site lazy-modality audit of a run")
    audit.add_argument("run_dir")
    audit.add_argument("--out", help="report folder (default RUN_DIR/audit_report)")
    audit.add_argument("--min-count", type=int, help="suppression threshold shown as '<k'")
    audit.set_defaults(handler=_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        Console(stderr=True).print(f"[red]error:[/red] {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())

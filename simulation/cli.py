"""The `omnifuse` command line."""

from __future__ import annotations

import argparse
import logging
import sys

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

"""The `omnifuse site check|start` and `omnifuse deploy kit` subcommands (parsers and
handlers); `simulation.cli` registers them."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console


def _site_check(args: argparse.Namespace) -> int:
    from omnifuse_model.site_config import load_site_config
    from simulation.site_check import render, run_preflight

    site = load_site_config(args.site_config)
    superlink = args.superlink
    if superlink == "":  # the flag without a value: the config's address
        if site.deployment is None:
            raise ValueError(f"{args.site_config}: --superlink needs a [deployment] section")
        superlink = site.deployment.superlink
    ca_file = Path(args.ca) if args.ca else None
    preflight = run_preflight(site, superlink, ca_file, args.min_free_gb)
    render(preflight, Console())
    return 0 if preflight.ok else 1


def _site_start(args: argparse.Namespace) -> int:
    from simulation.site_start import start_site

    return start_site(Path(args.site_config), check_superlink=not args.no_superlink_check)


def _deploy_kit(args: argparse.Namespace) -> int:
    from simulation.kit import KitOptions, write_kit

    options = KitOptions(
        superlink=args.superlink,
        bind_host=args.bind_host,
        extra_hosts=tuple(args.host or ()),
        venv=args.venv,
        site_dir=args.site_dir,
        force=args.force,
    )
    files = write_kit(Path(args.scenario), Path(args.out), options)
    Console().print(f"kit written: {len(files)} files under {Path(args.out).resolve()}")
    return 0


def add_site_commands(commands: argparse._SubParsersAction) -> None:
    """`omnifuse site check SITE.toml` and `omnifuse site start SITE.toml`."""
    site = commands.add_parser("site", help="a hospital's preflight and SuperNode launcher")
    site_commands = site.add_subparsers(dest="site_command", required=True)
    check = site_commands.add_parser("check", help="can this site take part? (exit 0: yes)")
    check.add_argument("site_config", help="the site's TOML file")
    check.add_argument(
        "--superlink",
        nargs="?",
        const="",
        help="also a TLS handshake with the SuperLink (host:port; default: [deployment])",
    )
    check.add_argument("--ca", help="CA file for --superlink (default: [deployment])")
    check.add_argument("--min-free-gb", type=float, help="free disk needed at the cache")
    check.set_defaults(handler=_site_check)
    start = site_commands.add_parser("start", help="preflight, then the site's SuperNode")
    start.add_argument("site_config", help="the site's TOML file with [deployment]")
    start.add_argument(
        "--no-superlink-check", action="store_true", help="skip the TLS handshake check"
    )
    start.set_defaults(handler=_site_start)


def add_kit_command(deploy_commands: argparse._SubParsersAction) -> None:
    """`omnifuse deploy kit --scenario DIR --out KIT`."""
    kit = deploy_commands.add_parser("kit", help="consortium + per-site deployment kits")
    kit.add_argument("--scenario", required=True, help="folder with scenario.json")
    kit.add_argument("--out", required=True, help="the kit folder")
    kit.add_argument(
        "--superlink", default="127.0.0.1:9092", help="the SuperLink's host:port for sites"
    )
    kit.add_argument("--host", action="append", help="more names for the TLS certificate")
    kit.add_argument(
        "--bind-host",
        default="127.0.0.1",
        help="SuperLink --host (loopback: hospitals reach it through `deploy fleet-proxy`)",
    )
    kit.add_argument("--venv", default="/opt/omnifuse-fl/venv", help="sites' install venv")
    kit.add_argument("--site-dir", default="/opt/omnifuse-fl/site", help="sites' kit folder")
    kit.add_argument("--force", action="store_true", help="replace existing kit files")
    kit.set_defaults(handler=_deploy_kit)

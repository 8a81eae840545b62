"""`omnifuse deploy kit --scenario DIR --out KIT`: what the consortium and each hospital get.

::

    KIT/consortium/  certs/{ca.pem, ca.key, server.pem, server.key}, node_keys/<site>.pub,
                     start_superlink.sh, register_nodes.sh, CHECKLIST.md
    KIT/sites/<site>/  ca.pem, <site> (SuperNode private key, 0600), <site>.pub, site.toml
                     (the site's config + [deployment]), approved_apps.toml, start.sh,
                     omnifuse-<site>.service, CHECKLIST.md

A site's private key is written into its own folder only. Nothing is written outside
``--out``; the kit's files are listed first and, when any already exists, nothing is
written (unless ``force``). Private keys are created 0600 (`simulation.safe_paths`).
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from omnifuse_model.site_config import (
    DeploymentConfig,
    host_problem,
    superlink_address_problem,
)
from simulation import kit_templates as templates
from simulation.certificates import make_certificates, make_supernode_keys
from simulation.deploy import scenario_sites
from simulation.safe_paths import check_name, create_public, inside

CONNECTION = "omnifuse"
CERT_FILES = ("ca.pem", "ca.key", "server.pem", "server.key")
SITE_FILES = (
    "ca.pem",
    "{site}",
    "{site}.pub",
    "site.toml",
    "approved_apps.toml",
    "start.sh",
    "omnifuse-{site}.service",
    "CHECKLIST.md",
)
CONSORTIUM_FILES = ("start_superlink.sh", "register_nodes.sh", "CHECKLIST.md")
DEFAULT_VENV = "/opt/omnifuse-fl/venv"
DEFAULT_SITE_DIR = "/opt/omnifuse-fl/site"


@dataclass(frozen=True)
class KitOptions:
    """What the kit is for: the SuperLink's public address and where sites install."""

    superlink: str = "127.0.0.1:9092"
    bind_host: str = "127.0.0.1"  # the Control API shares the port: behind the Fleet proxy
    extra_hosts: tuple[str, ...] = ()
    venv: str = DEFAULT_VENV
    site_dir: str = DEFAULT_SITE_DIR
    force: bool = False


INSTALL_PATH = re.compile(r"/[A-Za-z0-9._+/-]{0,4095}")
"""A site's install path (--venv, --site-dir): absolute, letters, digits and ``._+-/`` only.
It is written into start.sh, the systemd unit (where '%' is a specifier and quoting rules
differ per setting) and CHECKLIST.md, so any character that one of them would read as more
than a path character is refused rather than quoted three different ways."""


def install_path_problem(path: str) -> str | None:
    """Why ``path`` is not an install path (`INSTALL_PATH`, no '.' or '..' part); None if it is."""
    if not INSTALL_PATH.fullmatch(path):
        return (
            f"{path!r}: expected an absolute path of letters, digits and '._+-/' only "
            "(it is written into start.sh and the systemd unit)"
        )
    if any(part in (".", "..") for part in path.split("/")):
        return f"{path!r}: expected a path without '.' or '..' parts"
    return None


def check_options(options: KitOptions) -> None:
    """Refuse an option that would be pasted into a script, unit or certificate unless it is
    a plain host, address or path: a `ValueError` naming the option and what was expected."""
    problems = [("--superlink", superlink_address_problem(options.superlink))]
    problems.append(("--bind-host", host_problem(options.bind_host)))
    problems += [("--host", host_problem(host)) for host in options.extra_hosts]
    problems += [("--venv", install_path_problem(options.venv))]
    problems += [("--site-dir", install_path_problem(options.site_dir))]
    for option, problem in problems:
        if problem:
            raise ValueError(f"deploy kit {option} {problem}")


def _version() -> str:
    try:
        return importlib.metadata.version("omnifuse-fl")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


def planned_files(out: Path, sites: list[str]) -> list[Path]:
    """Every file the kit writes (each checked to lie inside ``out``)."""
    consortium = out / "consortium"
    files = [consortium / "certs" / name for name in CERT_FILES]
    files += [consortium / name for name in CONSORTIUM_FILES]
    for site in sites:
        files.append(consortium / "node_keys" / f"{site}.pub")
        files += [out / "sites" / site / name.format(site=site) for name in SITE_FILES]
    return [inside(out, path) for path in files]


def _script(path: Path, text: str, force: bool) -> None:
    create_public(path, text.encode(), force)
    path.chmod(0o755)


def _site_folder(out: Path, name: str, config: Path, ca_pem: bytes, options: KitOptions) -> Path:
    """One hospital's folder; returns its SuperNode public key."""
    from omnifuse_model.site_config import load_site_config

    folder = inside(out, out / "sites" / name)
    keys = make_supernode_keys(folder, name, force=options.force)
    create_public(folder / "ca.pem", ca_pem, options.force)
    deployment = DeploymentConfig(
        superlink=options.superlink,
        root_certificates=Path("ca.pem"),
        auth_private_key=Path(name),
        approved_apps=Path("approved_apps.toml"),
    )
    site = load_site_config(config).model_copy(update={"deployment": deployment})
    create_public(folder / "site.toml", site.to_toml().encode(), options.force)
    create_public(folder / "approved_apps.toml", templates.APPROVED_APPS.encode(), options.force)
    omnifuse = f"{options.venv}/bin/omnifuse"
    _script(
        folder / "start.sh",
        templates.SITE_START_SCRIPT.format(site=name, omnifuse=shlex.quote(omnifuse)),
        options.force,
    )
    unit = templates.SITE_SYSTEMD_UNIT.format(
        site=name, site_dir=options.site_dir, omnifuse=omnifuse
    )
    create_public(folder / f"omnifuse-{name}.service", unit.encode(), options.force)
    checklist = templates.SITE_CHECKLIST.format(
        site=name,
        key_name=name,
        venv=options.venv,
        version=_version(),
        address=options.superlink,
        runtime_port=deployment.runtime_port,
    )
    create_public(folder / "CHECKLIST.md", checklist.encode(), options.force)
    return keys.public_key


def _consortium_folder(out: Path, sites: list[str], options: KitOptions) -> Path:
    """Certificates, start and registration scripts, checklist; returns the CA file."""
    folder = inside(out, out / "consortium")
    host, _, port = options.superlink.rpartition(":")
    hosts = list(dict.fromkeys([host.strip("[]"), *options.extra_hosts]))
    certs = make_certificates(folder / "certs", hosts=hosts, force=options.force)
    _script(
        folder / "start_superlink.sh",
        templates.SUPERLINK_START_SCRIPT.format(bind_host=options.bind_host, port=port),
        options.force,
    )
    register = "\n".join(
        f'"${{FLWR:-flwr}}" supernode register node_keys/{site}.pub {CONNECTION} --name {site}'
        for site in sites
    )
    _script(
        folder / "register_nodes.sh",
        templates.REGISTER_SCRIPT.format(
            connection=CONNECTION, address=options.superlink, register_lines=register
        ),
        options.force,
    )
    checklist = templates.CONSORTIUM_CHECKLIST.format(
        hosts=", ".join(hosts), port=port, bind_host=options.bind_host
    )
    create_public(folder / "CHECKLIST.md", checklist.encode(), options.force)
    return certs.ca_cert


def write_kit(scenario_dir: Path, out: Path, options: KitOptions | None = None) -> list[Path]:
    """Write the consortium's and every site's kit folder; returns the files written."""
    options = options or KitOptions()
    check_options(options)
    out = Path(out).resolve()
    sites = scenario_sites(Path(scenario_dir))
    for name in sites:
        check_name(name, "site name")
    files = planned_files(out, list(sites))
    existing = [str(p) for p in files if p.exists() or p.is_symlink()]
    if existing and not options.force:
        raise FileExistsError(
            f"{len(existing)} kit file(s) already exist, e.g. {existing[0]}; nothing written "
            "(use --force to replace them)"
        )
    ca_file = _consortium_folder(out, list(sites), options)
    ca_pem = ca_file.read_bytes()
    for name, config in sites.items():
        public_key = _site_folder(out, name, config, ca_pem, options)
        target = inside(out, out / "consortium" / "node_keys" / f"{name}.pub")
        create_public(target, public_key.read_bytes(), options.force)
    return files

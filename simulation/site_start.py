"""`omnifuse site start SITE.toml`: the site's SuperNode, started only after its preflight.

Reads the site config's ``[deployment]`` section, runs `simulation.site_check` (including
the TLS handshake with the SuperLink) and refuses to start when a check fails. Otherwise it
starts ``flower-supernode`` with TLS verified by the consortium CA, the site's SuperNode
authentication key, its local Runtime API address and ``--node-config site-config="..."``
(the ClientApp reads the site from there), and waits. SIGTERM or SIGINT (systemd's stop,
Ctrl-C) stop the SuperNode and every process below it (flower-superexec, ClientApps): the
`omnifuse` command line turns either signal into an exception that unwinds through the
``finally`` here; the exit code is then 128 + the signal number.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from rich.console import Console

from omnifuse_model.site_config import DeploymentConfig, SiteConfig, load_site_config
from simulation.approved_supernode import with_app_approval
from simulation.flower_processes import flower_bin, flower_env, stop_process
from simulation.site_check import render, run_preflight


class SiteStartError(ValueError):
    """The site cannot be started (no [deployment] section, failed preflight)."""


def supernode_command(site_config_path: Path, deployment: DeploymentConfig) -> list[str]:
    """The `flower-supernode` command line for a site (paths already absolute)."""
    command = [
        flower_bin("flower-supernode"),
        "--superlink",
        deployment.superlink,
        "--root-certificates",
        str(deployment.root_certificates),
        "--auth-supernode-private-key",
        str(deployment.auth_private_key),
        "--host",
        deployment.runtime_host,
        "--port",
        str(deployment.runtime_port),
        # quoted: an unquoted value ending in .toml is read by Flower as a config *file*
        "--node-config",
        f"site-config={json.dumps(str(Path(site_config_path).resolve()))}",
    ]
    if deployment.max_retries is not None:
        command += ["--max-retries", str(deployment.max_retries)]
    if deployment.health_port is not None:
        command += ["--health-server-address", f"127.0.0.1:{deployment.health_port}"]
    return command


def deployment_of(site: SiteConfig, path: Path) -> DeploymentConfig:
    """The site's ``[deployment]`` section, or a `SiteStartError` naming the file."""
    if site.deployment is None:
        raise SiteStartError(
            f"{path}: no [deployment] section (superlink, root_certificates, "
            "auth_private_key, ...); `omnifuse deploy kit` writes a template"
        )
    return site.deployment


def start_site(path: Path, console: Console | None = None, check_superlink: bool = True) -> int:
    """Preflight, then run the SuperNode until it exits or a signal stops it.

    Returns the SuperNode's exit code; raises `SiteStartError` when the preflight fails
    (the table says which field and what was found).
    """
    console = console or Console()
    path = Path(path).resolve()
    site = load_site_config(path)
    deployment = deployment_of(site, path)
    superlink = deployment.superlink if check_superlink else None
    preflight = run_preflight(site, superlink=superlink)
    render(preflight, console)
    if not preflight.ok:
        fields = ", ".join(sorted({c.field for c in preflight.failures}))
        raise SiteStartError(
            f"site '{site.name}' not started: the preflight failed ({fields}); see the table"
        )
    command = supernode_command(path, deployment)
    if deployment.approved_apps is not None:  # the preflight refuses a site without one
        command = with_app_approval(command, deployment.approved_apps)
    deployment.flwr_home.mkdir(parents=True, exist_ok=True)
    env = flower_env(deployment.flwr_home)
    console.print(f"starting the SuperNode of site '{site.name}': {' '.join(command)}")
    process = subprocess.Popen(
        command, env=env, cwd=path.parent, stdin=subprocess.DEVNULL, start_new_session=True
    )
    try:
        returncode = process.wait()
    finally:
        stop_process(process)  # on a signal: the SuperNode and everything below it
    console.print(f"SuperNode of site '{site.name}' exited with {returncode}")
    return returncode

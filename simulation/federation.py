"""Run a whole federation locally through the real Flower simulation engine (`flwr run`).

The harness owns what it starts: a SuperLink in simulation mode on loopback (stopped with
its whole process tree afterwards; one left behind by a killed run on the same work dir is
stopped before the next starts, and a port held by anything else is refused), a
project-local ``FLWR_HOME`` whose config.toml names that SuperLink, and runtime dependency
installation switched off (the venv already holds everything; otherwise Flower would
`uv sync` and download a CUDA torch). Every Flower and Ray process listens on 127.0.0.1
only (`simulation.flower_processes.flower_env`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import tomli_w

from server.run_outcome import read_outcome
from simulation.flower_processes import (
    REPO_ROOT,
    flower_bin,
    flower_env,
    free_port,
    stop_process,
    stop_processes,
    write_run_config,
)
from simulation.run_config_args import app_config_defaults

log = logging.getLogger(__name__)

CONNECTION = "omnifuse-sim"
DATABASE = "superlink_state.db"


class FederationError(RuntimeError):
    """`flwr run` did not complete every round, or the SuperLink did not start (the message
    gives the reason and the log's path)."""


def _wait_healthy(port: int, process: subprocess.Popen, log_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FederationError(
                f"flower-superlink exited with {process.returncode}; see {log_file}"
            )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise FederationError(f"flower-superlink not healthy after {timeout:.0f}s; see {log_file}")


class OrphanSuperLinkError(RuntimeError):
    """The SuperLink's port is held by a process this harness did not start."""


def stop_orphan_superlinks(work_dir: Path) -> list[int]:
    """Stop every `flower-superlink` left running on ``work_dir``'s state database (by an
    earlier run that was killed before it could stop it) with its process tree; their PIDs.

    Such a process is ours: no other run uses this work dir's database.
    """
    database = str(Path(work_dir).resolve() / DATABASE)
    orphans = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any(Path(a).name == "flower-superlink" for a in cmdline[:2]) and database in cmdline:
            log.warning(
                "stopping orphan SuperLink pid %d (its database is %s)", process.pid, database
            )
            orphans.append(process)
    for orphan in orphans:
        with contextlib.suppress(psutil.NoSuchProcess):
            stop_processes([orphan, *orphan.children(recursive=True)])
    return [orphan.pid for orphan in orphans]


def check_port_free(port: int) -> None:
    """Raise `OrphanSuperLinkError` naming the owner when something listens on 127.0.0.1:port:
    `flwr run` would otherwise talk to that process instead of the SuperLink we start."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not in use
        try:
            probe.bind(("127.0.0.1", port))
            return
        except OSError:
            pass
    owners = []
    with contextlib.suppress(psutil.AccessDenied):
        for connection in psutil.net_connections(kind="tcp"):
            if connection.laddr and connection.laddr.port == port and connection.pid:
                with contextlib.suppress(psutil.Error):
                    command = " ".join(psutil.Process(connection.pid).cmdline())[:200]
                    owners.append(f"pid {connection.pid}: {command}")
    raise OrphanSuperLinkError(
        f"127.0.0.1:{port} is already in use ({'; '.join(sorted(set(owners))) or 'owner unknown'})"
        ": a SuperLink left by another federation or work dir, or another program. Stop it, or "
        "leave out --port to use a free one."
    )


def _write_flwr_home(work_dir: Path, http_port: int) -> Path:
    flwr_home = work_dir / "flwr_home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    connection = {"address": f"127.0.0.1:{http_port}", "insecure": True}
    (flwr_home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}),
        encoding="utf-8",
    )
    return flwr_home


def _start_superlink(work_dir: Path, http_port: int, env: dict[str, str]) -> subprocess.Popen:
    """A simulation-mode SuperLink on 127.0.0.1, after stopping our own orphans and checking
    that nobody else holds the port."""
    stop_orphan_superlinks(work_dir)
    check_port_free(http_port)
    command = [
        flower_bin("flower-superlink"),
        *("--insecure", "--simulation", "--isolation", "subprocess"),
        *("--host", "127.0.0.1", "--port", str(http_port)),
        *("--database", str(work_dir / DATABASE)),
        "--disable-runtime-dependency-installation",
        *("--log-file", str(work_dir / "superlink.log")),
    ]
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _flwr_run(
    run_config: dict[str, object],
    num_supernodes: int,
    work_dir: Path,
    app_dir: Path,
    env: dict[str, str],
    timeout: float,
    on_poll: Callable[[], None] | None,
    client_cpus: int | None = None,
) -> int:
    """`flwr run --stream` until it exits; ``on_poll`` is called about once a second
    meanwhile (progress display). Its output goes to ``work_dir/flwr_run.log``."""
    config_file = write_run_config(work_dir / "run_config.toml", run_config)
    run = [
        flower_bin("flwr"),
        *("run", str(app_dir), CONNECTION, "--run-config", str(config_file)),
        *("--federation-config", federation_config(num_supernodes, client_cpus), "--stream"),
    ]
    deadline = time.monotonic() + timeout
    with (work_dir / "flwr_run.log").open("w") as run_log:
        process = subprocess.Popen(
            run, env=env, cwd=app_dir, stdout=run_log, stderr=subprocess.STDOUT
        )
        try:
            while process.poll() is None:
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(run, timeout)
                if on_poll is not None:
                    on_poll()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=1.0)
        finally:
            stop_process(process)
    if on_poll is not None:
        on_poll()
    return process.returncode


def federation_config(num_supernodes: int, client_cpus: int | None = None) -> str:
    """`flwr run --federation-config` for the local simulation: the node count and, when
    given, the CPUs the Ray backend reserves per simulated ClientApp (Flower's default is 2,
    so on a 2-core machine clients run one at a time; 1 lets two run at once)."""
    if num_supernodes < 1:
        raise ValueError(f"num_supernodes={num_supernodes}: expected at least 1")
    text = f"num-supernodes={num_supernodes}"
    if client_cpus is not None:
        if type(client_cpus) is not int or client_cpus < 1:
            raise ValueError(f"client_cpus={client_cpus!r}: expected a whole number >= 1")
        text += f" client-resources-num-cpus={client_cpus}"
    return text


PATH_KEYS = ("scenario-dir", "run-dir")
# CPUs Ray reserves per simulated ClientApp. Measured on 2 cores (docs/SCALING.md, "Clients at
# once"): 1 (two clients at once, one torch thread each) finishes a 10-site round 1.3-1.7x
# sooner than Flower's default of 2 (one client at a time with two threads), for ~1.2 GiB
# more RSS (a second Ray actor).
DEFAULT_CLIENT_CPUS = 1


def complete_run_config(run_config: dict[str, object], app_dir: Path) -> dict[str, object]:
    """``run_config`` with the app's defaults for missing keys and ``scenario-dir`` /
    ``run-dir`` made absolute against this process's folder: the ServerApp runs in Flower's
    app folder, where a relative path names nothing (plain `flwr run .` with pyproject's
    defaults fails there), and the completion check needs the real run dir and round count."""
    values = {**app_config_defaults(app_dir), **run_config}
    for key in PATH_KEYS:
        values[key] = str(Path(str(values[key])).resolve())
    return values


def run_federation(
    run_config: dict[str, object],
    num_supernodes: int,
    work_dir: Path,
    app_dir: Path = REPO_ROOT,
    http_port: int | None = None,
    timeout: float = 3600.0,
    on_poll: Callable[[], None] | None = None,
    client_cpus: int | None = DEFAULT_CLIENT_CPUS,
) -> int:
    """Start a SuperLink, `flwr run` the app with ``num_supernodes`` simulated sites, stop.

    ``client_cpus``: CPUs Ray reserves per simulated ClientApp (default
    ``DEFAULT_CLIENT_CPUS``, chosen by measurement; None: Flower's default, 2); with the
    run-config key ``client-torch-threads`` it sets how many clients train at once.

    Returns `flwr run`'s exit code. Logs go to ``work_dir`` (superlink.log, flwr_run.log),
    which is also the run's FLWR_HOME; ``http_port`` None picks a free port, so runs with
    their own work dirs never collide. A SuperLink left running on this work dir by a killed
    run is stopped first; a given port held by any other process is an
    `OrphanSuperLinkError` (never silently reused).
    """
    work_dir = Path(work_dir).resolve()
    run_config = complete_run_config(run_config, app_dir)
    port = free_port() if http_port is None else http_port
    env = flower_env(_write_flwr_home(work_dir, port), app_dir)
    superlink = _start_superlink(work_dir, port, env)
    try:
        _wait_healthy(port, superlink, work_dir / "superlink.log", 60.0)
        returncode = _flwr_run(
            run_config, num_supernodes, work_dir, app_dir, env, timeout, on_poll, client_cpus
        )
    finally:
        stop_process(superlink)
    _check_completed(run_config, work_dir, returncode)
    return returncode


def _check_completed(run_config: dict[str, object], work_dir: Path, returncode: int) -> None:
    """`flwr run --stream` exits 0 even when the ServerApp raised: check the checkpoint and
    the outcome the ServerApp wrote (``server.run_outcome``: e.g. a site that failed or was
    rejected in every round)."""
    run_dir = Path(str(run_config.get("run-dir", "")))
    expected = int(run_config.get("num-server-rounds", 0) or 0)
    latest = run_dir / "checkpoints" / "latest"
    done = int(latest.read_text().strip().split("_")[-1]) if latest.is_file() else 0
    outcome = read_outcome(run_dir) or {}
    if outcome.get("status") == "failed":
        raise FederationError(
            f"federation failed after round {done} of {expected}: {outcome.get('reason', '')}"
        )
    if returncode != 0 or (expected and done < expected):
        log_path = work_dir / "flwr_run.log"
        raise FederationError(
            f"federation stopped after round {done} of {expected} (flwr run exit code "
            f"{returncode}): {_last_error(log_path)}; full log: {log_path}"
        )


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\w*: \S")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _last_error(log_path: Path) -> str:
    """What went wrong, from the `flwr run` log: the last Python exception line
    (``FileNotFoundError: ...``; Flower logs the ServerApp's exception with its traceback,
    then "Exit Code: 700"), else the last ERROR line, else the last line."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "no flwr run log"
    lines = [_ANSI.sub("", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    exceptions = [line for line in lines if _EXCEPTION_LINE.match(line)]
    errors = [line for line in lines if "ERROR" in line]
    return (exceptions or errors or lines or ["empty flwr run log"])[-1][:300]

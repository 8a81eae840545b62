"""Run a whole federation locally through the real Flower simulation engine (`flwr run`).

The harness owns what it starts: a SuperLink in simulation mode on loopback (its PID is
kept and it is stopped afterwards), a project-local ``FLWR_HOME`` whose config.toml names that
SuperLink, and runtime dependency installation switched off (the venv already holds
everything; otherwise Flower would `uv sync` and download a CUDA torch).
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import httpx

from server.run_outcome import read_outcome
from simulation.flower_processes import (
    REPO_ROOT,
    flower_bin,
    flower_env,
    stop_process,
    write_run_config,
)

log = logging.getLogger(__name__)

CONNECTION = "omnifuse-sim"


def _wait_healthy(port: int, process: subprocess.Popen, log_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {process.returncode}; see {log_file}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"flower-superlink not healthy after {timeout:.0f}s; see {log_file}")


def run_federation(
    run_config: dict[str, object],
    num_supernodes: int,
    work_dir: Path,
    app_dir: Path = REPO_ROOT,
    http_port: int = 39191,
    timeout: float = 3600.0,
    stream: bool = True,
) -> int:
    """Start a SuperLink, `flwr run` the app with ``num_supernodes`` simulated sites, stop.

    Returns `flwr run`'s exit code. Logs go to ``work_dir`` (superlink.log, flwr_run.log).
    """
    work_dir = Path(work_dir).resolve()
    flwr_home = work_dir / "flwr_home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{http_port}"\ninsecure = true\n'
    )
    env = flower_env(flwr_home, app_dir)
    superlink_log = work_dir / "superlink.log"
    command = [
        flower_bin("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(http_port),
        "--database",
        str(work_dir / "superlink_state.db"),
        "--disable-runtime-dependency-installation",
        "--log-file",
        str(superlink_log),
    ]
    superlink = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_healthy(http_port, superlink, superlink_log, 60.0)
        config_file = write_run_config(work_dir / "run_config.toml", run_config)
        run = [
            flower_bin("flwr"),
            "run",
            str(app_dir),
            CONNECTION,
            "--run-config",
            str(config_file),
            "--federation-config",
            f"num-supernodes={num_supernodes}",
        ]
        if stream:
            run.append("--stream")
        with (work_dir / "flwr_run.log").open("w") as run_log:
            completed = subprocess.run(
                run,
                env=env,
                cwd=app_dir,
                stdout=run_log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
    finally:
        stop_process(superlink)
    _check_completed(run_config, work_dir, completed.returncode)
    return completed.returncode


class FederationError(RuntimeError):
    """`flwr run` did not complete every round (its log tail is in the message)."""


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
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise FederationError(
            f"federation stopped after round {done} of {expected} (flwr run exit code "
            f"{returncode}); log {log_path}:\n{tail}"
        )

"""Run a whole federation locally through the real Flower simulation engine (`flwr run`).

The harness owns what it starts: a SuperLink in simulation mode on loopback (its PID is
kept and it is stopped afterwards), a project-local ``FLWR_HOME`` whose config.toml names that
SuperLink, and runtime dependency installation switched off (the venv already holds
everything; otherwise Flower would `uv sync` and download a CUDA torch).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

CONNECTION = "omnifuse-sim"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_run_config(path: Path, values: dict[str, object]) -> Path:
    """A TOML file of run-config overrides for `flwr run --run-config FILE`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{key} = {_toml_value(v)}\n" for key, v in values.items()))
    return path


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


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
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONPATH=str(app_dir) + os.pathsep + env.get("PYTHONPATH", ""),
        # the SuperLink spawns flower-superexec / flwr-simulation by name
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
    )
    superlink_log = work_dir / "superlink.log"
    command = [
        _bin("flower-superlink"),
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
            _bin("flwr"),
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
        _stop(superlink)
    _check_completed(run_config, work_dir, completed.returncode)
    return completed.returncode


class FederationError(RuntimeError):
    """`flwr run` did not complete every round (its log tail is in the message)."""


def _check_completed(run_config: dict[str, object], work_dir: Path, returncode: int) -> None:
    """`flwr run --stream` exits 0 even when the ServerApp raised: check the checkpoint."""
    run_dir = Path(str(run_config.get("run-dir", "")))
    expected = int(run_config.get("num-server-rounds", 0) or 0)
    latest = run_dir / "checkpoints" / "latest"
    done = int(latest.read_text().strip().split("_")[-1]) if latest.is_file() else 0
    if returncode != 0 or (expected and done < expected):
        log_path = work_dir / "flwr_run.log"
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise FederationError(
            f"federation stopped after round {done} of {expected} (flwr run exit code "
            f"{returncode}); log {log_path}:\n{tail}"
        )


def _stop(process: subprocess.Popen) -> None:
    """Stop the SuperLink and everything it spawned (its own process group)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

"""Running Flower's own processes from Python: environment, executables, clean stops, run
configs. Shared by the simulation harness and the TLS deployment helpers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def flower_bin(name: str) -> str:
    """The venv's copy of a Flower executable, else the name (found on PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_env(flwr_home: Path, app_dir: Path = REPO_ROOT) -> dict[str, str]:
    """Environment for Flower processes: own FLWR_HOME, no `uv sync`, venv bin on PATH."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONPATH=str(app_dir) + os.pathsep + env.get("PYTHONPATH", ""),
        # SuperLink and SuperNode spawn flower-superexec by name
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
    )
    return env


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process group we started, then anything it spawned into its own session."""
    if process.poll() is not None:
        return
    spawned = _descendants(process.pid)  # e.g. flower-superexec runs in a new session
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
    deadline = time.monotonic() + 5.0
    for pid in spawned:
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)  # flower-superexec exits by itself once its parent is gone
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


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

"""Running Flower's own processes from Python: environment, executables, clean stops, run
configs. Shared by the simulation harness and the TLS deployment helpers."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import tomli_w

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
        # Ray (the simulation engine) on Linux resolves even an explicit 127.0.0.1 to the
        # machine's outward address and binds its GCS, raylet, workers and actors to every
        # interface, with no authentication. Off, it uses the loopback address and its gRPC
        # servers listen on 127.0.0.1 only (ray._private.services.get_node_ip_address).
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    )
    return env


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children of children too, also in other sessions)."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until each process has exited (a zombie counts: its parent reaps it); the rest."""
    deadline = time.monotonic() + timeout
    left = list(processes)
    while left:
        for process in list(left):
            with contextlib.suppress(psutil.TimeoutExpired):
                process.wait(timeout=0)  # reaps our own children
            try:
                if process.status() == psutil.STATUS_ZOMBIE:
                    left.remove(process)
            except psutil.NoSuchProcess:
                left.remove(process)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return left


def stop_processes(processes: list[psutil.Process], timeout: float = 15.0) -> int:
    """SIGTERM every process in ``processes``, SIGKILL what is left after ``timeout``.

    Returns how many were still running when asked to stop.
    """
    alive = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            process.terminate()
            alive.append(process)
    for process in _wait_gone(alive, timeout):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            process.kill()
    _wait_gone(alive, 5.0)
    return len(alive)


def stop_descendants(pid: int, timeout: float = 15.0) -> int:
    """Stop the whole process tree below ``pid`` (taken as one snapshot before any signal:
    a child stopped first would otherwise orphan its own children). Returns the count."""
    try:
        tree = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    return stop_processes(tree, timeout)


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a process we started and everything it spawned (e.g. flower-superexec, which
    runs in its own session, and the simulation and Ray processes below it)."""
    if process.poll() is not None:
        return
    with contextlib.suppress(psutil.NoSuchProcess):
        tree = psutil.Process(process.pid)
        stop_processes([tree, *tree.children(recursive=True)], timeout)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)  # reaps it


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick), so that
    simulations started at the same time never share a SuperLink."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_run_config(path: Path, values: dict[str, object]) -> Path:
    """A TOML file of run-config overrides for `flwr run --run-config FILE`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(values), encoding="utf-8")
    return path

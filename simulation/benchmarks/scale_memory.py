"""Peak memory of a process tree, sampled in a background thread (psutil).

    with TreeMemorySampler() as sampler:       # the tree under this process, every 0.5 s
        run_federation(...)                    # SuperLink, simulation engine, Ray, ClientApps
    sampler.summary()                          # peaks, sample count, load averages

Every sample sums, over the live descendants of ``root_pid`` (not the root itself, the
driver: its own RSS is reported apart) and every process sharing a session with one of them
(Ray daemons started with their own session stay counted):

* ``rss``: resident set size, as ``ps`` shows it. Pages of files mapped by several processes
  (shared libraries, memory-mapped feature shards) count once per process, so this sum
  overstates what the tree needs;
* ``anonymous``: ``rss`` minus its file-backed and shared part (psutil's ``shared``:
  RssFile + RssShmem): the heap and stacks the processes hold themselves. Memory-mapped
  feature shards are page cache, which the kernel drops under pressure, and are not in it.

The load average (``/proc/loadavg``, 1 minute) is sampled with it: timings on a shared
machine mean little without it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field

import psutil


@dataclass
class MemorySample:
    seconds: float
    rss: int
    anonymous: int
    processes: int
    load_1min: float


@dataclass
class TreeMemorySampler:
    """Samples the tree under ``root_pid`` (default: this process) every ``interval`` s."""

    root_pid: int | None = None
    interval: float = 0.5
    samples: list[MemorySample] = field(default_factory=list)
    driver_peak_rss: int = 0

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise ValueError(f"interval={self.interval}: expected seconds > 0")
        self.root = psutil.Process(self.root_pid or os.getpid())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)
        self._started = 0.0

    def __enter__(self) -> TreeMemorySampler:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # one last sample: a run shorter than the interval still has one

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def tree(self) -> list[psutil.Process]:
        """Live descendants of the root, and processes in a session of one of them."""
        found: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            found = {p.pid: p for p in self.root.children(recursive=True)}
        if not found:
            return []
        sessions = set()
        for pid in found:
            with contextlib.suppress(OSError):
                sessions.add(os.getsid(pid))
        sessions.discard(os.getsid(self.root.pid))
        if sessions:
            for process in psutil.process_iter():
                with contextlib.suppress(OSError, psutil.Error):
                    if process.pid not in found and os.getsid(process.pid) in sessions:
                        found[process.pid] = process
        return list(found.values())

    def sample(self) -> MemorySample:
        """Measure the tree now; the sample is also appended to ``samples``."""
        rss = anonymous = count = 0
        for process in self.tree():
            with contextlib.suppress(psutil.Error):
                info = process.memory_info()
                rss += info.rss
                anonymous += info.rss - getattr(info, "shared", 0)
                count += 1
        with contextlib.suppress(psutil.Error):
            self.driver_peak_rss = max(self.driver_peak_rss, self.root.memory_info().rss)
        taken = MemorySample(
            time.perf_counter() - self._started, rss, anonymous, count, os.getloadavg()[0]
        )
        self.samples.append(taken)
        return taken

    def summary(self) -> dict:
        """Peaks (bytes and GiB), the process count at the RSS peak, and the load averages."""
        if not self.samples:
            raise ValueError("no samples: use the sampler as a context manager around the run")
        peak = max(self.samples, key=lambda s: s.rss)
        loads = [s.load_1min for s in self.samples]
        return {
            "samples": len(self.samples),
            "interval_seconds": self.interval,
            "peak_rss_bytes": peak.rss,
            "peak_rss_gib": peak.rss / 2**30,
            "peak_anonymous_bytes": max(s.anonymous for s in self.samples),
            "peak_anonymous_gib": max(s.anonymous for s in self.samples) / 2**30,
            "processes_at_peak": peak.processes,
            "max_processes": max(s.processes for s in self.samples),
            "driver_peak_rss_bytes": self.driver_peak_rss,
            "load_1min_mean": sum(loads) / len(loads),
            "load_1min_max": max(loads),
        }

"""The progress handle that the mechanism suite passes to every scenario module.

A scenario module (``mechanisms_central_scenarios.central_scenarios``, and
``mechanisms_federated.federated_scenarios`` where present) receives one ``CellProgress`` and
calls ``plan(n)`` once it knows how many cells (trained models or federations) it will run,
then ``advance(label)`` after each. The suite shows it as one rich progress bar; tests pass
``SilentProgress`` or a recorder.
"""

from __future__ import annotations

from typing import Protocol

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class CellProgress(Protocol):
    """What a scenario module may call."""

    def plan(self, cells: int) -> None:
        """Add ``cells`` to the total still to run."""

    def advance(self, label: str) -> None:
        """One cell finished; ``label`` names it (e.g. 'imputation/mlp seed 2 (f)')."""


class SilentProgress:
    """A CellProgress that counts and shows nothing (tests, library use)."""

    def __init__(self) -> None:
        self.planned = 0
        self.done: list[str] = []

    def plan(self, cells: int) -> None:
        self.planned += cells

    def advance(self, label: str) -> None:
        self.done.append(label)


class RichCellProgress:
    """A CellProgress drawn as one rich bar: cells done / planned, last label, elapsed time."""

    def __init__(self, description: str = "mechanisms") -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[label]}"),
        )
        self._task = self._progress.add_task(description, total=0, label="")

    def __enter__(self) -> RichCellProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def plan(self, cells: int) -> None:
        total = self._progress.tasks[0].total or 0
        self._progress.update(self._task, total=total + cells)

    def advance(self, label: str) -> None:
        self._progress.update(self._task, advance=1, label=label)


class QueueProgress:
    """A CellProgress in a worker process: forwards plan/advance to the parent over a queue
    (``drain`` in the parent replays them on the real progress)."""

    def __init__(self, queue) -> None:
        self.queue = queue

    def plan(self, cells: int) -> None:
        self.queue.put(("plan", cells))

    def advance(self, label: str) -> None:
        self.queue.put(("advance", label))


def drain(queue, progress: CellProgress, timeout: float) -> None:
    """Replay every message waiting in ``queue`` (waiting up to ``timeout`` s for the first)."""
    import queue as queue_module

    try:
        message = queue.get(timeout=timeout)
        while True:
            kind, value = message
            if kind == "plan":
                progress.plan(value)
            else:
                progress.advance(value)
            message = queue.get_nowait()
    except queue_module.Empty:
        return

"""Tiny mimic3-benchmarks-format files written on the fly into ``tmp_path``."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Exactly as design/MIMIC_FORMATS.md section 1a: typed out, not imported, so tests check it.
EPISODE_HEADER_LINE = (
    "Hours,Capillary refill rate,Diastolic blood pressure,Fraction inspired oxygen,"
    "Glascow coma scale eye opening,Glascow coma scale motor response,"
    "Glascow coma scale total,Glascow coma scale verbal response,Glucose,Heart Rate,Height,"
    "Mean blood pressure,Oxygen saturation,Respiratory rate,Systolic blood pressure,"
    "Temperature,Weight,pH"
)
COLUMNS = EPISODE_HEADER_LINE.split(",")

# Short names for the columns, so that rows in tests stay readable.
ALIASES = {
    "hours": "Hours",
    "crr": "Capillary refill rate",
    "dbp": "Diastolic blood pressure",
    "fio2": "Fraction inspired oxygen",
    "eye": "Glascow coma scale eye opening",
    "motor": "Glascow coma scale motor response",
    "total": "Glascow coma scale total",
    "verbal": "Glascow coma scale verbal response",
    "glucose": "Glucose",
    "hr": "Heart Rate",
    "height": "Height",
    "mbp": "Mean blood pressure",
    "spo2": "Oxygen saturation",
    "rr": "Respiratory rate",
    "sbp": "Systolic blood pressure",
    "temp": "Temperature",
    "weight": "Weight",
    "ph": "pH",
}


def episode_line(hours: str, columns: list[str] = COLUMNS, **cells: str) -> str:
    """One CSV line: ``hours`` plus cells given by alias (e.g. ``hr="82"``), blanks elsewhere."""
    named = {ALIASES[k]: v for k, v in cells.items()}
    named["Hours"] = hours
    return ",".join(named.get(c, "") for c in columns)


@pytest.fixture
def write_episode(tmp_path: Path) -> Callable[..., Path]:
    """Write an episode from ``(hours, {alias: value})`` rows under the standard header."""

    def write(
        *rows: tuple[str, dict[str, str]],
        name: str = "10011_episode1_timeseries.csv",
        columns: list[str] = COLUMNS,
    ) -> Path:
        lines = [",".join(columns)]
        lines += [episode_line(hours, columns, **cells) for hours, cells in rows]
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return write


@pytest.fixture
def write_raw(tmp_path: Path) -> Callable[..., Path]:
    """Write arbitrary text or bytes, for malformed files."""

    def write(content: str | bytes, name: str = "10011_episode1_timeseries.csv") -> Path:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_bytes(content.encode("utf-8"))
        return path

    return write


@pytest.fixture
def make_line() -> Callable[..., str]:
    """:func:`episode_line`, for tests that assemble raw file text."""
    return episode_line


@pytest.fixture
def header_line() -> str:
    """The exact episode header line."""
    return EPISODE_HEADER_LINE


def patch_jpeg_size(path: Path, width: int, height: int) -> None:
    """Rewrite a baseline JPEG's SOF0 header to declare ``width x height`` (pixels unchanged),
    as a crafted "decompression bomb" does: nothing of that size is ever allocated."""
    data = bytearray(path.read_bytes())
    sof = data.find(b"\xff\xc0")
    if sof < 0:
        raise ValueError(f"{path}: no baseline SOF0 marker")
    # FF C0, segment length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    data[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    path.write_bytes(bytes(data))


@pytest.fixture
def jpeg_declaring() -> Callable[[Path, int, int], Path]:
    """Write a tiny grey JPEG at a path whose header declares ``width x height``."""

    def write(path: Path, width: int, height: int) -> Path:
        from PIL import Image

        Image.new("L", (16, 16), 128).save(path, quality=90)
        patch_jpeg_size(path, width, height)
        return path

    return write


@pytest.fixture
def fifo_at() -> Iterator[Callable[[Path], Path]]:
    """Make a FIFO at a path. A helper thread keeps opening it for writing, so that code which
    (wrongly) opens it reads an empty file instead of blocking the test run forever."""
    stop = threading.Event()
    paths: list[Path] = []

    def release() -> None:
        while not stop.wait(0.05):
            for path in paths:
                with contextlib.suppress(OSError):  # ENXIO: no reader is blocked on it
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=release, daemon=True)
    thread.start()

    def make(path: Path) -> Path:
        os.mkfifo(path)
        paths.append(path)
        return path

    yield make
    stop.set()
    thread.join()

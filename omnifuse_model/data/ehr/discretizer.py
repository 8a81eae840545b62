"""mimic3-benchmarks episode time series and the benchmark's discretiser.

Implements the semantics of mimic3-benchmarks' ``Discretizer`` (``mimic3models/preprocessing.py``
with ``resources/discretizer_config.json``) for ``impute_strategy='previous'``,
``start_time='zero'``, ``store_masks=True``, as recorded in design/MIMIC_FORMATS.md section 1b:

* ``N_bins = int(end / timestep + 1 - EPS)``; rows with ``t > end + EPS`` are skipped;
* ``bin = int(t / timestep - EPS)``: bins are right-closed, ``((k) ts, (k+1) ts] -> k``, and
  ``int()`` truncates toward zero, so ``-timestep < t <= 0`` lands in bin 0;
* a non-empty cell sets the channel's mask and writes its value; a later row in the same bin
  overwrites it (a categorical one-hot is cleared and rewritten);
* a bin without an observation takes the last observed raw string of an earlier bin, else the
  channel's normal value, with mask 0.

Everything here is strict: an input the reference rejects raises ``ValueError``. The tolerant
path for real-world files, with named and counted repairs and rejections, is
:mod:`omnifuse_model.data.ehr.episodes`.
"""

from __future__ import annotations

import csv
import math
import os
import stat
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import numpy as np

EPS = 1e-6
"""The reference's tolerance on bin edges, window end and Hours ordering."""

CHANNELS: tuple[str, ...] = (
    "Capillary refill rate",
    "Diastolic blood pressure",
    "Fraction inspired oxygen",
    "Glascow coma scale eye opening",
    "Glascow coma scale motor response",
    "Glascow coma scale total",
    "Glascow coma scale verbal response",
    "Glucose",
    "Heart Rate",
    "Height",
    "Mean blood pressure",
    "Oxygen saturation",
    "Respiratory rate",
    "Systolic blood pressure",
    "Temperature",
    "Weight",
    "pH",
)
"""The 17 variables, in episode-header order (Python-sorted, so ``pH`` is last)."""

EPISODE_HEADER: tuple[str, ...] = ("Hours", *CHANNELS)
"""Exact header of an ``{SUBJECT}_episode{N}_timeseries.csv`` file."""

# One-hot order is the benchmark config's list order, deliberately not sorted.
CATEGORY_VALUES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "Capillary refill rate": ("0.0", "1.0"),
        "Glascow coma scale eye opening": (
            "To Pain",
            "3 To speech",
            "1 No Response",
            "4 Spontaneously",
            "None",
            "To Speech",
            "Spontaneously",
            "2 To pain",
        ),
        "Glascow coma scale motor response": (
            "1 No Response",
            "3 Abnorm flexion",
            "Abnormal extension",
            "No response",
            "4 Flex-withdraws",
            "Localizes Pain",
            "Flex-withdraws",
            "Obeys Commands",
            "Abnormal Flexion",
            "6 Obeys Commands",
            "5 Localizes Pain",
            "2 Abnorm extensn",
        ),
        "Glascow coma scale total": (
            "11",
            "10",
            "13",
            "12",
            "15",
            "14",
            "3",
            "5",
            "4",
            "7",
            "6",
            "9",
            "8",
        ),
        "Glascow coma scale verbal response": (
            "1 No Response",
            "No Response",
            "Confused",
            "Inappropriate Words",
            "Oriented",
            "No Response-ETT",
            "5 Oriented",
            "Incomprehensible sounds",
            "1.0 ET/Trach",
            "4 Confused",
            "2 Incomp sounds",
            "3 Inapprop words",
        ),
    }
)
"""Vocabulary of each categorical channel, in one-hot column order."""

IS_CATEGORICAL: Mapping[str, bool] = MappingProxyType(
    {channel: channel in CATEGORY_VALUES for channel in CHANNELS}
)

NORMAL_VALUES: Mapping[str, str] = MappingProxyType(
    {
        "Capillary refill rate": "0.0",
        "Diastolic blood pressure": "59.0",
        "Fraction inspired oxygen": "0.21",
        "Glascow coma scale eye opening": "4 Spontaneously",
        "Glascow coma scale motor response": "6 Obeys Commands",
        "Glascow coma scale total": "15",
        "Glascow coma scale verbal response": "5 Oriented",
        "Glucose": "128.0",
        "Heart Rate": "86",
        "Height": "170.0",
        "Mean blood pressure": "77.0",
        "Oxygen saturation": "98.0",
        "Respiratory rate": "19",
        "Systolic blood pressure": "118.0",
        "Temperature": "36.6",
        "Weight": "81.0",
        "pH": "7.4",
    }
)
"""Raw strings imputed before a channel's first observation."""

PLAUSIBLE_RANGES: Mapping[str, tuple[float, float, str]] = MappingProxyType(
    {
        "Diastolic blood pressure": (0.0, 300.0, "mmHg"),
        "Fraction inspired oxygen": (0.1, 1.0, "fraction"),
        "Glucose": (5.0, 2500.0, "mg/dL"),
        "Heart Rate": (0.0, 350.0, "beats/min"),
        "Height": (50.0, 275.0, "cm"),
        "Mean blood pressure": (0.0, 300.0, "mmHg"),
        "Oxygen saturation": (0.0, 100.0, "%"),
        "Respiratory rate": (0.0, 150.0, "breaths/min"),
        "Systolic blood pressure": (0.0, 400.0, "mmHg"),
        "Temperature": (14.0, 47.0, "degC"),
        "Weight": (1.0, 700.0, "kg"),
        "pH": (4.0, 10.0, "pH units"),
    }
)
"""Physiologically plausible ``(low, high, unit)`` of each continuous channel, inclusive, in
the units mimic3-benchmarks converts to (Temperature in degrees C, Weight in kg, Height in cm,
FiO2 as a fraction). Deliberately wide: they catch unit slips and sentinel values (``-1e30``,
``99999``), not abnormal patients; pH spans urine pH (4-9), which the benchmark maps to the
same variable (design/MIMIC_FORMATS.md section 1a). A value outside its range is read as not
charted (:mod:`omnifuse_model.data.ehr.episodes`), so the discretiser's imputation applies and
the normaliser's statistics never see it."""


def plausible_range_text(channel: str) -> str:
    """``"[low, high] unit"`` of a continuous channel, for reports and errors."""
    low, high, unit = PLAUSIBLE_RANGES[channel]
    return f"[{low:g}, {high:g}] {unit}"


def _value_header() -> tuple[str, ...]:
    names: list[str] = []
    for channel in CHANNELS:
        if IS_CATEGORICAL[channel]:
            names.extend(f"{channel}->{value}" for value in CATEGORY_VALUES[channel])
        else:
            names.append(channel)
    return tuple(names)


_VALUE_HEADER = _value_header()
NUM_VALUE_COLUMNS = len(_VALUE_HEADER)  # 59
NUM_FEATURES = NUM_VALUE_COLUMNS + len(CHANNELS)  # 76
FEATURE_HEADER: tuple[str, ...] = _VALUE_HEADER + tuple(f"mask->{c}" for c in CHANNELS)
"""Names of the 76 output columns: ``Channel->value``, ``Channel``, then ``mask->Channel``."""

CHANNEL_OFFSETS: Mapping[str, int] = MappingProxyType(
    {
        channel: _VALUE_HEADER.index(
            f"{channel}->{CATEGORY_VALUES[channel][0]}" if IS_CATEGORICAL[channel] else channel
        )
        for channel in CHANNELS
    }
)
"""First output column of each channel's value (one-hot block or single column)."""

MASK_COLUMNS: tuple[int, ...] = tuple(range(NUM_VALUE_COLUMNS, NUM_FEATURES))
CONTINUOUS_COLUMNS: tuple[int, ...] = tuple(
    i for i, name in enumerate(FEATURE_HEADER) if "->" not in name
)
"""The 12 columns the benchmark normaliser scales: [2, 3, 49..58]."""

# Per channel id: category -> one-hot position (None for continuous channels).
_CATEGORY_INDEX: tuple[dict[str, int] | None, ...] = tuple(
    {value: k for k, value in enumerate(CATEGORY_VALUES[c])} if IS_CATEGORICAL[c] else None
    for c in CHANNELS
)
_OFFSETS: tuple[int, ...] = tuple(CHANNEL_OFFSETS[c] for c in CHANNELS)
_CHANNEL_ID: Mapping[str, int] = MappingProxyType({c: i for i, c in enumerate(CHANNELS)})


def num_bins(end: float, timestep: float) -> int:
    """Number of bins covering ``[0, end]``: ``int(end / timestep + 1 - EPS)`` (reference)."""
    if not math.isfinite(end):
        raise ValueError(f"window end must be finite, got {end!r}")
    count = int(end / timestep + 1.0 - EPS)
    if count < 0:
        raise ValueError(f"window end {end!r} h gives a negative bin count at timestep {timestep}")
    return count


def bin_index(t: float, timestep: float) -> int:
    """Bin of a row at ``t`` hours: ``int(t / timestep - EPS)``, truncated toward zero."""
    try:
        return int(t / timestep - EPS)
    except (ValueError, OverflowError):
        raise ValueError(f"Hours {t!r} has no bin") from None


def parse_cell(channel: str, value: str) -> int | float:
    """One non-empty cell as the reference reads it.

    Returns the one-hot position for a categorical channel (exact vocabulary match) or
    ``float(value)`` for a continuous one; raises ``ValueError`` naming channel and value.
    """
    index = _CATEGORY_INDEX[_CHANNEL_ID[channel]]
    if index is not None:
        try:
            return index[value]
        except KeyError:
            raise ValueError(
                f"column {channel!r}: {value!r} is not one of {list(CATEGORY_VALUES[channel])}"
            ) from None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"column {channel!r}: {value!r} is not a number") from None


_NORMAL_PARSED: tuple[int | float, ...] = tuple(parse_cell(c, NORMAL_VALUES[c]) for c in CHANNELS)


def _channel_ids(channels: Sequence[str]) -> list[int]:
    unknown = [c for c in channels if c not in _CHANNEL_ID]
    if unknown:
        raise ValueError(f"unknown channel names {unknown}; expected names from {list(CHANNELS)}")
    if len(set(channels)) != len(channels):
        raise ValueError(f"duplicate channel names in {list(channels)}")
    return [_CHANNEL_ID[c] for c in channels]


def check_timestep(timestep: float) -> None:
    """Raise ``ValueError`` unless ``timestep`` is a finite positive number of hours."""
    try:
        valid = math.isfinite(timestep) and timestep > 0
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"timestep must be a finite number of hours > 0, got {timestep!r}")


def _check_hours(hours: Sequence[float], rows: Sequence[Sequence[str]]) -> None:
    """The reference's checks on Hours: one per row, none NaN, non-decreasing within EPS."""
    if len(hours) != len(rows):
        raise ValueError(f"{len(hours)} Hours values for {len(rows)} rows")
    for i, t in enumerate(hours):
        if math.isnan(t):
            raise ValueError(f"data row {i + 1}: Hours is NaN")
        if i and not hours[i - 1] < t + EPS:
            raise ValueError(
                f"Hours must be non-decreasing: data row {i} has {hours[i - 1]!r}, "
                f"data row {i + 1} has {t!r}"
            )


def _observe(
    hours: Sequence[float],
    rows: Sequence[Sequence[str]],
    channel_ids: list[int],
    timestep: float,
    max_hours: float,
    n_bins: int,
) -> tuple[list[list[int | float | None]], np.ndarray]:
    """The last parsed observation per (bin, channel) and the ``[bins, 17]`` masks.

    The reference writes every cell as it goes; keeping only the last observation per
    (bin, channel) yields the same array, since a later write replaces the whole value.
    """
    observed: list[list[int | float | None]] = [[None] * len(CHANNELS) for _ in range(n_bins)]
    masks = np.zeros((n_bins, len(CHANNELS)), dtype=np.float64)
    for i, (t, row) in enumerate(zip(hours, rows, strict=True)):
        if len(row) != len(channel_ids):
            raise ValueError(
                f"data row {i + 1} has {len(row)} cells for {len(channel_ids)} channels"
            )
        if t > max_hours + EPS:
            continue
        b = bin_index(t, timestep)
        if not 0 <= b < n_bins:
            raise ValueError(
                f"data row {i + 1}: Hours {t!r} falls in bin {b}, outside 0..{n_bins - 1} "
                f"(timestep {timestep} h, end {max_hours} h)"
            )
        for cell, ch in zip(row, channel_ids, strict=True):
            if cell == "":
                continue
            try:
                observed[b][ch] = parse_cell(CHANNELS[ch], cell)
            except ValueError as err:
                raise ValueError(f"data row {i + 1} (Hours {t!r}): {err}") from None
            masks[b, ch] = 1.0
    return observed, masks


def _impute_previous(observed: list[list[int | float | None]]) -> np.ndarray:
    """``[bins, 59]`` values: each bin's observation, else the last earlier one, else the
    channel's normal value (``impute_strategy='previous'``); categories one-hot."""
    values = np.zeros((len(observed), NUM_VALUE_COLUMNS), dtype=np.float64)
    last = list(_NORMAL_PARSED)
    for b, cells in enumerate(observed):
        for ch, value in enumerate(cells):
            if value is None:
                value = last[ch]
            else:
                last[ch] = value
            if _CATEGORY_INDEX[ch] is None:
                values[b, _OFFSETS[ch]] = value
            else:
                values[b, _OFFSETS[ch] + int(value)] = 1.0
    return values


def discretize_rows(
    hours: Sequence[float],
    rows: Sequence[Sequence[str]],
    channels: Sequence[str] = CHANNELS,
    timestep: float = 2.0,
    end: float | None = 48.0,
) -> tuple[np.ndarray, list[str]]:
    """Discretise parsed rows exactly as the benchmark ``Discretizer.transform`` does.

    ``hours[i]`` is row i's ``Hours``; ``rows[i]`` holds its raw cells, one per name in
    ``channels`` (any subset/order of :data:`CHANNELS`; channels not listed are never
    observed). ``end=None`` uses ``max(hours)``. Returns the ``[N_bins, 76]`` float32 array
    (59 values, then 17 masks) and :data:`FEATURE_HEADER` as a list. Raises ``ValueError`` on
    anything the reference rejects: Hours decreasing by more than EPS or NaN, a row before
    bin 0 or past the last bin, an unknown category, a non-numeric continuous value.
    """
    check_timestep(timestep)
    _check_hours(hours, rows)
    channel_ids = _channel_ids(channels)
    if end is None:
        if not hours:
            raise ValueError("end=None needs at least one row to take the window from")
        end = max(hours)
    max_hours = float(end)
    n_bins = num_bins(max_hours, timestep)
    observed, masks = _observe(hours, rows, channel_ids, timestep, max_hours, n_bins)
    values = _impute_previous(observed)
    with np.errstate(over="ignore"):  # |v| > float32 max becomes inf, as a float32 cast does
        out = np.hstack([values, masks]).astype(np.float32)
    return out, list(FEATURE_HEADER)


class NotRegularFileError(ValueError):
    """A path that should be a data file is a FIFO, device, socket or directory."""


def check_regular_file(path: str | os.PathLike[str], expected: str) -> None:
    """Raise :class:`NotRegularFileError` naming ``path`` unless it is a regular file (links
    followed); ``FileNotFoundError`` when it does not exist. Call before opening: opening a
    FIFO blocks until a writer appears."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else None
        raise NotRegularFileError(
            f"{path}: not a regular file ({kind or 'a device or socket'}); expected {expected}"
        )


def read_episode_csv(
    path: str | os.PathLike[str],
) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, data rows and their line numbers of an episode CSV, every cell a raw string.

    Reads with the csv module (values never coerced). As the reference strips each line
    before splitting, the first cell is left-stripped and the last right-stripped. Blank lines
    come back as empty rows; a file without lines gives an empty header. Raises ``OSError``
    for an unreadable file, :class:`NotRegularFileError` for a FIFO, device or directory (never
    opened: a FIFO would block forever) and ``ValueError`` for undecodable bytes or malformed CSV.
    """
    check_regular_file(path, "an episode CSV")
    header: list[str] = []
    rows: list[list[str]] = []
    lines: list[int] = []
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        try:
            for k, row in enumerate(reader):
                if row:
                    row[0] = row[0].lstrip()
                    row[-1] = row[-1].rstrip()
                if k == 0:
                    header = row
                else:
                    rows.append(row)
                    lines.append(reader.line_num)
        except csv.Error as err:
            raise ValueError(f"{path}: malformed CSV near line {reader.line_num}: {err}") from None
    return header, rows, lines


def header_mismatch(header: Sequence[str]) -> str:
    """Why ``header`` is not :data:`EPISODE_HEADER`, in words ("" when it is)."""
    if tuple(header) == EPISODE_HEADER:
        return ""
    missing = [c for c in EPISODE_HEADER if c not in header]
    extra = [c for c in header if c not in EPISODE_HEADER]
    duplicated = sorted({c for c in header if list(header).count(c) > 1})
    parts = []
    if missing:
        parts.append(f"missing columns {missing}")
    if extra:
        parts.append(f"unexpected columns {extra}")
    if duplicated:
        parts.append(f"duplicated columns {duplicated}")
    if not parts:
        parts.append("columns are in a different order")
    return "; ".join(parts)


def discretize_episode(
    path: str | os.PathLike[str], timestep: float = 2.0, end: float | None = 48.0
) -> tuple[np.ndarray, list[str]]:
    """Read and discretise one episode CSV with the benchmark's semantics (strict).

    Returns the ``[N_bins, 76]`` float32 array and :data:`FEATURE_HEADER`; IHM uses
    ``end=48`` (24 bins at timestep 2, 48 at timestep 1), phenotyping ``end=period_length``.
    The header must be exactly :data:`EPISODE_HEADER` and every row must have 18 fields.
    Any defect raises ``ValueError`` naming the file, line or column and value; for counted
    repairs instead use :func:`omnifuse_model.data.ehr.episodes.discretize_episode_tolerant`.
    """
    header, rows, lines = read_episode_csv(path)
    problem = header_mismatch(header)
    if problem:
        raise ValueError(f"{path}: not a mimic3-benchmarks episode header: {problem}")
    if not rows:
        raise ValueError(f"{path}: no data rows below the header")
    hours: list[float] = []
    for row, line in zip(rows, lines, strict=True):
        if len(row) != len(EPISODE_HEADER):
            raise ValueError(
                f"{path}: line {line} has {len(row)} fields, expected {len(EPISODE_HEADER)}"
            )
        try:
            hours.append(float(row[0]))
        except ValueError:
            raise ValueError(f"{path}: line {line}: Hours {row[0]!r} is not a number") from None
    try:
        return discretize_rows(hours, [row[1:] for row in rows], CHANNELS, timestep, end)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None

"""Tolerant reading of real-world episode CSVs, with named and counted repairs and rejections.

The benchmark discretiser crashes on a single odd file (an unknown spelling such as ``"15.0"``
for a GCS total, unsorted Hours, a blank line). A site must not crash: each episode is either
used as is, used after repairs, or rejected, and the :class:`EpisodeReport` says which, why and
how often, so an ingest report can account for every stay (design/MIMIC_FORMATS.md section 4).

Repairs (lossless, or dropping only what carries no data or could never be binned):
``blank_rows``, ``byte_order_mark``, ``reordered_columns``, ``unsorted_hours`` (stable sort),
``hours_before_window`` (rows whose bin would be negative, i.e. t <= -timestep),
``hours_after_last_bin``, ``category_variant`` (``"15.0"`` -> ``"15"``, ``"0"`` -> ``"0.0"``,
``"confused"`` -> ``"Confused"``, when exactly one vocabulary entry matches),
``whitespace_cell``, ``nonfinite_value`` and ``implausible_value`` (a value outside the
channel's :data:`~.discretizer.PLAUSIBLE_RANGES`, e.g. a weight of ``-1e30``; all
three are read as not charted, so the discretiser's imputation fills the bin; implausible
values are also counted per channel in :attr:`EpisodeReport.implausible`).
Everything else rejects the episode with a :class:`RejectReason`.

Invariant: an episode that :func:`~.discretizer.discretize_episode` accepts is
returned unchanged and with status ``used``, except that non-finite values (``"nan"``,
``"inf"``, beyond float32) and implausible values are read as not charted unless
``drop_nonfinite=False``.
Cells of rows outside the window are never inspected, as in the reference.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import pairwise
from typing import Any

import numpy as np

from omnifuse_model.data.ehr.discretizer import (
    CATEGORY_VALUES,
    CHANNELS,
    EPISODE_HEADER,
    EPS,
    FEATURE_HEADER,
    PLAUSIBLE_RANGES,
    NotRegularFileError,
    bin_index,
    check_timestep,
    discretize_rows,
    header_mismatch,
    num_bins,
    read_episode_csv,
)

logger = logging.getLogger(__name__)

_FLOAT32_MAX = float(np.finfo(np.float32).max)


class RejectReason(StrEnum):
    """Why an episode (or a listed stay) was not used."""

    MISSING_FILE = "missing_file"
    UNREADABLE_FILE = "unreadable_file"
    NOT_REGULAR_FILE = "not_regular_file"
    EMPTY_FILE = "empty_file"
    BAD_HEADER = "bad_header"
    NO_ROWS = "no_rows"
    SHORT_ROW = "short_row"
    LONG_ROW = "long_row"
    UNPARSEABLE_HOURS = "unparseable_hours"
    UNPARSEABLE_VALUE = "unparseable_value"
    UNKNOWN_CATEGORY = "unknown_category"
    EMPTY_WINDOW = "empty_window"
    INVALID_EPISODE = "invalid_episode"
    BAD_LISTFILE_ROW = "bad_listfile_row"
    DUPLICATE_STAY = "duplicate_stay"
    STAY_IN_TWO_SPLITS = "stay_in_two_splits"
    SUBJECT_IN_TWO_SPLITS = "subject_in_two_splits"


class RepairReason(StrEnum):
    """What was changed in an episode that was kept."""

    BLANK_ROWS = "blank_rows"
    BYTE_ORDER_MARK = "byte_order_mark"
    REORDERED_COLUMNS = "reordered_columns"
    UNSORTED_HOURS = "unsorted_hours"
    HOURS_BEFORE_WINDOW = "hours_before_window"
    HOURS_AFTER_LAST_BIN = "hours_after_last_bin"
    CATEGORY_VARIANT = "category_variant"
    WHITESPACE_CELL = "whitespace_cell"
    NONFINITE_VALUE = "nonfinite_value"
    IMPLAUSIBLE_VALUE = "implausible_value"


class EpisodeStatus(StrEnum):
    """Outcome of one episode at ingest."""

    USED = "used"
    REPAIRED = "repaired"
    REJECTED = "rejected"


@dataclass
class EpisodeReport:
    """Ingest outcome of one episode: rejection reason or repairs with their counts."""

    path: str
    reject_reason: RejectReason | None = None
    detail: str = ""
    repairs: dict[RepairReason, int] = field(default_factory=dict)
    rows_read: int = 0
    rows_used: int = 0
    implausible: dict[str, int] = field(default_factory=dict)
    """Channel -> values read as not charted because they lie outside its plausible range."""

    @property
    def status(self) -> EpisodeStatus:
        """``rejected`` if rejected, else ``repaired`` if anything was repaired, else ``used``."""
        if self.reject_reason is not None:
            return EpisodeStatus.REJECTED
        return EpisodeStatus.REPAIRED if self.repairs else EpisodeStatus.USED

    def add_repair(self, reason: RepairReason, count: int = 1) -> None:
        """Count ``count`` repairs of kind ``reason`` (nothing when ``count`` is 0)."""
        if count > 0:
            self.repairs[reason] = self.repairs.get(reason, 0) + count
            logger.debug("%s: repaired %s x%d", self.path, reason, count)

    def reject(self, reason: RejectReason, detail: str) -> None:
        """Mark the episode rejected with a named reason and a human-readable detail."""
        self.reject_reason = reason
        self.detail = detail
        logger.debug("%s: rejected (%s): %s", self.path, reason, detail)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for ingest reports."""
        return {
            "path": self.path,
            "status": str(self.status),
            "reject_reason": None if self.reject_reason is None else str(self.reject_reason),
            "detail": self.detail,
            "repairs": {str(k): v for k, v in sorted(self.repairs.items())},
            "rows_read": self.rows_read,
            "rows_used": self.rows_used,
            "implausible": dict(sorted(self.implausible.items())),
        }


@dataclass
class EpisodeResult:
    """An episode read and structurally repaired; empty when the report is a rejection.

    ``rows[i]`` holds the raw cells of row i in :data:`CHANNELS` order (no Hours), sorted by
    ``hours``; ``lines[i]`` is its line number in the file.
    """

    report: EpisodeReport
    hours: list[float] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True unless the episode was rejected."""
        return self.report.reject_reason is None


def normalize_category(value: str, vocabulary: tuple[str, ...]) -> str | None:
    """The vocabulary entry an obvious variant of ``value`` stands for, else None.

    Tries, in order: exact match; whitespace trimmed and collapsed; case-insensitive match;
    numeric equality (``"15.0"`` -> ``"15"``, ``"1"`` -> ``"1.0"``). A variant matching more
    than one entry is ambiguous and gives None.
    """
    if value in vocabulary:
        return value
    collapsed = " ".join(value.split())
    if collapsed in vocabulary:
        return collapsed
    key = collapsed.casefold()
    matches = [v for v in vocabulary if " ".join(v.split()).casefold() == key]
    if matches:
        return matches[0] if len(matches) == 1 else None
    number = _as_float(collapsed)
    if number is None or not math.isfinite(number):
        return None
    matches = [v for v in vocabulary if _as_float(v) == number]
    return matches[0] if len(matches) == 1 else None


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _read_header(
    path: str | os.PathLike[str], report: EpisodeReport
) -> tuple[list[list[str]], list[int], list[int] | None] | None:
    """Rows, line numbers and the column order mapping the file's header to
    :data:`EPISODE_HEADER` (None when it already is); None after a rejection."""
    try:
        header, raw_rows, raw_lines = read_episode_csv(path)
    except FileNotFoundError:
        report.reject(RejectReason.MISSING_FILE, f"{path}: no such file")
        return None
    except NotRegularFileError as err:
        report.reject(RejectReason.NOT_REGULAR_FILE, str(err))
        return None
    except (OSError, ValueError) as err:
        report.reject(RejectReason.UNREADABLE_FILE, f"{path}: {err}")
        return None
    if not any(cell.strip() for cell in header):
        if any(any(cell.strip() for cell in row) for row in raw_rows):
            report.reject(RejectReason.BAD_HEADER, f"{path}: the first line is blank")
        else:
            report.reject(RejectReason.EMPTY_FILE, f"{path}: the file holds no text")
        return None
    if header[0].startswith("\ufeff"):
        header[0] = header[0].lstrip("\ufeff")
        report.add_repair(RepairReason.BYTE_ORDER_MARK)
    order: list[int] | None = None
    if tuple(header) != EPISODE_HEADER:
        if sorted(header) != sorted(EPISODE_HEADER):
            report.reject(RejectReason.BAD_HEADER, f"{path}: {header_mismatch(header)}")
            return None
        order = [header.index(name) for name in EPISODE_HEADER]
        report.add_repair(RepairReason.REORDERED_COLUMNS)
    return raw_rows, raw_lines, order


def _read_rows(
    result: EpisodeResult, raw_rows: list[list[str]], raw_lines: list[int], order: list[int] | None
) -> bool:
    """Fill ``result`` with the non-blank rows (Hours parsed); False after a rejection."""
    report, path = result.report, result.report.path
    blank = 0
    width = len(EPISODE_HEADER)
    for row, line in zip(raw_rows, raw_lines, strict=True):
        if not any(cell.strip() for cell in row):
            blank += 1
            continue
        if len(row) != width:
            reason = RejectReason.SHORT_ROW if len(row) < width else RejectReason.LONG_ROW
            report.reject(reason, f"{path}: line {line} has {len(row)} fields, expected {width}")
            return False
        if order is not None:
            row = [row[k] for k in order]
        t = _as_float(row[0])
        if t is None or math.isnan(t):
            report.reject(RejectReason.UNPARSEABLE_HOURS, f"{path}: line {line}: Hours {row[0]!r}")
            return False
        result.hours.append(t)
        result.rows.append(row[1:])
        result.lines.append(line)
    report.add_repair(RepairReason.BLANK_ROWS, blank)
    if not result.hours:
        report.reject(RejectReason.NO_ROWS, f"{path}: no data rows below the header")
        return False
    report.rows_read = len(result.hours)
    return True


def read_episode(path: str | os.PathLike[str]) -> EpisodeResult:
    """Read an episode CSV, repairing or rejecting file-level defects with named reasons.

    Handles: missing/unreadable file, empty file, bad header (reordered columns are mapped
    back, anything else rejected), blank rows, rows with too few or too many fields, Hours
    that are not numbers or NaN, and unsorted Hours (stable sort). Cell values are left as
    read; :func:`discretize_episode_tolerant` checks those inside the window. Never raises for
    bad data.
    """
    report = EpisodeReport(path=str(path))
    read = _read_header(path, report)
    if read is None:
        return EpisodeResult(report)
    result = EpisodeResult(report)
    if not _read_rows(result, *read):
        return EpisodeResult(report)
    # Sort only where the reference's check (t[i] < t[i+1] + EPS) fails, so that accepted
    # files keep their row order and hence their within-bin overwrite order.
    inversions = sum(1 for a, b in pairwise(result.hours) if not a < b + EPS)
    if inversions:
        by_time = sorted(range(len(result.hours)), key=result.hours.__getitem__)
        result.hours = [result.hours[k] for k in by_time]
        result.rows = [result.rows[k] for k in by_time]
        result.lines = [result.lines[k] for k in by_time]
        report.add_repair(RepairReason.UNSORTED_HOURS, inversions)
    return result


def _precedes_bin_zero(t: float, timestep: float) -> bool:
    """True when the reference would put ``t`` in a negative bin (t <= -timestep, roughly)."""
    if math.isinf(t):
        return t < 0
    return bin_index(t, timestep) < 0


def _select_window(
    result: EpisodeResult, timestep: float, end: float | None
) -> tuple[float, list[int]] | None:
    """Window end and indexes of the rows the discretiser consumes; None after a rejection."""
    report = result.report
    kept = [i for i, t in enumerate(result.hours) if not _precedes_bin_zero(t, timestep)]
    report.add_repair(RepairReason.HOURS_BEFORE_WINDOW, len(result.hours) - len(kept))
    if end is None:
        if not kept:
            report.reject(RejectReason.EMPTY_WINDOW, f"{report.path}: every row precedes bin 0")
            return None
        end = max(result.hours[i] for i in kept)
        if not math.isfinite(end):
            report.reject(
                RejectReason.UNPARSEABLE_HOURS,
                f"{report.path}: infinite Hours cannot set the window end (end=None)",
            )
            return None
    n_bins = num_bins(end, timestep)
    if n_bins == 0:
        report.reject(RejectReason.EMPTY_WINDOW, f"{report.path}: window end {end} h gives 0 bins")
        return None
    in_window = [i for i in kept if result.hours[i] <= end + EPS]
    used = [i for i in in_window if bin_index(result.hours[i], timestep) < n_bins]
    report.add_repair(RepairReason.HOURS_AFTER_LAST_BIN, len(in_window) - len(used))
    return end, used


def _clean_cells(row: list[str], line: int, report: EpisodeReport, drop_nonfinite: bool) -> bool:
    """Normalise one row's cells in place; False (and the report rejected) on a bad cell."""
    for k, cell in enumerate(row):
        if cell == "":
            continue
        channel = CHANNELS[k]
        if not cell.strip():
            row[k] = ""
            report.add_repair(RepairReason.WHITESPACE_CELL)
            continue
        vocabulary = CATEGORY_VALUES.get(channel)
        if vocabulary is not None:
            if cell in vocabulary:
                continue
            fixed = normalize_category(cell, vocabulary)
            if fixed is None:
                report.reject(
                    RejectReason.UNKNOWN_CATEGORY,
                    f"{report.path}: line {line}, column {channel!r}: {cell!r} is not one of "
                    f"{list(vocabulary)}",
                )
                return False
            row[k] = fixed
            report.add_repair(RepairReason.CATEGORY_VARIANT)
            continue
        value = _as_float(cell)
        if value is None:
            report.reject(
                RejectReason.UNPARSEABLE_VALUE,
                f"{report.path}: line {line}, column {channel!r}: {cell!r} is not a number",
            )
            return False
        if not drop_nonfinite:
            continue
        if not (math.isfinite(value) and abs(value) <= _FLOAT32_MAX):
            row[k] = ""
            report.add_repair(RepairReason.NONFINITE_VALUE)
        elif not _plausible(channel, value):
            row[k] = ""
            report.add_repair(RepairReason.IMPLAUSIBLE_VALUE)
            report.implausible[channel] = report.implausible.get(channel, 0) + 1
    return True


def _plausible(channel: str, value: float) -> bool:
    bounds = PLAUSIBLE_RANGES.get(channel)
    return bounds is None or bounds[0] <= value <= bounds[1]


def discretize_episode_tolerant(
    path: str | os.PathLike[str],
    timestep: float = 2.0,
    end: float | None = 48.0,
    *,
    drop_nonfinite: bool = True,
) -> tuple[np.ndarray | None, list[str], EpisodeReport]:
    """Discretise one episode like the benchmark, repairing or rejecting bad data by name.

    Returns ``(array or None, FEATURE_HEADER, report)``: the ``[N_bins, 76]`` float32 array
    of :func:`~.discretizer.discretize_rows` for a used or repaired episode, None
    for a rejected one. Raises only for invalid arguments (timestep, end), never for bad data.
    """
    check_timestep(timestep)
    if end is not None and not (math.isfinite(end) and end >= 0):
        raise ValueError(f"end must be None or a finite number of hours >= 0, got {end!r}")
    header = list(FEATURE_HEADER)
    result = read_episode(path)
    report = result.report
    if not result.ok:
        return None, header, report
    window = _select_window(result, timestep, end)
    if window is None:
        return None, header, report
    window_end, used = window
    hours = [result.hours[i] for i in used]
    rows = [list(result.rows[i]) for i in used]
    for row, i in zip(rows, used, strict=True):
        if not _clean_cells(row, result.lines[i], report, drop_nonfinite):
            return None, header, report
    try:
        array, _ = discretize_rows(hours, rows, CHANNELS, timestep, window_end)
    except ValueError as err:  # not expected after the checks above; reject, never crash
        report.reject(RejectReason.INVALID_EPISODE, f"{report.path}: {err}")
        return None, header, report
    report.rows_used = len(used)
    return array, header, report


@dataclass
class IngestSummary:
    """Counts over many episode reports: every episode is used, repaired or rejected."""

    episodes: int
    used: int
    repaired: int
    rejected: int
    rejected_by_reason: dict[str, int]
    repaired_by_reason: dict[str, int]
    """Episodes with at least one repair of each kind."""
    repair_counts: dict[str, int]
    """Total repairs of each kind over all kept episodes."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(vars(self))


def summarize_reports(reports: Iterable[EpisodeReport]) -> IngestSummary:
    """Tally episode reports into an :class:`IngestSummary` for the site's ingest report."""
    status: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    repaired: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for report in reports:
        status[report.status] += 1
        if report.reject_reason is not None:
            rejected[report.reject_reason] += 1
            continue
        for reason, count in report.repairs.items():
            repaired[reason] += 1
            counts[reason] += count
    return IngestSummary(
        episodes=sum(status.values()),
        used=status[EpisodeStatus.USED],
        repaired=status[EpisodeStatus.REPAIRED],
        rejected=status[EpisodeStatus.REJECTED],
        rejected_by_reason={str(k): v for k, v in sorted(rejected.items())},
        repaired_by_reason={str(k): v for k, v in sorted(repaired.items())},
        repair_counts={str(k): v for k, v in sorted(counts.items())},
    )

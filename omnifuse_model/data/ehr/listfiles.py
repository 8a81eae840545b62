"""Listfiles of the mimic3-benchmarks and MedFuse task folders, read into typed stay records.

Layouts (design/MIMIC_FORMATS.md sections 1a and 2):

* in-hospital mortality, benchmark: ``stay,y_true``; MedFuse: ``stay,period_length,stay_id,
  y_true`` with period_length 0 meaning 48 h (MedFuse uses 48 whenever it is <= 0);
* phenotyping, benchmark: ``stay,period_length,<25 labels>``; MedFuse: ``stay,period_length,
  stay_id,<25 labels>``;
* ``{task}/{train,val,test}_listfile.csv``, whose stays live in ``train/`` (train and val) or
  ``test/``; stay names are ``{SUBJECT_ID}_episode{N}_timeseries.csv``.

A wrong header is an error naming the file and the column. A bad row, a duplicate, or a listed
stay whose file is missing is a counted rejection (an :class:`EpisodeReport`), never a crash.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from omnifuse_model.data.ehr.discretizer import check_regular_file
from omnifuse_model.data.ehr.episodes import EpisodeReport, RejectReason

logger = logging.getLogger(__name__)


class Task(StrEnum):
    """Benchmark tasks, named as their data folders."""

    IN_HOSPITAL_MORTALITY = "in-hospital-mortality"
    PHENOTYPING = "phenotyping"


PHENOTYPE_LABELS: tuple[str, ...] = (
    "Acute and unspecified renal failure",
    "Acute cerebrovascular disease",
    "Acute myocardial infarction",
    "Cardiac dysrhythmias",
    "Chronic kidney disease",
    "Chronic obstructive pulmonary disease and bronchiectasis",
    "Complications of surgical procedures or medical care",
    "Conduction disorders",
    "Congestive heart failure; nonhypertensive",
    "Coronary atherosclerosis and other heart disease",
    "Diabetes mellitus with complications",
    "Diabetes mellitus without complication",
    "Disorders of lipid metabolism",
    "Essential hypertension",
    "Fluid and electrolyte disorders",
    "Gastrointestinal hemorrhage",
    "Hypertension with complications and secondary hypertension",
    "Other liver diseases",
    "Other lower respiratory disease",
    "Other upper respiratory disease",
    "Pleurisy; pneumothorax; pulmonary collapse",
    "Pneumonia (except that caused by tuberculosis or sexually transmitted disease)",
    "Respiratory failure; insufficiency; arrest (adult)",
    "Septicemia (except in labor)",
    "Shock",
)
"""The 25 phenotype label columns, in listfile order (sorted)."""

IHM_LABELS: tuple[str, ...] = ("y_true",)
IHM_PERIOD_HOURS = 48.0
SPLIT_DIRS: dict[str, str] = {"train": "train", "val": "train", "test": "test"}
"""Folder holding each split's episode files (validation stays live in ``train/``)."""

_STAY_NAME = re.compile(r"(\d+)_episode(\d+)_timeseries\.csv")


@dataclass(frozen=True)
class StayRecord:
    """One listed ICU stay: its episode file, identifiers, window and labels."""

    stay: str
    """Episode file name, e.g. ``10011_episode1_timeseries.csv``."""
    subject_id: int
    episode: int
    stay_id: int | None
    """ICU stay id (MedFuse listfiles only)."""
    period_length: float
    """Hours of data to discretise (the window end): 48 for IHM."""
    labels: tuple[int, ...]
    """``(y_true,)`` for IHM, 25 phenotype flags for phenotyping."""
    path: Path


@dataclass
class Listfile:
    """A parsed listfile: its records, and the listed stays that were rejected."""

    path: Path
    task: Task
    label_names: tuple[str, ...]
    has_stay_id: bool
    records: list[StayRecord] = field(default_factory=list)
    rejected: list[EpisodeReport] = field(default_factory=list)


def listfile_header(task: Task | str, with_stay_id: bool) -> tuple[str, ...]:
    """Expected header of a benchmark (``with_stay_id=False``) or MedFuse listfile."""
    task = Task(task)
    if task is Task.IN_HOSPITAL_MORTALITY:
        if not with_stay_id:
            return ("stay", *IHM_LABELS)
        return ("stay", "period_length", "stay_id", *IHM_LABELS)
    stay_id = ("stay_id",) if with_stay_id else ()
    return ("stay", "period_length", *stay_id, *PHENOTYPE_LABELS)


def _check_header(path: Path, task: Task, header: list[str]) -> tuple[str, ...]:
    with_stay_id = len(header) > 2 and header[2] == "stay_id"
    expected = listfile_header(task, with_stay_id)
    for i, name in enumerate(expected):
        if i >= len(header):
            raise ValueError(
                f"{path}: missing column {i + 1} {name!r} of a {task} listfile "
                f"(found {len(header)} columns, expected {len(expected)})"
            )
        if header[i] != name:
            raise ValueError(
                f"{path}: column {i + 1} is {header[i]!r}, expected {name!r} for a {task} listfile"
            )
    if len(header) > len(expected):
        raise ValueError(
            f"{path}: unexpected column {len(expected) + 1} {header[len(expected)]!r} "
            f"in a {task} listfile ({len(expected)} columns expected)"
        )
    return expected


class _BadRow(ValueError):
    pass


def _parse_int(text: str, column: str) -> int:
    value = _parse_float(text, column)
    if not value.is_integer():
        raise _BadRow(f"column {column!r}: {text!r} is not an integer")
    return int(value)


def _parse_float(text: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _BadRow(f"column {column!r}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise _BadRow(f"column {column!r}: {text!r} is not finite")
    return value


def _parse_row(row: list[str], header: tuple[str, ...], task: Task, data_dir: Path) -> StayRecord:
    if len(row) != len(header):
        raise _BadRow(f"{len(row)} fields, expected {len(header)}")
    stay = row[0].strip()
    match = _STAY_NAME.fullmatch(stay)
    if match is None:
        raise _BadRow(f"column 'stay': {stay!r} is not '<SUBJECT_ID>_episode<N>_timeseries.csv'")
    has_stay_id = "stay_id" in header
    stay_id = _parse_int(row[2], "stay_id") if has_stay_id else None
    n_labels = len(IHM_LABELS if task is Task.IN_HOSPITAL_MORTALITY else PHENOTYPE_LABELS)
    labels: list[int] = []
    for name, text in zip(header[-n_labels:], row[-n_labels:], strict=True):
        value = _parse_float(text, name)
        if value not in (0.0, 1.0):
            raise _BadRow(f"column {name!r}: {text!r} is not 0 or 1")
        labels.append(int(value))
    if "period_length" not in header:
        period = IHM_PERIOD_HOURS
    else:
        period = _parse_float(row[1], "period_length")
        if task is Task.IN_HOSPITAL_MORTALITY and period <= 0:
            period = IHM_PERIOD_HOURS
        elif period <= 0:
            raise _BadRow(f"column 'period_length': {row[1]!r} is not > 0")
    return StayRecord(
        stay=stay,
        subject_id=int(match.group(1)),
        episode=int(match.group(2)),
        stay_id=stay_id,
        period_length=period,
        labels=tuple(labels),
        path=data_dir / stay,
    )


def read_listfile(
    listfile: str | os.PathLike[str],
    task: Task | str,
    data_dir: str | os.PathLike[str],
    *,
    check_files: bool = True,
) -> Listfile:
    """Read a benchmark or MedFuse listfile of ``task``; stays resolve under ``data_dir``.

    The format (with or without ``stay_id``) is taken from the header. Raises ``ValueError``
    naming the file and column when the header does not fit the task or the file is not UTF-8
    text or not a regular file (a byte order mark is skipped), and ``OSError`` when the
    listfile cannot be read. Rows with wrong fields or labels, duplicate stays and (with
    ``check_files``) stays whose episode file is missing are rejected with a named reason.
    """
    path = Path(listfile)
    task = Task(task)
    data_dir = Path(data_dir)
    check_regular_file(path, "a listfile")
    with open(path, encoding="utf-8-sig", newline="") as handle:  # -sig: a BOM is not data
        reader = csv.reader(handle)
        try:
            header = [name.strip() for name in next(reader, [])]
            expected = _check_header(path, task, header)
            result = Listfile(
                path=path,
                task=task,
                label_names=IHM_LABELS if task is Task.IN_HOSPITAL_MORTALITY else PHENOTYPE_LABELS,
                has_stay_id="stay_id" in expected,
            )
            seen: set[str] = set()
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                _add_row(result, row, reader.line_num, expected, data_dir, seen, check_files)
        except csv.Error as err:
            raise ValueError(f"{path}: malformed CSV near line {reader.line_num}: {err}") from None
        except UnicodeDecodeError as err:  # decoded in blocks: the byte offset, not a line
            raise ValueError(f"{path}: not UTF-8 text: {err}") from None
    logger.debug("%s: %d stays, %d rejected", path, len(result.records), len(result.rejected))
    return result


def _add_row(
    result: Listfile,
    row: list[str],
    line: int,
    header: tuple[str, ...],
    data_dir: Path,
    seen: set[str],
    check_files: bool,
) -> None:
    where = f"{result.path}: line {line}"
    try:
        record = _parse_row(row, header, result.task, data_dir)
    except _BadRow as err:
        report = EpisodeReport(path=str(data_dir / row[0].strip()))
        report.reject(RejectReason.BAD_LISTFILE_ROW, f"{where}: {err}")
        result.rejected.append(report)
        return
    report = EpisodeReport(path=str(record.path))
    if record.stay in seen:
        report.reject(RejectReason.DUPLICATE_STAY, f"{where}: {record.stay} is listed again")
        result.rejected.append(report)
        return
    seen.add(record.stay)
    if check_files and not record.path.is_file():
        report.reject(RejectReason.MISSING_FILE, f"{where}: {record.path} does not exist")
        result.rejected.append(report)
        return
    result.records.append(record)


def read_task_split(
    task_dir: str | os.PathLike[str], split: str, task: Task | str | None = None
) -> Listfile:
    """Read ``{task_dir}/{split}_listfile.csv`` with stays under ``train/`` or ``test/``.

    ``split`` is ``train``, ``val`` or ``test``; ``task`` defaults to the folder's name
    (``in-hospital-mortality`` or ``phenotyping``).
    """
    task_dir = Path(task_dir)
    if split not in SPLIT_DIRS:
        raise ValueError(f"split must be one of {sorted(SPLIT_DIRS)}, got {split!r}")
    if task is None:
        try:
            task = Task(task_dir.name)
        except ValueError:
            raise ValueError(
                f"{task_dir}: cannot tell the task from the folder name; pass task= one of "
                f"{[t.value for t in Task]}"
            ) from None
    return read_listfile(task_dir / f"{split}_listfile.csv", task, task_dir / SPLIT_DIRS[split])

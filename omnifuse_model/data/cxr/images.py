"""MIMIC-CXR-JPG metadata, MedFuse-style stay <-> image linking, and chest X-ray loading.

Facts followed here are recorded in design/MIMIC_FORMATS.md sections 2 and 3:

* ``mimic-cxr-2.0.0-metadata.csv(.gz)`` has one row per image (``dicom_id``) with its
  ``subject_id``, ``study_id``, ``ViewPosition``, ``StudyDate`` (``YYYYMMDD``) and ``StudyTime``
  (float-like ``HHMMSS.fff``, e.g. ``80556.875`` = 08:05:56).
* MedFuse links an ICU stay to an image by joining on ``subject_id``, building
  ``StudyDateTime = StudyDate + f'{int(float(StudyTime)):06}'`` (format ``%Y%m%d %H%M%S``, the
  fractional seconds dropped), keeping images with ``intime <= StudyDateTime <= end`` (end =
  ``intime + 48 h`` for in-hospital mortality, ``outtime`` for phenotyping), keeping
  ``ViewPosition == 'AP'`` and, per stay, the latest image.
* Images live at ``files/p{first 2 digits of subject}/p{subject}/s{study}/{dicom_id}.jpg``.

Choices of this project where MedFuse is silent or arbitrary:

* MedFuse sorts by the truncated ``StudyDateTime`` only, so ties (two images of one study) are
  broken arbitrarily; here ties go to the later fractional ``StudyTime``, then the larger
  ``study_id``, then the larger ``dicom_id``, so the choice is reproducible.
* A metadata row that cannot be used (missing or malformed id, date or time, an unsafe
  ``dicom_id``, a repeated ``dicom_id``) is rejected with a named, counted reason instead of
  crashing the site; likewise a stays row with an unusable id or time.
* Images are resized straight to 224 x 224 (METHOD.md section 1), not MedFuse's
  Resize(256) + CenterCrop(224).
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

logger = logging.getLogger(__name__)

METADATA_FILENAMES: tuple[str, ...] = (
    "mimic-cxr-2.0.0-metadata.csv",
    "mimic-cxr-2.0.0-metadata.csv.gz",
)
"""Names of the MIMIC-CXR-JPG metadata file, plain or gzipped."""

METADATA_COLUMNS: tuple[str, ...] = (
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
"""The full header of ``mimic-cxr-2.0.0-metadata.csv``."""

REQUIRED_METADATA_COLUMNS: tuple[str, ...] = (
    "dicom_id",
    "subject_id",
    "study_id",
    "ViewPosition",
    "StudyDate",
    "StudyTime",
)
"""The columns linking needs; the others may be absent."""

STAY_COLUMNS: tuple[str, ...] = ("subject_id", "stay_id", "intime", "outtime")
"""Columns of the stays table (``root/all_stays.csv``) that linking reads."""

STAY_COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "subject_id": ("subject_id", "SUBJECT_ID"),
    "stay_id": ("stay_id", "ICUSTAY_ID", "icustay_id", "STAY_ID"),
    "intime": ("intime", "INTIME"),
    "outtime": ("outtime", "OUTTIME"),
}
"""Spellings of each stay column: MedFuse's MIMIC-IV ``all_stays.csv`` is lower-case with
``stay_id``; mimic3-benchmarks' MIMIC-III one is upper-case with ``ICUSTAY_ID``."""

LinkTask = Literal["in-hospital-mortality", "phenotyping"]
LINK_TASKS: tuple[str, ...] = ("in-hospital-mortality", "phenotyping")
IHM_WINDOW = timedelta(hours=48)
"""In-hospital mortality links images taken in ``[intime, intime + 48 h]``."""

DEFAULT_VIEW_POSITIONS: tuple[str, ...] = ("AP",)
"""MedFuse keeps anteroposterior images only."""

IMAGE_SIZE = 224
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# An integer id, tolerating the ".0" a float round-trip through pandas leaves behind.
_INTEGER_ID = re.compile(r"^\d{1,18}(?:\.0*)?$")
_STUDY_DATE = re.compile(r"^\d{8}(?:\.0*)?$")
# dicom_id becomes a file name: letters, digits, '.', '_' and '-' only, never a leading dot.
_DICOM_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


# --------------------------------------------------------------------------- paths


def _check_ids(subject_id: int, study_id: int) -> None:
    if subject_id < 10 or study_id < 0:
        raise ValueError(
            f"subject_id {subject_id!r} / study_id {study_id!r}: expected a subject id of at "
            "least two digits and a non-negative study id"
        )


def cxr_image_path(subject_id: int, study_id: int, dicom_id: str) -> str:
    """Relative path of one MIMIC-CXR-JPG image, POSIX-style.

    ``files/p{first 2 digits of subject}/p{subject}/s{study}/{dicom_id}.jpg``, e.g.
    ``files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg``.
    """
    _check_ids(subject_id, study_id)
    if not _DICOM_ID.match(dicom_id):
        raise ValueError(f"dicom_id {dicom_id!r}: expected letters, digits, '.', '_', '-' only")
    return f"files/p{str(subject_id)[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg"


# --------------------------------------------------------------------------- metadata


@dataclass
class CxrMetadata:
    """Valid rows of a metadata file, one per image, and the rows it rejected.

    ``images`` columns: ``dicom_id`` (str), ``subject_id``, ``study_id`` (int64),
    ``view_position`` (str, '' when blank), ``study_time`` (float, HHMMSS.fff as written),
    ``study_datetime`` (datetime64, MedFuse's truncated StudyDateTime).
    """

    source: str
    images: pd.DataFrame
    rejections: Counter[str] = field(default_factory=Counter)
    rows_read: int = 0


def find_metadata_file(cxr_root: str | os.PathLike[str]) -> Path:
    """The metadata file under a MIMIC-CXR-JPG root, plain ``.csv`` preferred over ``.csv.gz``."""
    root = Path(cxr_root)
    for name in METADATA_FILENAMES:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{root}: expected one of {', '.join(METADATA_FILENAMES)}")


def _integer_ids(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Parse integer ids; returns (ids as int64 with 0 where bad, ok mask)."""
    text = values.astype(str).str.strip()
    ok = text.str.match(_INTEGER_ID)
    ids = pd.Series(0, index=values.index, dtype="int64")
    ids[ok] = text[ok].str.split(".", n=1).str[0].astype("int64")
    return ids, ok


def parse_study_datetime(study_date: str, study_time: str | float) -> datetime:
    """MedFuse's StudyDateTime of one row: ``StudyDate + f'{int(float(StudyTime)):06}'``.

    >>> parse_study_datetime("21800506", "80556.875")
    datetime.datetime(2180, 5, 6, 8, 5, 56)

    Raises ``ValueError`` naming the value when the date is not ``YYYYMMDD`` or the time is
    not a non-negative HHMMSS number that forms a valid clock time.
    """
    date_text = str(study_date).strip()
    if not _STUDY_DATE.match(date_text):
        raise ValueError(f"StudyDate {study_date!r}: expected YYYYMMDD")
    try:
        seconds = float(str(study_time).strip())
    except ValueError:
        raise ValueError(f"StudyTime {study_time!r}: expected a number HHMMSS.fff") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"StudyTime {study_time!r}: expected a non-negative number HHMMSS.fff")
    try:
        return datetime.strptime(f"{date_text[:8]} {int(seconds):06}", "%Y%m%d %H%M%S")
    except ValueError:
        raise ValueError(
            f"StudyDate/StudyTime {study_date!r}/{study_time!r}: not a valid date and time"
        ) from None


def _study_datetimes(frame: pd.DataFrame) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Vectorised :func:`parse_study_datetime`: (datetimes, times, reason per row or '')."""
    raw_dates = frame["StudyDate"].astype(str).str.strip()
    dates = raw_dates.str[:8].where(raw_dates.str.match(_STUDY_DATE), "")
    day = pd.to_datetime(dates, format="%Y%m%d", errors="coerce")
    times = pd.to_numeric(frame["StudyTime"].astype(str).str.strip(), errors="coerce")
    time_ok = times.notna() & np.isfinite(times) & (times >= 0) & (times < 1e6)
    clock = times.where(time_ok, 0).astype("int64").map("{:06d}".format)
    stamps = pd.to_datetime(dates + " " + clock, format="%Y%m%d %H%M%S", errors="coerce")
    reason = pd.Series("", index=frame.index, dtype=object)
    reason[stamps.isna()] = "bad_study_time"  # a valid date with HHMMSS beyond 23:59:59
    reason[~time_ok] = "bad_study_time"
    reason[day.isna()] = "bad_study_date"
    return stamps.astype("datetime64[ns]"), times, reason


def read_cxr_metadata(path: str | os.PathLike[str]) -> CxrMetadata:
    """Read ``mimic-cxr-2.0.0-metadata.csv`` or ``.csv.gz`` as strings and validate each row.

    A missing file or a missing required column raises (naming the file and column). A row
    with an unusable value is rejected and counted under one reason, checked in this order:
    ``missing_dicom_id``, ``bad_dicom_id``, ``bad_subject_id``, ``bad_study_id``,
    ``bad_study_date`` (not a valid ``YYYYMMDD`` date), ``bad_study_time`` (not a
    non-negative number, or not a valid clock time once truncated, e.g. ``236000``),
    ``duplicate_dicom_id`` (every repeat of an otherwise valid row after the first).
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: CXR metadata file not found")
    try:
        frame = pd.read_csv(source, dtype=str, keep_default_na=False, na_filter=False)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{source}: cannot read CXR metadata as CSV: {error}") from error
    missing = [c for c in REQUIRED_METADATA_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {missing}; expected at least "
            f"{list(REQUIRED_METADATA_COLUMNS)}"
        )

    dicom = frame["dicom_id"].str.strip()
    subject, subject_ok = _integer_ids(frame["subject_id"])
    study, study_ok = _integer_ids(frame["study_id"])
    stamps, times, time_reason = _study_datetimes(frame)

    # Later assignments win, so write the reasons from the last-checked to the first-checked.
    reason = time_reason.copy()
    reason[~study_ok] = "bad_study_id"
    reason[~subject_ok | (subject < 10)] = "bad_subject_id"
    reason[~dicom.str.match(_DICOM_ID)] = "bad_dicom_id"
    reason[dicom == ""] = "missing_dicom_id"
    valid = reason == ""
    repeated = valid & dicom.where(valid).duplicated(keep="first")
    reason[repeated] = "duplicate_dicom_id"
    valid = reason == ""

    rejections: Counter[str] = Counter(reason[~valid].tolist())
    if rejections:
        logger.warning(
            "%s: rejected %d of %d metadata rows: %s",
            source,
            sum(rejections.values()),
            len(frame),
            dict(sorted(rejections.items())),
        )
    images = pd.DataFrame(
        {
            "dicom_id": dicom[valid],
            "subject_id": subject[valid],
            "study_id": study[valid],
            "view_position": frame["ViewPosition"][valid].str.strip(),
            "study_time": times[valid].astype(float),
            "study_datetime": stamps[valid],
        }
    ).reset_index(drop=True)
    return CxrMetadata(str(source), images, rejections, rows_read=len(frame))


# --------------------------------------------------------------------------- linking


@dataclass(frozen=True)
class CxrStayImage:
    """The image MedFuse pairs with one ICU stay: the latest in-window image of that stay."""

    stay_id: int
    subject_id: int
    study_id: int
    dicom_id: str
    view_position: str
    study_datetime: datetime
    path: str
    """Relative to the MIMIC-CXR-JPG root, see :func:`cxr_image_path`."""


@dataclass
class CxrLinkResult:
    """Linked stays, rejected stays-table rows, and informational counts.

    ``counts`` keys: ``images`` (valid metadata images), ``images_with_view`` (after the
    ViewPosition filter), ``stays`` (valid stays), ``images_in_window`` (stay-image pairs
    inside the window), ``stays_linked``, ``stays_without_image``. Stays without an image are
    not rejections: they are the unpaired stays of MedFuse's partial setting.
    """

    task: str
    records: list[CxrStayImage]
    rejections: Counter[str] = field(default_factory=Counter)
    counts: dict[str, int] = field(default_factory=dict)

    def by_stay(self) -> dict[int, CxrStayImage]:
        """The records keyed by ``stay_id``."""
        return {record.stay_id: record for record in self.records}


_STAY_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)?$")
EARLIEST_STAY_TIME = pd.Timestamp("1700-01-01")
LATEST_STAY_TIME = pd.Timestamp("2262-01-01")
"""Stay times must lie in ``[1700-01-01, 2262-01-01)``: MIMIC's shifted dates (2100-2214) fit,
and ``intime + 48 h`` stays inside what a nanosecond timestamp can hold."""
STAY_TIME_EXPECTED = (
    "expected an ISO 8601 date-time without a timezone, e.g. 2180-07-23 14:00:00, "
    "between 1700-01-01 and 2261-12-31"
)


def parse_stay_times(values: pd.Series) -> pd.Series:
    """INTIME/OUTTIME values as naive ``datetime64[ns]``, NaT where a value is not usable.

    Usable: ``YYYY-MM-DD[ HH:MM[:SS[.fff]]]`` (``T`` may separate date and time) with no
    timezone suffix (MIMIC times are naive local times), inside
    ``[EARLIEST_STAY_TIME, LATEST_STAY_TIME)``. Never raises for a bad value; raises
    ``ValueError`` for timezone-aware datetimes passed in by a caller.
    """
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        raise ValueError(f"stay times are timezone-aware ({values.dtype}); expected naive times")
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = values
    else:
        text = values.astype(str).str.strip()
        ok = text.str.match(_STAY_TIME)
        parsed = pd.to_datetime(text.where(ok), format="ISO8601", errors="coerce")
    in_range = parsed.notna() & (parsed >= EARLIEST_STAY_TIME) & (parsed < LATEST_STAY_TIME)
    return parsed.where(in_range).astype("datetime64[ns]")


def stay_columns(stays: pd.DataFrame, source: str = "stays table") -> pd.DataFrame:
    """The four linking columns under their canonical names, whichever spelling is present.

    ``attrs`` of the result record the ``source`` and the file's spelling of each column, so
    that problems can name them (:func:`stay_row_problem`).
    """
    picked: dict[str, pd.Series] = {}
    spelling: dict[str, str] = {}
    for column, spellings in STAY_COLUMN_ALIASES.items():
        found = next((name for name in spellings if name in stays.columns), None)
        if found is None:
            raise ValueError(
                f"{source}: no {column} column; expected one of {list(spellings)}, "
                f"found {list(stays.columns)}"
            )
        picked[column] = stays[found]
        spelling[column] = stays.attrs.get("spelling", {}).get(found, found)
    frame = pd.DataFrame(picked)
    frame.attrs = {"source": stays.attrs.get("source", source), "spelling": spelling}
    return frame


def stay_row_problem(stays: pd.DataFrame, index: int, column: str, expected: str) -> str:
    """``'<file> line N column INTIME: 'value' ...'`` for one bad cell of a stays table
    (line numbers count the header as line 1; ``index`` is the row's position)."""
    source = stays.attrs.get("source", "stays table")
    name = stays.attrs.get("spelling", {}).get(column, column)
    value = stays[column].iloc[index]
    return f"{source} line {index + 2} column {name}: {value!r}: {expected}"


def read_stays(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read ``root/all_stays.csv`` (MIMIC-III or MIMIC-IV flavour) as strings, four columns.

    Raises ``FileNotFoundError`` or ``ValueError`` naming the file when it is missing, not a
    regular file, empty, not UTF-8 or not CSV; bad values are left for the linking to count.
    """
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"{source}: stays table not found")
    if not source.is_file():
        raise ValueError(f"{source}: stays table is not a regular file")
    try:
        frame = pd.read_csv(
            source, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig"
        )
    except (OSError, ValueError) as error:  # EmptyDataError, ParserError, UnicodeDecodeError
        raise ValueError(f"{source}: cannot read the stays table as UTF-8 CSV: {error}") from None
    frame.attrs["source"] = str(source)
    return stay_columns(frame, str(source))


def _positional(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` indexed by row position, keeping its ``attrs``."""
    attrs = table.attrs
    table = table.reset_index(drop=True)
    table.attrs = attrs
    return table


def _stay_reasons(stays: pd.DataFrame, task: str | None) -> pd.DataFrame:
    """Parsed ids and times of a canonical stays table, and each row's first problem ('' if
    none): bad_subject_id, bad_stay_id, bad_intime, bad_outtime (phenotyping only)."""
    subject, subject_ok = _integer_ids(stays["subject_id"])
    stay, stay_ok = _integer_ids(stays["stay_id"])
    intime = parse_stay_times(stays["intime"])
    outtime = parse_stay_times(stays["outtime"])
    reason = pd.Series("", index=stays.index, dtype=object)
    if task == "phenotyping":
        reason[outtime.isna()] = "bad_outtime"
    reason[intime.isna()] = "bad_intime"
    reason[~stay_ok] = "bad_stay_id"
    reason[~subject_ok] = "bad_subject_id"
    return pd.DataFrame(
        {
            "subject_id": subject,
            "subject_ok": subject_ok,
            "stay_id": stay,
            "stay_ok": stay_ok,
            "intime": intime,
            "outtime": outtime,
            "reason": reason,
        }
    )


def parse_stays(stays: pd.DataFrame) -> pd.DataFrame:
    """Per row of a stays table (either spelling), in order: ``subject_id``, ``stay_id``
    (int64, 0 where bad), ``subject_ok``, ``stay_ok``, ``intime``, ``outtime`` (NaT where
    bad, see :func:`parse_stay_times`), and ``problem``: '' or a detail naming the file, line,
    column and value of the row's first bad id or INTIME. Index: the row's position."""
    table = _positional(stay_columns(stays))
    parsed = _stay_reasons(table, None)
    problem = pd.Series("", index=table.index, dtype=object)
    checks = (  # the first bad one is named: the subject, then INTIME, then the stay id
        (~parsed["subject_ok"], "subject_id", "expected an integer subject id"),
        (parsed["intime"].isna(), "intime", STAY_TIME_EXPECTED),
        (~parsed["stay_ok"], "stay_id", "expected an integer stay id"),
    )
    for bad, column, expected in reversed(checks):
        for i in np.flatnonzero(bad.to_numpy()):
            problem.iloc[i] = stay_row_problem(table, int(i), column, expected)
    parsed["problem"] = problem
    return parsed.drop(columns="reason")


def _valid_stays(stays: pd.DataFrame, task: str) -> tuple[pd.DataFrame, Counter[str]]:
    """Parse the stays table; reasons: bad_subject_id, bad_stay_id, bad_intime,
    bad_outtime (phenotyping only), duplicate_stay_id."""
    stays = _positional(stay_columns(stays))
    parsed = _stay_reasons(stays, task)
    reason = parsed["reason"]
    valid = reason == ""
    reason[valid & parsed["stay_id"].where(valid).duplicated(keep="first")] = "duplicate_stay_id"
    valid = reason == ""
    for i in np.flatnonzero((reason == "bad_intime").to_numpy())[:3]:
        logger.warning("%s", stay_row_problem(stays, int(i), "intime", STAY_TIME_EXPECTED))
    columns = ["subject_id", "stay_id", "intime", "outtime"]
    return parsed.loc[valid, columns].reset_index(drop=True), Counter(reason[~valid].tolist())


def link_stays_to_images(
    metadata: CxrMetadata,
    stays: pd.DataFrame,
    task: LinkTask,
    view_positions: Sequence[str] | None = DEFAULT_VIEW_POSITIONS,
) -> CxrLinkResult:
    """Pair each ICU stay with its latest in-window image, as MedFuse's ``loadmetadata`` does.

    ``stays`` holds ``subject_id, stay_id, intime, outtime`` (or the MIMIC-III spellings
    ``SUBJECT_ID, ICUSTAY_ID, INTIME, OUTTIME``; strings such as ``2180-07-23 14:00:00`` or
    datetimes), e.g. from :func:`read_stays`. The window is ``[intime, intime + 48 h]`` for
    ``'in-hospital-mortality'`` and ``[intime, outtime]`` for ``'phenotyping'``, both ends
    inclusive, compared with the truncated StudyDateTime. ``view_positions=None`` keeps every
    view. Returns one :class:`CxrStayImage` per linked stay, sorted by ``stay_id``.
    """
    if task not in LINK_TASKS:
        raise ValueError(f"task {task!r}: expected one of {list(LINK_TASKS)}")
    valid_stays, rejections = _valid_stays(stays, task)
    if rejections:
        logger.warning(
            "%s: rejected %d of %d rows: %s",
            stays.attrs.get("source", "stays table"),
            sum(rejections.values()),
            len(stays),
            dict(sorted(rejections.items())),
        )
    images = metadata.images
    if view_positions is not None:
        images = images[images["view_position"].isin(tuple(view_positions))]
    pairs = images.merge(valid_stays, how="inner", on="subject_id")
    end = pairs["intime"] + IHM_WINDOW if task == "in-hospital-mortality" else pairs["outtime"]
    in_window = (pairs["intime"] <= pairs["study_datetime"]) & (pairs["study_datetime"] <= end)
    pairs = pairs[in_window]
    order = ["stay_id", "study_datetime", "study_time", "study_id", "dicom_id"]
    latest = pairs.sort_values(order, kind="stable").drop_duplicates("stay_id", keep="last")
    records = [
        CxrStayImage(
            stay_id=int(row.stay_id),
            subject_id=int(row.subject_id),
            study_id=int(row.study_id),
            dicom_id=str(row.dicom_id),
            view_position=str(row.view_position),
            study_datetime=pd.Timestamp(row.study_datetime).to_pydatetime(),
            path=cxr_image_path(int(row.subject_id), int(row.study_id), str(row.dicom_id)),
        )
        for row in latest.itertuples(index=False)
    ]
    counts = {
        "images": len(metadata.images),
        "images_with_view": len(images),
        "stays": len(valid_stays),
        "images_in_window": len(pairs),
        "stays_linked": len(records),
        "stays_without_image": len(valid_stays) - len(records),
    }
    return CxrLinkResult(task, records, rejections, counts)


# --------------------------------------------------------------------------- images

ImageRejection = Literal[
    "missing_image", "unreadable_image", "unsupported_image", "oversized_image"
]

MAX_IMAGE_PIXELS = 50_000_000
"""Largest image (width x height, from the file's header) that is decoded; a larger one is
rejected as ``oversized_image`` before any pixel is allocated. MIMIC-CXR-JPG's largest images
are about 4300 x 3500 (15 MP); 50 MP (about 7000 x 7000, 200 MB as float32) leaves room for
other scanners while a crafted header (a "decompression bomb" declaring, say, 30000 x 30000)
costs nothing. Pillow's own bomb check (``Image.MAX_IMAGE_PIXELS``, a warning above 89 MP and
an error above 179 MP) fires while the header is read; both are caught and reported the same
way."""


class ImageReadError(Exception):
    """An image that cannot be turned into a tensor; callers count ``reason`` as a rejection.

    ``reason`` is one of ``missing_image``, ``unreadable_image`` (corrupt, truncated or not
    an image), ``unsupported_image`` (a pixel mode or value range this loader cannot map),
    ``oversized_image`` (more than :data:`MAX_IMAGE_PIXELS` pixels, or a decompression bomb).
    """

    def __init__(self, path: str | os.PathLike[str], reason: ImageRejection, detail: str) -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {reason}: {detail}")


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_SIXTEEN_BIT_MAX = 65535.0


def _unit_pixels(image: Image.Image, path: str) -> np.ndarray:
    """Pixels as float32 ``[H, W, C]`` (C = 1 or 3) scaled to ``[0, 1]`` by the format's range.

    8-bit modes divide by 255; 16-bit modes (``I;16*``, and ``I`` holding values in
    ``[0, 65535]``, which is how Pillow may open a 16-bit PNG) divide by 65535. Converting
    16-bit data through Pillow's ``L`` mode would clip it at 255, hence the explicit paths.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image).astype(np.float32)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low < 0 or high > _SIXTEEN_BIT_MAX:
            raise ImageReadError(
                path,
                "unsupported_image",
                f"mode {mode} values span [{low:g}, {high:g}], expected 16-bit [0, 65535]",
            )
        return values[..., None] / _SIXTEEN_BIT_MAX
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise ImageReadError(
                path, "unsupported_image", "mode F values outside [0, 1] or not finite"
            )
        return values[..., None]
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(image.convert("L"), dtype=np.float32)[..., None] / 255.0
    try:
        rgb = image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ImageReadError(path, "unsupported_image", f"mode {mode}: {error}") from error
    return np.asarray(rgb, dtype=np.float32) / 255.0


@contextmanager
def open_cxr_image(path: str | os.PathLike[str]) -> Iterator[Image.Image]:
    """Open an image for reading its header, refusing bombs and oversized images.

    Only the header is read (no pixels). Raises :class:`ImageReadError`: ``missing_image``,
    ``oversized_image`` (width x height above :data:`MAX_IMAGE_PIXELS`, or Pillow's
    ``DecompressionBombError``/``Warning``), ``unreadable_image`` (not an image, a truncated
    or corrupt header; also any error while the caller decodes inside the ``with`` block).
    """
    source = str(path)
    if not os.path.isfile(source):
        raise ImageReadError(source, "missing_image", "no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageReadError(source, "oversized_image", str(error)) from error
    except Exception as error:  # Pillow's plugins raise many types for a bad file
        raise ImageReadError(source, "unreadable_image", f"{type(error).__name__}: {error}") from (
            error
        )
    with image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ImageReadError(
                source,
                "oversized_image",
                f"{width} x {height} = {width * height} pixels, more than MAX_IMAGE_PIXELS "
                f"{MAX_IMAGE_PIXELS}",
            )
        if width == 0 or height == 0:
            raise ImageReadError(source, "unreadable_image", "image has no pixels")
        try:
            yield image
        except ImageReadError:
            raise
        except Exception as error:  # decoding: truncated data, corrupt stream, ...
            raise ImageReadError(
                source, "unreadable_image", f"{type(error).__name__}: {error}"
            ) from error


def load_cxr_image(path: str | os.PathLike[str], size: int = IMAGE_SIZE) -> Tensor:
    """Load a chest X-ray as the ResNet input: float32 ``[3, size, size]``, ImageNet-normalised.

    Grayscale (``L``, ``1``, ``LA``), colour (``RGB`` and anything Pillow converts to it) and
    16-bit (``I;16``, ``I``) images up to :data:`MAX_IMAGE_PIXELS` are scaled to ``[0, 1]``,
    resized to ``size x size`` (bilinear, antialiased, aspect ratio not kept), replicated to
    3 channels when single-channel, then normalised per channel with ImageNet mean and std.

    Raises :class:`ImageReadError` (``missing_image``, ``unreadable_image``,
    ``unsupported_image`` or ``oversized_image``) with the path.
    """
    source = str(path)
    with open_cxr_image(source) as image:
        image.load()
        pixels = _unit_pixels(image, source)
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ImageReadError(source, "unreadable_image", "image has no pixels")
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0)
    tensor = F.interpolate(
        tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )[0]
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return ((tensor - mean) / std).contiguous()

"""From a site's MIMIC-format files to one record per listed stay (ARCHITECTURE.md, "Data flow").

:func:`ingest_site` reads the site's ``{train,val,test}_listfile.csv``, rejects every row of a
subject listed in more than one split (``stay_in_two_splits`` / ``subject_in_two_splits``,
naming the splits: such a patient leaks between training and evaluation) and, for each
modality the site holds:

* ``ehr``: discretises the episode with :func:`discretize_episode_tolerant` at ``timestep``
  over the **first 48 h for both tasks** (``end = 48.0``), so that the EHR input is a fixed
  ``[24, 76]`` at timestep 2 (METHOD.md section 1). The benchmark's phenotyping uses the whole
  stay (``end = period_length``); here the phenotype labels still describe the whole stay but
  the model sees its first 48 h, as for in-hospital mortality;
* ``cxr``: links the stay to its chest X-ray as MedFuse does
  (:func:`~omnifuse_model.data.cxr.images.link_stays_to_images`: latest ``AP`` image in
  ``[intime, intime + 48 h]`` for in-hospital mortality, ``[intime, outtime]`` for
  phenotyping), and checks that the file exists and has a readable image header. The full
  decode happens in :func:`~omnifuse_model.data.features.cache.prepare_site`, which records a decode
  failure (e.g. a truncated JPEG) as a rejection in the same report;
* ``rep``: reads the report of the linked image's study,
  ``reports_dir/files/pXX/pSUBJECT/sSTUDY.txt`` (FINDINGS, else IMPRESSION, else the last
  paragraph; :func:`~omnifuse_model.data.reports.sections.read_report`).

The stay id that links a stay to images is the listfile's ``stay_id`` column (MedFuse
listfiles) when present; otherwise it is looked up in ``stays_csv`` by subject and episode
number, where episode N is the 1-based position of the stay among the subject's stays sorted
by INTIME (the mimic3-benchmarks numbering; ties keep file order). A subject with a row whose
INTIME does not parse cannot be numbered: its stays' images and reports are rejected as
``bad_intime`` (naming the row), never linked to a neighbouring stay; an episode whose row has
a bad stay id is rejected as ``bad_stay_id``.

Listfiles are read without checking that episode files exist, so that a missing episode file
is a rejection of the stay's EHR, not of the stay. See
:mod:`~omnifuse_model.data.ingest_report` for how outcomes are accounted for.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from rich.progress import Progress

from omnifuse_model.data.cxr.images import (
    CxrStayImage,
    ImageReadError,
    find_metadata_file,
    link_stays_to_images,
    open_cxr_image,
    parse_stays,
    read_cxr_metadata,
    read_stays,
)
from omnifuse_model.data.ehr.discretizer import plausible_range_text
from omnifuse_model.data.ehr.episodes import (
    EpisodeReport,
    RejectReason,
    discretize_episode_tolerant,
)
from omnifuse_model.data.ehr.listfiles import (
    SPLIT_DIRS,
    Listfile,
    StayRecord,
    Task,
    read_listfile,
)
from omnifuse_model.data.ingest_report import (
    SPLITS,
    IngestedStay,
    IngestReport,
    ListfileRejection,
    ModalityOutcome,
    ModalityStatus,
    build_ingest_report,
)
from omnifuse_model.data.reports.sections import ReportRejected, read_report, report_path
from omnifuse_model.site_config import MIMIC_MODALITIES, SiteConfig

logger = logging.getLogger(__name__)

EHR_WINDOW_HOURS = 48.0
"""Both tasks discretise the first 48 h of the stay (a fixed [24, 76] input at timestep 2)."""


class EpisodeStore(Protocol):
    """A cache of discretised episodes keyed by the sha256 of the episode CSV's bytes."""

    def get(self, digest: str, path: Path) -> tuple[np.ndarray | None, EpisodeReport] | None:
        """The cached (array or None, report) for this content, reported at ``path``."""
        ...

    def put(self, digest: str, array: np.ndarray | None, report: EpisodeReport) -> None:
        """Remember the outcome of discretising this content."""
        ...


@dataclass
class IngestResult:
    """Every listed stay of a site after ingest, and the rows the listfiles rejected."""

    site: str
    task: str
    timestep: float
    window_hours: float
    modalities: tuple[str, ...]
    stays: list[IngestedStay]
    listfile_rejections: list[ListfileRejection] = field(default_factory=list)
    linking: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str, accepted_only: bool = True) -> list[IngestedStay]:
        """The stays of one split (by default only those with a usable modality)."""
        return [s for s in self.stays if s.split == name and (s.accepted or not accepted_only)]

    def reject_modality(self, stay: IngestedStay, modality: str, reason: str, detail: str) -> None:
        """Turn a usable modality of ``stay`` into a rejection (e.g. an image that fails to
        decode) and drop its input; the stay is rejected when nothing usable is left."""
        if modality not in stay.outcomes:
            raise ValueError(f"stay {stay.stay}: modality {modality!r} is not held by the site")
        stay.outcomes[modality] = ModalityOutcome("rejected", reason, detail)
        if modality == "ehr":
            stay.ehr = None
        elif modality == "cxr":
            stay.image_path = None
        elif modality == "rep":
            stay.report_text = stay.report_section = None

    def report(self) -> IngestReport:
        """The ingest report of the stays' current outcomes."""
        return build_ingest_report(
            self.site,
            self.task,
            self.timestep,
            self.window_hours,
            self.modalities,
            self.stays,
            self.listfile_rejections,
            self.linking,
        )


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class EpisodeStayIds:
    """``(subject_id, episode N) -> stay_id`` from a stays table, and why some are unknown.

    ``bad_subjects`` maps a subject with a row whose INTIME does not parse to that row's
    problem: the row's place among the subject's stays is unknown, so none of the subject's
    episodes can be numbered (numbering the others would shift them onto the wrong stays).
    ``bad_episodes`` maps an episode whose row has a bad stay id to that row's problem.
    """

    ids: dict[tuple[int, int], int] = field(default_factory=dict)
    bad_subjects: dict[int, str] = field(default_factory=dict)
    bad_episodes: dict[tuple[int, int], str] = field(default_factory=dict)

    def problem(self, subject_id: int, episode: int) -> tuple[str, str] | None:
        """``(reason, detail)`` when this episode's stay id is known to be unusable."""
        where = f"subject {subject_id} episode {episode}"
        if subject_id in self.bad_subjects:
            detail = self.bad_subjects[subject_id]
            return "bad_intime", f"{where}: {detail}; the subject's episodes cannot be numbered"
        if (subject_id, episode) in self.bad_episodes:
            return "bad_stay_id", f"{where}: {self.bad_episodes[subject_id, episode]}"
        return None


def episode_stay_ids(stays: pd.DataFrame) -> EpisodeStayIds:
    """Number each subject's stays by INTIME (see the module docstring).

    Times are parsed as the linking parses them
    (:func:`~omnifuse_model.data.cxr.images.parse_stay_times`). A subject with an unparseable
    INTIME gets no episode numbers at all; rows whose subject id does not parse cannot be
    attributed and are counted by the linking (``bad_subject_id``).
    """
    parsed = parse_stays(stays)
    known = parsed[parsed["subject_ok"]]
    result = EpisodeStayIds()
    for row in known[known["intime"].isna()].itertuples(index=False):
        result.bad_subjects.setdefault(int(row.subject_id), str(row.problem))
    frame = known[~known["subject_id"].isin(list(result.bad_subjects))]
    frame = frame.sort_values(["subject_id", "intime"], kind="stable")
    frame = frame.assign(episode=frame.groupby("subject_id").cumcount() + 1)
    for row in frame.itertuples(index=False):
        key = (int(row.subject_id), int(row.episode))
        if row.stay_ok:
            result.ids[key] = int(row.stay_id)
        else:
            result.bad_episodes[key] = str(row.problem)
    return result


def _check_site(site: SiteConfig) -> tuple[Path, set[str]]:
    data = site.data
    held = set(site.modalities)
    unknown = held - set(MIMIC_MODALITIES)
    if unknown:
        raise ValueError(
            f"site '{site.name}': modalities {sorted(unknown)} are not MIMIC modalities "
            f"{list(MIMIC_MODALITIES)}"
        )
    if data.benchmark_dir is None:
        raise ValueError(f"site '{site.name}': data.benchmark_dir is not set")
    for modality, name in (("cxr", "cxr_dir"), ("rep", "reports_dir")):
        if modality in held and getattr(data, name) is None:
            raise ValueError(f"site '{site.name}' holds '{modality}' but data.{name} is not set")
    if held & {"cxr", "rep"}:
        if data.stays_csv is None:
            raise ValueError(
                f"site '{site.name}': data.stays_csv (root/all_stays.csv) is needed to link "
                "images and reports to stays"
            )
        if data.cxr_metadata is None and data.cxr_dir is None:
            raise ValueError(
                f"site '{site.name}': data.cxr_metadata (or data.cxr_dir holding it) is needed "
                "to link reports to stays"
            )
    return Path(data.benchmark_dir), held


def _discretise(
    record: StayRecord, timestep: float, store: EpisodeStore | None
) -> tuple[np.ndarray | None, EpisodeReport, str | None]:
    digest = file_sha256(record.path) if record.path.is_file() else None
    if store is not None and digest is not None:
        cached = store.get(digest, record.path)
        if cached is not None:
            return cached[0], cached[1], digest
    array, _, report = discretize_episode_tolerant(record.path, timestep, end=EHR_WINDOW_HOURS)
    if store is not None and digest is not None:
        store.put(digest, array, report)
    return array, report, digest


def _ehr_outcome(array: np.ndarray | None, report: EpisodeReport) -> ModalityOutcome:
    if report.reject_reason is not None:
        return ModalityOutcome("rejected", str(report.reject_reason), report.detail)
    if report.rows_used == 0:
        return ModalityOutcome(
            "rejected", "empty_window", f"{report.path}: no rows in the first 48 h"
        )
    if report.repairs:
        repairs = {str(k): v for k, v in sorted(report.repairs.items())}
        detail = report.path
        if report.implausible:
            detail += ": implausible values read as not charted: " + ", ".join(
                f"{channel} x{n} (expected {plausible_range_text(channel)})"
                for channel, n in sorted(report.implausible.items())
            )
        return ModalityOutcome("repaired", ",".join(repairs), detail, repairs)
    return ModalityOutcome("used")


def _image_outcome(path: Path) -> ModalityOutcome:
    """Cheap check of the header (size, bombs); decoding comes later."""
    try:
        with open_cxr_image(path):
            pass
    except ImageReadError as error:
        return ModalityOutcome("rejected", error.reason, f"{path}: {error.detail}")
    return ModalityOutcome("used")


class _Linker:
    """Stay id resolution and the stay -> image table."""

    def __init__(self, site: SiteConfig, held: set[str]) -> None:
        self.enabled = bool(held & {"cxr", "rep"})
        self.images: dict[int, CxrStayImage] = {}
        self.stay_ids = EpisodeStayIds()
        self.info: dict[str, Any] = {}
        if not self.enabled:
            return
        data = site.data
        metadata_path = data.cxr_metadata or find_metadata_file(data.cxr_dir)
        metadata = read_cxr_metadata(metadata_path)
        stays = read_stays(data.stays_csv)
        link = link_stays_to_images(metadata, stays, site.task)
        self.images = link.by_stay()
        self.stay_ids = episode_stay_ids(stays)
        self.info = {
            "cxr_metadata": str(metadata_path),
            "stays_csv": str(data.stays_csv),
            "metadata_rows": metadata.rows_read,
            "metadata_rejected_by_reason": dict(sorted(metadata.rejections.items())),
            "stays_rejected_by_reason": dict(sorted(link.rejections.items())),
            **link.counts,
        }

    def stay_id(self, record: StayRecord) -> int | None:
        if record.stay_id is not None:
            return record.stay_id
        return self.stay_ids.ids.get((record.subject_id, record.episode))

    def problem(self, record: StayRecord) -> tuple[str, str] | None:
        """Why the stays table cannot give this stay's id, when it is a data error."""
        if record.stay_id is not None:
            return None
        return self.stay_ids.problem(record.subject_id, record.episode)


def _link_modalities(
    stay: IngestedStay, record: StayRecord, site: SiteConfig, held: set[str], linker: _Linker
) -> None:
    image = linker.images.get(stay.stay_id) if stay.stay_id is not None else None
    status: ModalityStatus = "missing"
    if stay.stay_id is None:
        why = "stay_id_unknown"
        detail = f"subject {record.subject_id} episode {record.episode} not in data.stays_csv"
        if (problem := linker.problem(record)) is not None:
            status, (why, detail) = "rejected", problem
    else:
        why, detail = "no_image_in_window", f"stay_id {stay.stay_id}"
    if "cxr" in held:
        if image is None:
            stay.outcomes["cxr"] = ModalityOutcome(status, why, detail)
        else:
            path = Path(site.data.cxr_dir) / image.path
            stay.outcomes["cxr"] = _image_outcome(path)
            stay.image_path = path if stay.outcomes["cxr"].usable else None
    if image is not None:
        stay.study_id = image.study_id
    if "rep" in held:
        if image is None:
            stay.outcomes["rep"] = ModalityOutcome(status, why, detail)
            return
        path = Path(site.data.reports_dir) / report_path(image.subject_id, image.study_id)
        if not path.is_file():
            stay.outcomes["rep"] = ModalityOutcome("missing", "no_report_file", str(path))
            return
        try:
            text = read_report(path)
        except ReportRejected as error:
            stay.outcomes["rep"] = ModalityOutcome("rejected", error.reason, str(error))
            return
        stay.outcomes["rep"] = ModalityOutcome("used")
        stay.report_text, stay.report_section = text.text, text.section


def split_leaks(listfiles: dict[str, Listfile]) -> dict[tuple[str, str], tuple[str, str]]:
    """``(split, stay) -> (reason, detail)`` for every row whose subject is in two splits.

    A subject listed in more than one split leaks between training and evaluation (the same
    patient, possibly the same stay with different labels), so all of its rows in every split
    are rejected: ``stay_in_two_splits`` when that very stay is listed in another split,
    ``subject_in_two_splits`` otherwise; the detail names the splits.
    """
    subject_splits: dict[int, set[str]] = {}
    stay_splits: dict[str, list[str]] = {}
    for split, listfile in listfiles.items():
        for record in listfile.records:
            subject_splits.setdefault(record.subject_id, set()).add(split)
            stay_splits.setdefault(record.stay, []).append(split)
    leaks: dict[tuple[str, str], tuple[str, str]] = {}
    for split, listfile in listfiles.items():
        for record in listfile.records:
            splits = [name for name in listfiles if name in subject_splits[record.subject_id]]
            if len(splits) < 2:
                continue
            same_stay = [name for name in stay_splits[record.stay] if name != split]
            if same_stay:
                reason = RejectReason.STAY_IN_TWO_SPLITS
                detail = f"{record.stay} is listed in {split} and {' and '.join(same_stay)}"
            else:
                reason = RejectReason.SUBJECT_IN_TWO_SPLITS
                detail = f"subject {record.subject_id} has stays in {' and '.join(splits)}"
            leaks[(split, record.stay)] = (str(reason), detail + " (patient-level leak)")
    return leaks


def _read_listfiles(site: SiteConfig, benchmark_dir: Path, task: Task) -> dict[str, Listfile]:
    listfiles = {}
    for split in SPLITS:
        path = benchmark_dir / f"{split}_listfile.csv"
        if not path.exists():
            raise FileNotFoundError(f"site '{site.name}': listfile {path} not found")
        data_dir = benchmark_dir / SPLIT_DIRS[split]
        listfiles[split] = read_listfile(path, task, data_dir, check_files=False)
    return listfiles


@dataclass
class _StayReader:
    """What ingesting one listed stay needs besides the record."""

    site: SiteConfig
    timestep: float
    held: set[str]
    order: tuple[str, ...]
    linker: _Linker
    episode_store: EpisodeStore | None

    def read(self, split: str, record: StayRecord) -> IngestedStay:
        stay = IngestedStay(
            split=split,
            stay=record.stay,
            subject_id=record.subject_id,
            episode=record.episode,
            stay_id=self.linker.stay_id(record),
            labels=record.labels,
        )
        if "ehr" in self.held:
            array, report, stay.ehr_digest = _discretise(record, self.timestep, self.episode_store)
            stay.outcomes["ehr"] = _ehr_outcome(array, report)
            stay.ehr = array if stay.outcomes["ehr"].usable else None
            stay.implausible = dict(report.implausible)
        if self.linker.enabled:
            _link_modalities(stay, record, self.site, self.held, self.linker)
        stay.outcomes = {name: stay.outcomes[name] for name in self.order}
        return stay


def ingest_site(
    site: SiteConfig,
    timestep: float = 2.0,
    *,
    episode_store: EpisodeStore | None = None,
    progress: Progress | None = None,
) -> IngestResult:
    """Read, link and validate every listed stay of ``site`` (see the module docstring).

    ``episode_store`` (optional) caches discretised episodes by content, so a second ingest
    reuses them; ``progress`` (optional) is a rich Progress to add a bar to. Raises
    ``ValueError`` naming the field when the site config lacks a path its modalities need,
    ``FileNotFoundError``/``OSError`` when a listfile or linking table cannot be read; bad data
    inside the files never raises, it becomes counted outcomes. Rows of a subject listed in
    two splits are rejected (:func:`split_leaks`).
    """
    benchmark_dir, held = _check_site(site)
    task = Task(site.task)
    order = tuple(name for name in MIMIC_MODALITIES if name in held)
    listfiles = _read_listfiles(site, benchmark_dir, task)
    linker = _Linker(site, held)
    reader = _StayReader(site, timestep, held, order, linker, episode_store)
    leaks = split_leaks(listfiles)
    total = sum(len(listfile.records) for listfile in listfiles.values())
    bar = progress.add_task(f"ingest {site.name}", total=total) if progress else None
    stays: list[IngestedStay] = []
    rejections: list[ListfileRejection] = []
    for split, listfile in listfiles.items():
        for report in listfile.rejected:
            name, reason = Path(report.path).name, str(report.reject_reason)
            rejections.append(ListfileRejection(split, name, reason, report.detail))
        for record in listfile.records:
            if (split, record.stay) in leaks:
                rejections.append(ListfileRejection(split, record.stay, *leaks[split, record.stay]))
            else:
                stays.append(reader.read(split, record))
            if progress is not None and bar is not None:
                progress.advance(bar)
    with_ids = any(listfile.has_stay_id for listfile in listfiles.values())
    linking = {"stay_id_source": "listfile" if with_ids else "stays_csv", **linker.info}
    result = IngestResult(
        site.name, str(task), timestep, EHR_WINDOW_HOURS, order, stays, rejections, linking
    )
    accepted = sum(s.accepted for s in stays)
    logger.info(
        "site %s: %d stays listed, %d accepted, %d rejected",
        site.name,
        len(stays) + len(rejections),
        accepted,
        len(stays) - accepted + len(rejections),
    )
    return result

"""Synthetic MIMIC-format data: the real on-disk layouts, written from a planted latent risk.

:func:`write_synthetic_mimic` writes, under ``out_dir`` (design/MIMIC_FORMATS.md):

* ``root/all_stays.csv`` and ``root/{train,test}/{SUBJECT_ID}/stays.csv`` +
  ``episode{N}_timeseries.csv`` (mimic3-benchmarks root, split by subject);
* ``in-hospital-mortality/`` and ``phenotyping/``: ``{train,test}/`` episode files and
  ``listfile.csv``, plus ``{train,val,test}_listfile.csv`` (validation files live in ``train/``);
* ``mimic-cxr-jpg/files/pXX/pSUBJECT/sSTUDY/DICOM.jpg`` + ``mimic-cxr-2.0.0-metadata.csv``;
* ``mimic-cxr-reports/files/pXX/pSUBJECT/sSTUDY.txt``;
* ``synthetic_stays.csv`` and ``synthetic_studies.csv``: the ground truth per stay and per
  study (:mod:`.truth`: labels, latent risk, acuity, hospital, planted findings, the image and
  report MedFuse's linking rules should find), and ``synthetic_summary.json``: config and
  summary.

Labels (in-hospital mortality, 25 phenotypes) and every modality derive from one latent risk per
stay (:mod:`~simulation.synthetic_mimic.cohort`); per-modality ``signal``/``noise``/
``nonlinearity`` set how much each modality shows of it and how bent; each study's image and
report render the same planted findings; each subject's hospital sets its image noise and
report length. The same config gives byte-identical files.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from omnifuse_model.data.ehr.listfiles import PHENOTYPE_LABELS
from simulation.synthetic_mimic import ehr as ehr_writer
from simulation.synthetic_mimic.cohort import (
    IHM_HOURS,
    StayPlan,
    StudyPlan,
    SubjectPlan,
    plan_cohort,
)
from simulation.synthetic_mimic.config import (
    MESSY_KINDS,
    MessyFile,
    MessyKind,
    ModalityCounts,
    ModalitySignal,
    SplitCounts,
    SyntheticMimicConfig,
    SyntheticMimicSummary,
)
from simulation.synthetic_mimic.cxr import (
    METADATA_HEADER,
    PIXEL_NOISE,
    encode_jpeg,
    image_path,
    metadata_rows,
    render_cxr,
)
from simulation.synthetic_mimic.text import render_report, without_leading_spaces
from simulation.synthetic_mimic.truth import (
    STUDIES_FILE,
    STUDIES_HEADER,
    TRUTH_FILE,
    TRUTH_HEADER,
    stay_rows,
    study_rows,
)

__all__ = [
    "MESSY_KINDS",
    "MessyFile",
    "MessyKind",
    "ModalityCounts",
    "ModalitySignal",
    "SplitCounts",
    "SyntheticMimicConfig",
    "SyntheticMimicSummary",
    "write_synthetic_mimic",
]

STAYS_HEADER: tuple[str, ...] = (
    "SUBJECT_ID", "HADM_ID", "ICUSTAY_ID", "LAST_CAREUNIT", "DBSOURCE", "INTIME", "OUTTIME",
    "LOS", "ADMITTIME", "DISCHTIME", "DEATHTIME", "ETHNICITY", "DIAGNOSIS", "GENDER", "DOB",
    "DOD", "AGE", "MORTALITY_INUNIT", "MORTALITY", "MORTALITY_INHOSPITAL",
)  # fmt: skip
"""Exact header of ``root/all_stays.csv`` and of each subject's ``stays.csv``."""

IHM_DIR, PHENO_DIR = "in-hospital-mortality", "phenotyping"
CXR_DIR, REPORTS_DIR = "mimic-cxr-jpg", "mimic-cxr-reports"
METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv"
SUMMARY_FILE = "synthetic_summary.json"
SPLITS = ("train", "val", "test")
_TIME = "%Y-%m-%d %H:%M:%S"


def _time(t: datetime | None) -> str:
    return "" if t is None else t.strftime(_TIME)


def _between(t: datetime | None, start: datetime, end: datetime) -> bool:
    return t is not None and start <= t <= end


def stays_row(subject: SubjectPlan, stay: StayPlan) -> list[str]:
    """The stay's all_stays.csv row; mortality flags computed as mimic3-benchmarks does."""
    dod, death = subject.dod, stay.deathtime
    in_unit = _between(dod, stay.intime, stay.outtime) or _between(death, stay.intime, stay.outtime)
    in_hospital = _between(dod, stay.admittime, stay.dischtime) or _between(
        death, stay.admittime, stay.dischtime
    )
    if int(in_hospital) != stay.mortality:  # pragma: no cover - a planner bug
        raise RuntimeError(f"stay {stay.stay_id}: planned mortality {stay.mortality} inconsistent")
    age = (stay.intime - subject.dob).total_seconds() / 3600.0 / 24.0 / 365.0
    return [
        str(stay.subject_id), str(stay.hadm_id), str(stay.stay_id), stay.careunit, stay.dbsource,
        _time(stay.intime), _time(stay.outtime), repr(stay.los), _time(stay.admittime),
        _time(stay.dischtime), _time(death), subject.ethnicity, stay.diagnosis, subject.gender,
        _time(subject.dob), _time(dod), repr(age), str(int(in_unit)), str(int(in_hospital)),
        str(int(in_hospital)),
    ]  # fmt: skip


class _Writer:
    """Writes files under ``out_dir`` and keeps what the listfiles and the summary need."""

    def __init__(self, config: SyntheticMimicConfig, out_dir: Path) -> None:
        self.config, self.out = config, out_dir
        self._dirs: set[Path] = set()
        self._messy_rng = np.random.default_rng([config.seed, 5])
        self.messy: list[MessyFile] = []
        self.ihm: list[tuple[str, str, int]] = []  # (split, stay, y)
        self.pheno: list[tuple[str, str, float, tuple[int, ...]]] = []
        self.counts = {"ehr_episodes": 0, "cxr_studies": 0, "cxr_images": 0, "reports": 0}
        self.hospitals = {hospital.name: hospital for hospital in config.hospitals}

    def _path(self, relative: str) -> Path:
        path = self.out / relative
        if path.parent not in self._dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.update(path.parents)
        return path

    def text(self, relative: str, text: str) -> None:
        with open(self._path(relative), "w", encoding="utf-8", newline="") as f:
            f.write(text)

    def csv(self, relative: str, header: Iterable[str], rows: Iterable[Iterable[str]]) -> None:
        with open(self._path(relative), "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)

    def _messy_kind(self, allowed: tuple[str, ...]) -> list[str]:
        """Kinds to try for the next candidate file, in order (empty: keep it clean)."""
        if self._messy_rng.random() >= self.config.messy_rate:
            return []
        kinds = [k for k in self.config.messy_kinds if k in allowed]
        return [kinds[i] for i in self._messy_rng.permutation(len(kinds))]

    def _note(self, relative: str, kind: str, detail: str) -> None:
        self.messy.append(MessyFile(path=relative, kind=kind, detail=detail))

    # --- mimic3-benchmarks ----------------------------------------------------------------

    def root(self, subjects: list[SubjectPlan]) -> None:
        self.csv(
            "root/all_stays.csv",
            STAYS_HEADER,
            (stays_row(s, stay) for s in subjects for stay in s.stays),
        )
        for s in subjects:
            rows = [stays_row(s, stay) for stay in s.stays]
            self.csv(f"root/{_folder(s)}/{s.subject_id}/stays.csv", STAYS_HEADER, rows)

    def episodes(self, subject: SubjectPlan) -> None:
        for stay in subject.stays:
            lines = ehr_writer.episode_lines(stay, subject, self.config.seed)
            folder = _folder(subject)
            root_file = f"root/{folder}/{subject.subject_id}/episode{stay.episode}_timeseries.csv"
            self.text(root_file, ehr_writer.episode_text(lines))
            self.counts["ehr_episodes"] += 1
            ihm = ehr_writer.ihm_lines(stay, lines)
            if ihm is not None:
                self._episode(f"{IHM_DIR}/{folder}/{stay.stay}", ihm)
                self.ihm.append((subject.split, stay.stay, stay.mortality))
            pheno = ehr_writer.phenotyping_lines(stay, lines)
            if pheno is not None:
                self._episode(f"{PHENO_DIR}/{folder}/{stay.stay}", pheno)
                self.pheno.append((subject.split, stay.stay, 24.0 * stay.los, stay.phenotypes))

    def _episode(self, relative: str, lines: ehr_writer.EpisodeLines) -> None:
        for kind in self._messy_kind(ehr_writer.EPISODE_MESSY_KINDS):
            made = ehr_writer.messy_episode(lines, kind, self._messy_rng)
            if made is not None:
                self.text(relative, made[0])
                self._note(relative, kind, made[1])
                return
        self.text(relative, ehr_writer.episode_text(lines))

    def listfiles(self) -> None:
        """Each task's ``{train,test}/listfile.csv`` and ``{train,val,test}_listfile.csv``.

        Row orders are the benchmark scripts': IHM train shuffled and test sorted; phenotyping
        train sorted and test in ``os.listdir`` order (a seeded shuffle stands in for it). The
        val and train listfiles keep the order of ``train/listfile.csv``.
        """
        rng = np.random.default_rng([self.config.seed, 6])
        ihm = [(split, stay, [str(y)]) for split, stay, y in self.ihm]
        pheno = [(sp, stay, [f"{t:.6f}", *map(str, y)]) for sp, stay, t, y in self.pheno]
        tasks = (
            (IHM_DIR, ("stay", "y_true"), ihm, ("shuffled", "sorted")),
            (
                PHENO_DIR,
                ("stay", "period_length", *PHENOTYPE_LABELS),
                pheno,
                ("sorted", "shuffled"),
            ),
        )
        for task, header, rows, (train_order, test_order) in tasks:
            train = _ordered([(s, f) for sp, s, f in rows if sp != "test"], train_order, rng)
            test = _ordered([(s, f) for sp, s, f in rows if sp == "test"], test_order, rng)
            val = {stay for split, stay, _ in rows if split == "val"}
            files = {
                "train/listfile.csv": train,
                "train_listfile.csv": [row for row in train if row[0] not in val],
                "val_listfile.csv": [row for row in train if row[0] in val],
                "test/listfile.csv": test,
                "test_listfile.csv": test,
            }
            for name, part in files.items():
                self.csv(f"{task}/{name}", header, ([stay, *fields] for stay, fields in part))

    # --- MIMIC-CXR ------------------------------------------------------------------------

    def cxr(self, subject: SubjectPlan, metadata: list[list[str]]) -> None:
        cfg = self.config
        noise = PIXEL_NOISE * self.hospitals[subject.hospital].image_noise
        for stay in subject.stays:
            for study in stay.studies:
                self.counts["cxr_studies"] += 1
                rng = np.random.default_rng([cfg.seed, 3, study.index])
                for dicom_id, view in study.images:
                    pixels = render_cxr(study.findings, view, cfg.image_size, rng, noise)
                    data = encode_jpeg(pixels)
                    relative = (
                        f"{CXR_DIR}/{image_path(subject.subject_id, study.study_id, dicom_id)}"
                    )
                    if self._messy_kind(("truncated_jpeg",)):
                        data = data[: len(data) // 2]
                        self._note(relative, "truncated_jpeg", f"cut to {len(data)} bytes")
                    self._path(relative).write_bytes(data)
                    self.counts["cxr_images"] += 1
                metadata.extend(metadata_rows(subject.subject_id, study, cfg.image_size))
                if study.has_report:
                    self._report(subject, stay, study)

    def _report(self, subject: SubjectPlan, stay: StayPlan, study: StudyPlan) -> None:
        rng = np.random.default_rng([self.config.seed, 4, study.index])
        length = self.hospitals[subject.hospital].report_length
        noise = self.config.report.noise
        text = render_report(study, stay.views["report"], noise, subject.gender, rng, length)
        relative = (
            f"{REPORTS_DIR}/files/p{str(subject.subject_id)[:2]}/p{subject.subject_id}"
            f"/s{study.study_id}.txt"
        )
        if self._messy_kind(("report_without_leading_spaces",)):
            text = without_leading_spaces(text)
            self._note(
                relative, "report_without_leading_spaces", "one leading space removed per line"
            )
        self.text(relative, text)
        self.counts["reports"] += 1

    def metadata(self, rows: list[list[str]]) -> None:
        rows.sort(key=lambda r: (int(r[1]), int(r[2])))
        self.csv(f"{CXR_DIR}/{METADATA_FILE}", METADATA_HEADER, rows)

    # --- truth and summary ----------------------------------------------------------------

    def truth(self, subjects: list[SubjectPlan]) -> None:
        ihm = {stay for _, stay, _ in self.ihm}
        pheno = {stay for _, stay, _, _ in self.pheno}
        self.csv(TRUTH_FILE, TRUTH_HEADER, stay_rows(subjects, ihm, pheno))
        self.csv(STUDIES_FILE, STUDIES_HEADER, study_rows(subjects))

    def summary(self, subjects: list[SubjectPlan]) -> SyntheticMimicSummary:
        splits = {}
        for split in SPLITS:
            members = [s for s in subjects if s.split == split]
            ihm = [y for sp, _, y in self.ihm if sp == split]
            splits[split] = SplitCounts(
                subjects=len(members),
                stays=sum(len(s.stays) for s in members),
                ihm_stays=len(ihm),
                ihm_positive=sum(ihm),
                phenotyping_stays=sum(1 for row in self.pheno if row[0] == split),
            )
        stays = [stay for s in subjects for stay in s.stays]
        ihm_stays = {stay for _, stay, _ in self.ihm}
        linked = [stay.linked_study(IHM_HOURS) for stay in stays]
        modalities = ModalityCounts(
            **self.counts,
            stays_with_cxr=sum(study is not None for study in linked),
            stays_with_report=sum(study is not None and study.has_report for study in linked),
            ihm_stays_with_cxr=sum(
                study is not None and stay.stay in ihm_stays
                for stay, study in zip(stays, linked, strict=True)
            ),
            phenotyping_stays_with_cxr=sum(stay.linked_study(None) is not None for stay in stays),
        )
        prevalence = {IHM_DIR: _mean([y for _, _, y in self.ihm])}
        for i, name in enumerate(PHENOTYPE_LABELS):
            prevalence[name] = _mean([y[i] for _, _, _, y in self.pheno])
        return SyntheticMimicSummary(
            num_subjects=len(subjects),
            num_stays=len(stays),
            splits=splits,
            modalities=modalities,
            label_prevalence=prevalence,
            messy_files=self.messy,
        )


def _ordered(rows: list, order: str, rng: np.random.Generator) -> list:
    if order == "sorted":
        return sorted(rows)
    return [rows[i] for i in rng.permutation(len(rows))]


def _folder(subject: SubjectPlan) -> str:
    """Benchmark folder of a subject: validation subjects live in ``train/``."""
    return "test" if subject.split == "test" else "train"


def _mean(values: list[int]) -> float:
    return round(sum(values) / len(values), 6) if values else 0.0


@contextmanager
def _progress(enabled: bool) -> Iterator[Progress]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, disable=not enabled) as bar:
        yield bar


def write_synthetic_mimic(
    config: SyntheticMimicConfig, out_dir: Path, progress: bool = True
) -> SyntheticMimicSummary:
    """Write the synthetic cohort under ``out_dir`` (new or empty) and return its summary."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(
            f"out_dir {out_dir} exists and is not an empty folder; synthetic MIMIC data is "
            "written only into a new or empty folder"
        )
    subjects = plan_cohort(config)
    writer = _Writer(config, out_dir)
    writer.root(subjects)
    metadata: list[list[str]] = []
    with _progress(progress) as bar:
        ehr_task = bar.add_task("EHR episodes", total=len(subjects))
        for subject in subjects:
            writer.episodes(subject)
            bar.advance(ehr_task)
        cxr_task = bar.add_task("CXR images + reports", total=len(subjects))
        for subject in subjects:
            writer.cxr(subject, metadata)
            bar.advance(cxr_task)
    writer.metadata(metadata)
    writer.listfiles()
    writer.truth(subjects)
    summary = writer.summary(subjects)
    payload = {"config": config.model_dump(mode="json"), "summary": summary.model_dump(mode="json")}
    writer.text(SUMMARY_FILE, json.dumps(payload, indent=2) + "\n")
    return summary

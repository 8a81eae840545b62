"""Ground-truth sidecars of the synthetic writer (not part of any MIMIC layout; no reader
reads them): ``synthetic_stays.csv``, one row per stay, and ``synthetic_studies.csv``, one row
per CXR study. Benchmarks use them for oracle bounds and to check that the files carry what
was planted.

``synthetic_stays.csv``: ids, split, task membership, mortality, the studies MedFuse's linking
rules should find, the latent factors, ``acuity``, the subject's ``hospital`` and the planted
findings of the stay's IHM-linked study (``{finding}_grade`` 0..3, ``{finding}_side``; all
blank when the stay has no such study). ``synthetic_studies.csv``: every study with its role
relative to the linking windows, whether it has a report, and its planted findings.
"""

from __future__ import annotations

from collections.abc import Iterator

from simulation.synthetic_mimic.cohort import IHM_HOURS, LATENT_FACTORS, StudyPlan, SubjectPlan
from simulation.synthetic_mimic.findings import FINDINGS_HEADER, findings_columns

TRUTH_HEADER: tuple[str, ...] = (
    "subject_id", "hadm_id", "stay_id", "stay", "split", "in_ihm", "in_phenotyping",
    "mortality", "ihm_study_id", "ihm_dicom_id", "ihm_has_report", "phenotyping_study_id",
    "phenotyping_dicom_id", *(f"latent_{name}" for name in LATENT_FACTORS), "acuity",
    "hospital", *FINDINGS_HEADER,
)  # fmt: skip
"""Header of ``synthetic_stays.csv``."""

STUDIES_HEADER: tuple[str, ...] = (
    "subject_id", "stay_id", "study_id", "role", "hospital", "has_report", *FINDINGS_HEADER,
)  # fmt: skip
"""Header of ``synthetic_studies.csv``."""

TRUTH_FILE, STUDIES_FILE = "synthetic_stays.csv", "synthetic_studies.csv"


def _study_ids(study: StudyPlan | None) -> tuple[str, str]:
    if study is None:
        return "", ""
    dicom = next(dicom_id for dicom_id, view in study.images if view == "AP")
    return str(study.study_id), dicom


def stay_rows(subjects: list[SubjectPlan], ihm: set[str], pheno: set[str]) -> Iterator[list[str]]:
    """Rows of ``synthetic_stays.csv``; ``ihm``/``pheno`` name the stays in each task."""
    for s in subjects:
        for stay in s.stays:
            linked = stay.linked_study(IHM_HOURS)
            late = stay.linked_study(None)
            yield [
                str(s.subject_id), str(stay.hadm_id), str(stay.stay_id), stay.stay, s.split,
                str(int(stay.stay in ihm)), str(int(stay.stay in pheno)), str(stay.mortality),
                *_study_ids(linked), str(int(linked is not None and linked.has_report)),
                *_study_ids(late), *(f"{v:.6f}" for v in stay.latent), f"{stay.acuity:.6f}",
                s.hospital, *findings_columns(None if linked is None else linked.findings),
            ]  # fmt: skip


def study_rows(subjects: list[SubjectPlan]) -> Iterator[list[str]]:
    """Rows of ``synthetic_studies.csv``."""
    for s in subjects:
        for stay in s.stays:
            for study in stay.studies:
                yield [
                    str(s.subject_id), str(stay.stay_id), str(study.study_id), study.role,
                    s.hospital, str(int(study.has_report)), *findings_columns(study.findings),
                ]  # fmt: skip

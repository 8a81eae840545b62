"""The synthetic cohort: subjects, ICU stays, latent risk, labels, splits and CXR studies.

Every fact that a file later renders is decided here, once, from the config's seed: ids,
admission/ICU/death times, the per-stay latent risk ``z`` (one value per
:data:`LATENT_FACTORS`), the labels drawn from it, what each modality may see of it, and
where each chest X-ray study falls relative to the MedFuse linking windows.

Label model (:mod:`.labels`): ``P(y = 1 | z) = sigmoid(b + s * w . z)`` with ``|w| = 1``.

Modality views: ``v_m = signal_m * g_m(z) + noise_m * e_m`` with ``e_m ~ N(0, I)`` drawn per
stay and ``g_m`` the modality's (optionally non-linear) link (:mod:`.links`). Renderers see only
``v_m``, so ``signal = 0`` makes a modality carry no label information and a large ``noise``
makes it weak ("lazy"). Each CXR study's findings (:mod:`.findings`) are planted from the CXR
view; its image and its report both render them.

Acuity (``w . z`` along the mortality loadings) sets, through the config's acuity slopes, how
likely a stay is to have an image in the first 48 h and a study to have a report. Each subject
comes from one of the config's hospitals (drawn by share from its own seeded stream).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

import numpy as np

from omnifuse_model.data.ehr.listfiles import PHENOTYPE_LABELS
from simulation.synthetic_mimic.config import SyntheticMimicConfig
from simulation.synthetic_mimic.findings import Finding, plant_findings
from simulation.synthetic_mimic.labels import (
    MORTALITY_LOADINGS,
    PHENOTYPE_RISK,
    label_bias,
    unit_vector,
)
from simulation.synthetic_mimic.links import acuity, linked, present_probability

LATENT_FACTORS: tuple[str, ...] = ("severity", "respiratory", "cardiac", "metabolic")
MODALITIES: tuple[str, ...] = ("ehr", "cxr", "report")
IHM_HOURS = 48.0


StudyRole = Literal[
    "linked",  # latest AP image in [intime, intime + 48 h]: the stay's image for both tasks
    "earlier_in_window",  # an earlier AP in the window: loses to "linked" (latest wins)
    "before_stay",  # AP, days before INTIME: outside every window
    "after_stay",  # AP, after OUTTIME: outside every window
    "non_ap_in_window",  # PA / LATERAL / LL / blank view inside the window: fails the AP filter
    "after_48h",  # AP in (intime + 48 h, outtime]: linked for phenotyping only
]

_CAREUNITS = ("MICU", "MICU", "SICU", "CCU", "CSRU", "TSICU")
_ETHNICITIES = (
    "WHITE",
    "WHITE",
    "WHITE",
    "BLACK/AFRICAN AMERICAN",
    "HISPANIC/LATINO - PUERTO RICAN",
    "ASIAN",
    "UNKNOWN/NOT SPECIFIED",
    "OTHER",
)
# Admission diagnoses are drawn independently of z, so all_stays.csv leaks no label signal.
_DIAGNOSES = (
    "SEPSIS",
    "PNEUMONIA",
    "CONGESTIVE HEART FAILURE",
    "CORONARY ARTERY DISEASE",
    "GASTROINTESTINAL BLEED",
    "ALTERED MENTAL STATUS",
    "HYPOTENSION, RENAL FAILURE",
    "S/P FALL",
    "CHEST PAIN;TELEMETRY",
)
_NON_AP_VIEWS = ("PA", "PA", "LATERAL", "LL", "")


@dataclass
class StudyPlan:
    """One CXR study: its time, its images (dicom id, ViewPosition) and whether it has a report."""

    index: int
    study_id: int
    time: datetime
    millis: int
    role: StudyRole
    images: list[tuple[str, str]]
    has_report: bool
    findings: dict[str, Finding] = field(default_factory=dict)


@dataclass
class StayPlan:
    """One ICU stay as all_stays.csv, the episode files and the CXR tree will show it."""

    index: int
    subject_id: int
    hadm_id: int
    stay_id: int
    episode: int
    dbsource: str
    careunit: str
    diagnosis: str
    admittime: datetime
    intime: datetime
    outtime: datetime
    los: float
    dischtime: datetime
    deathtime: datetime | None
    latent: np.ndarray
    acuity: float
    views: dict[str, np.ndarray]
    mortality: int
    phenotypes: tuple[int, ...]
    studies: list[StudyPlan] = field(default_factory=list)

    @property
    def stay(self) -> str:
        """Episode file name in the task folders, e.g. ``10000032_episode1_timeseries.csv``."""
        return f"{self.subject_id}_episode{self.episode}_timeseries.csv"

    @property
    def los_seconds(self) -> int:
        return int((self.outtime - self.intime).total_seconds())

    def linked_study(self, task_hours: float | None) -> StudyPlan | None:
        """The study MedFuse links: latest AP image in [intime, end] (end = outtime if None)."""
        end = self.outtime if task_hours is None else self.intime + timedelta(hours=task_hours)
        best: StudyPlan | None = None
        for study in self.studies:
            has_ap = any(view == "AP" for _, view in study.images)
            in_window = has_ap and self.intime <= study.time <= end
            if in_window and (best is None or study.time > best.time):
                best = study
        return best


@dataclass
class SubjectPlan:
    """A patient: demographics, split and chronological stays."""

    subject_id: int
    gender: str
    ethnicity: str
    dob: datetime
    dod: datetime | None
    height_cm: float
    weight_kg: float
    hospital: str
    split: str = "train"
    stays: list[StayPlan] = field(default_factory=list)


class _UniqueIds:
    """Random unique integers in [low, high), deterministic given the generator."""

    def __init__(self, rng: np.random.Generator, low: int, high: int) -> None:
        self._rng, self._low, self._high, self._seen = rng, low, high, set()

    def draw(self) -> int:
        while True:
            value = int(self._rng.integers(self._low, self._high))
            if value not in self._seen:
                self._seen.add(value)
                return value


class _DicomIds:
    def __init__(self, rng: np.random.Generator) -> None:
        self._rng, self._seen = rng, set()

    def draw(self) -> str:
        while True:
            groups = self._rng.integers(0, 2**32, size=5, dtype=np.uint64)
            value = "-".join(f"{int(g):08x}" for g in groups)
            if value not in self._seen:
                self._seen.add(value)
                return value


def _seconds(rng: np.random.Generator, low: float, high: float) -> timedelta:
    return timedelta(seconds=int(rng.uniform(low, high)))


def _floor_minute(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)


class CohortPlanner:
    """Draws subjects until the config's number of stays is reached (see module docstring)."""

    def __init__(self, config: SyntheticMimicConfig) -> None:
        self.config = config
        ids_rng = np.random.default_rng([config.seed, 7])
        self._subject_ids = _UniqueIds(ids_rng, 10_000_000, 20_000_000)
        self._hadm_ids = _UniqueIds(ids_rng, 20_000_000, 30_000_000)
        self._stay_ids = _UniqueIds(ids_rng, 30_000_000, 40_000_000)
        self._study_ids = _UniqueIds(ids_rng, 50_000_000, 60_000_000)
        self._dicom_ids = _DicomIds(ids_rng)
        s = config.label_strength
        self._mortality_w = unit_vector(MORTALITY_LOADINGS) * s
        self._mortality_b = label_bias(config.mortality_prevalence, s)
        self._pheno_w = np.stack([unit_vector(w) for _, w in PHENOTYPE_RISK.values()]) * s
        self._pheno_b = np.array([label_bias(p, s) for p, _ in PHENOTYPE_RISK.values()])
        self._num_stays = 0
        self._num_studies = 0

    def plan(self) -> list[SubjectPlan]:
        """The whole cohort, with splits assigned."""
        subjects: list[SubjectPlan] = []
        while self._num_stays < self.config.num_stays:
            subjects.append(self._subject(len(subjects)))
        self._assign_splits(subjects)
        return subjects

    def _assign_splits(self, subjects: list[SubjectPlan]) -> None:
        n = len(subjects)
        order = np.random.default_rng([self.config.seed, 1]).permutation(n)
        n_test = _split_size(n, self.config.test_fraction)
        n_val = _split_size(n - n_test, self.config.val_fraction)
        for rank, i in enumerate(order):
            subjects[i].split = (
                "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            )

    def _subject(self, number: int) -> SubjectPlan:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, 0, number])
        weights = np.array([0.7, 0.2, 0.1, 0.05, 0.05][: cfg.max_stays_per_subject])
        n_stays = 1 + int(rng.choice(len(weights), p=weights / weights.sum()))
        n_stays = min(n_stays, cfg.num_stays - self._num_stays)
        gender = "F" if rng.random() < 0.44 else "M"
        height = float(np.clip(rng.normal(176 if gender == "M" else 162, 8), 140, 205))
        age = float(np.clip(rng.normal(64, 16), 18.5, 89.5))
        subject = SubjectPlan(
            subject_id=self._subject_ids.draw(),
            gender=gender,
            ethnicity=_ETHNICITIES[int(rng.integers(len(_ETHNICITIES)))],
            dob=datetime(2100, 1, 1),  # set below from the first INTIME
            dod=None,
            height_cm=height,
            weight_kg=float(np.clip(rng.normal(82, 20), 40, 200)),
            hospital=self._hospital(number),
        )
        shared = rng.normal(size=len(LATENT_FACTORS))
        admit = datetime(2110, 1, 1) + _seconds(rng, 0, 80 * 365 * 86400)
        for k in range(n_stays):
            if k > 0:
                admit = subject.stays[-1].dischtime + _seconds(rng, 30 * 86400, 400 * 86400)
            z = 0.6 * shared + 0.8 * rng.normal(size=len(LATENT_FACTORS))
            stay = self._stay(rng, subject, k + 1, _floor_minute(admit), z)
            subject.stays.append(stay)
            if stay.mortality:
                subject.dod = datetime.combine(stay.deathtime.date(), datetime.min.time())
                break
        first_in = subject.stays[0].intime
        subject.dob = datetime.combine(
            (first_in - timedelta(days=age * 365.25)).date(), datetime.min.time()
        )
        if subject.dod is None and rng.random() < 0.15:  # died after the last discharge
            later = subject.stays[-1].dischtime + _seconds(rng, 30 * 86400, 1500 * 86400)
            subject.dod = datetime.combine(later.date(), datetime.min.time())
        return subject

    def _hospital(self, number: int) -> str:
        hospitals = self.config.hospitals
        if len(hospitals) == 1:
            return hospitals[0].name
        shares = np.array([h.share for h in hospitals])
        pick = np.random.default_rng([self.config.seed, 8, number]).choice(
            len(hospitals), p=shares / shares.sum()
        )
        return hospitals[int(pick)].name

    def _stay(
        self,
        rng: np.random.Generator,
        subject: SubjectPlan,
        episode: int,
        admit: datetime,
        z: np.ndarray,
    ) -> StayPlan:
        cfg = self.config
        intime = admit + _seconds(rng, 0, 36 * 3600)
        if rng.random() < cfg.ihm_fraction:
            extra = min(rng.lognormal(math.log(36 * 3600), 0.8), 8 * 86400)
            los_seconds = IHM_HOURS * 3600 + 1800 + extra
        else:
            los_seconds = rng.uniform(4 * 3600, 47 * 3600)
        outtime = intime + timedelta(seconds=int(los_seconds))
        mortality = int(rng.random() < _sigmoid(self._mortality_b + self._mortality_w @ z))
        pheno = rng.random(len(PHENOTYPE_LABELS)) < _sigmoid(self._pheno_b + self._pheno_w @ z)
        if mortality and rng.random() < 0.6:  # died in the unit
            deathtime = dischtime = outtime
        elif mortality:
            deathtime = dischtime = outtime + _seconds(rng, 2 * 3600, 5 * 86400)
        else:
            deathtime, dischtime = (
                None,
                _floor_minute(outtime + _seconds(rng, 6 * 3600, 12 * 86400)),
            )
        views = {
            name: getattr(cfg, name).signal * linked(z, name, getattr(cfg, name).nonlinearity)
            + getattr(cfg, name).noise * rng.normal(size=len(LATENT_FACTORS))
            for name in MODALITIES
        }
        self._num_stays += 1
        stay = StayPlan(
            index=self._num_stays - 1,
            subject_id=subject.subject_id,
            hadm_id=self._hadm_ids.draw(),
            stay_id=self._stay_ids.draw(),
            episode=episode,
            dbsource="carevue" if rng.random() < 0.55 else "metavision",
            careunit=_CAREUNITS[int(rng.integers(len(_CAREUNITS)))],
            diagnosis=_DIAGNOSES[int(rng.integers(len(_DIAGNOSES)))],
            admittime=admit,
            intime=intime,
            outtime=outtime,
            los=round((outtime - intime).total_seconds() / 86400.0, 4),
            dischtime=dischtime,
            deathtime=deathtime,
            latent=z,
            acuity=acuity(z, MORTALITY_LOADINGS),
            views=views,
            mortality=mortality,
            phenotypes=tuple(int(p) for p in pheno),
        )
        stay.studies = list(self._studies(rng, stay))
        return stay

    def _studies(self, rng: np.random.Generator, stay: StayPlan) -> Iterator[StudyPlan]:
        cfg = self.config
        lo = stay.intime + timedelta(minutes=10)
        hi = min(stay.intime + timedelta(hours=IHM_HOURS), stay.outtime) - timedelta(minutes=10)
        span = (hi - lo).total_seconds()
        has_cxr = present_probability(cfg.cxr_missing_rate, cfg.cxr_acuity_slope, stay.acuity)
        if rng.random() < has_cxr:
            if rng.random() < 0.1:
                yield self._study(rng, stay, "earlier_in_window", lo + _seconds(rng, 0, 0.3 * span))
            yield self._study(rng, stay, "linked", lo + _seconds(rng, 0.35 * span, span))
        elif rng.random() < cfg.decoy_image_rate:
            roles: list[StudyRole] = ["before_stay", "non_ap_in_window"]
            if not stay.mortality:  # no film after death
                roles.append("after_stay")
            late_lo = stay.intime + timedelta(hours=IHM_HOURS, minutes=10)
            late_span = (stay.outtime - timedelta(minutes=10) - late_lo).total_seconds()
            if late_span > 600:
                roles.append("after_48h")
            role = roles[int(rng.integers(len(roles)))]
            if role == "before_stay":
                yield self._study(rng, stay, role, stay.intime - _seconds(rng, 86400, 10 * 86400))
            elif role == "after_stay":
                yield self._study(rng, stay, role, stay.outtime + _seconds(rng, 3600, 3 * 86400))
            elif role == "after_48h":
                yield self._study(rng, stay, role, late_lo + _seconds(rng, 0, late_span))
            else:
                yield self._study(rng, stay, role, lo + _seconds(rng, 0, span))

    def _study(
        self, rng: np.random.Generator, stay: StayPlan, role: StudyRole, time: datetime
    ) -> StudyPlan:
        """One study; its findings come from the stay's CXR view on the study's own stream."""
        cfg = self.config
        if role == "non_ap_in_window":
            views = [_NON_AP_VIEWS[int(rng.integers(len(_NON_AP_VIEWS)))]]
            if views[0] == "PA":
                views.append("LATERAL")
        else:
            views = ["AP", "LATERAL"] if rng.random() < 0.2 else ["AP"]
        self._num_studies += 1
        index = self._num_studies - 1
        has_report = present_probability(
            cfg.report_missing_rate, cfg.report_acuity_slope, stay.acuity
        )
        return StudyPlan(
            index=index,
            study_id=self._study_ids.draw(),
            time=time,
            millis=int(rng.integers(0, 1000)),
            role=role,
            images=[(self._dicom_ids.draw(), view) for view in views],
            has_report=bool(rng.random() < has_report),
            findings=plant_findings(stay.views["cxr"], np.random.default_rng([cfg.seed, 9, index])),
        )


def _split_size(n: int, fraction: float) -> int:
    """Subjects for a held-out split: at least one (when possible), never all."""
    if fraction <= 0.0 or n < 2:
        return 0
    return int(min(max(round(fraction * n), 1), n - 1))


def _sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def plan_cohort(config: SyntheticMimicConfig) -> list[SubjectPlan]:
    """Subjects with their stays and studies; the same config always gives the same cohort."""
    return CohortPlanner(config).plan()

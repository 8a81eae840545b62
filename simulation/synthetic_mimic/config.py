"""Configuration and summary of the synthetic MIMIC writer (:mod:`.writer`).

Every planted effect is a field of :class:`SyntheticMimicConfig`: cohort size and splits, how
strongly labels depend on the latent risk, per-modality signal, noise and non-linearity (a
modality with ``signal = 0`` carries no label information: a "lazy" modality), missingness
(at random, or rising with acuity), named hospitals with their image noise and report length,
decoy images for the linking rules, and the rate and kinds of messy records. The models are strict
(``extra="forbid"``), so a misspelt key is an error that names the field.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from omnifuse_model.config import StrictModel

MessyKind = Literal[
    "gcs_total_float",
    "unknown_spelling",
    "blank_row",
    "unsorted_hours",
    "truncated_file",
    "truncated_jpeg",
    "report_without_leading_spaces",
]
MESSY_KINDS: tuple[MessyKind, ...] = get_args(MessyKind)


class ModalitySignal(StrictModel):
    """How much one modality shows of the latent risk: view = signal * g(z) + noise * e.

    ``g(z) = (1 - nonlinearity) z + nonlinearity h_m(z)`` where ``h_m`` is the modality's own
    threshold-and-interaction map (:mod:`.links`, seeded from the modality's name), so with
    ``nonlinearity > 0`` a linear read-out of the files no longer recovers the risk.
    """

    signal: float = Field(default=1.0, ge=0.0, le=10.0, description="Scale of the latent risk.")
    noise: float = Field(default=1.0, ge=0.0, le=10.0, description="Std of independent noise.")
    nonlinearity: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Share of the non-linear link h_m(z) in the view; 0 is linear (as before).",
    )


class SyntheticHospital(StrictModel):
    """A named synthetic hospital: its share of patients and the quality of its files."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$", description="Recorded per subject.")
    share: float = Field(default=1.0, gt=0.0, le=1000.0, description="Relative patient share.")
    image_noise: float = Field(
        default=1.0,
        ge=0.0,
        le=10.0,
        description="Multiplier of the images' pixel noise (std 0.035 of full scale at 1).",
    )
    report_length: float = Field(
        default=1.0,
        ge=0.25,
        le=3.0,
        description="Report verbosity: scales the expected number of optional sentences "
        "(boilerplate, incidental; above 1 also routine remarks); below 0.75 terse: short "
        "finding sentences, negations merged. Findings and negations are always written.",
    )


class SyntheticMimicConfig(StrictModel):
    """Parameters of the synthetic MIMIC writer; every planted effect is set here."""

    num_stays: int = Field(default=200, ge=1, le=1_000_000, description="ICU stays in total.")
    seed: int = Field(default=0, ge=0, description="Same seed and config: identical files.")
    max_stays_per_subject: int = Field(default=3, ge=1, le=5, description="Stays per subject.")
    test_fraction: float = Field(default=0.2, ge=0.0, lt=1.0, description="Subjects in test.")
    val_fraction: float = Field(
        default=0.15, ge=0.0, lt=1.0, description="Share of non-test subjects held out as val."
    )
    ihm_fraction: float = Field(
        default=0.6, ge=0.0, le=1.0, description="Share of stays with LOS >= 48 h (IHM cohort)."
    )
    mortality_prevalence: float = Field(
        default=0.13, gt=0.0, lt=1.0, description="Target share of stays that die in hospital."
    )
    label_strength: float = Field(
        default=2.0, ge=0.0, le=10.0, description="Slope of every label's logit on the risk."
    )
    ehr: ModalitySignal = Field(default_factory=lambda: ModalitySignal(signal=1.0, noise=0.5))
    cxr: ModalitySignal = Field(default_factory=lambda: ModalitySignal(signal=1.0, noise=1.0))
    report: ModalitySignal = Field(default_factory=lambda: ModalitySignal(signal=1.0, noise=1.0))
    cxr_missing_rate: float = Field(
        default=0.4, ge=0.0, le=1.0, description="Share of stays with no AP image in 48 h."
    )
    report_missing_rate: float = Field(
        default=0.15, ge=0.0, le=1.0, description="Share of studies written without a report."
    )
    decoy_image_rate: float = Field(
        default=0.3,
        ge=0.0,
        le=1.0,
        description="Share of image-less stays given an image the linking rules must reject "
        "(outside the window, non-AP view) or link for phenotyping only (after 48 h).",
    )
    cxr_acuity_slope: float = Field(
        default=0.0,
        ge=-5.0,
        le=5.0,
        description="Logit slope of P(stay has an AP image in 48 h) per SD of acuity; "
        "0 keeps cxr_missing_rate for every stay (MCAR).",
    )
    report_acuity_slope: float = Field(
        default=0.0,
        ge=-5.0,
        le=5.0,
        description="Logit slope of P(study has a report) per SD of acuity; 0 is MCAR.",
    )
    hospitals: tuple[SyntheticHospital, ...] = Field(
        default_factory=lambda: (SyntheticHospital(name="general"),),
        min_length=1,
        max_length=64,
        description="Hospitals subjects are drawn from (by share), each with its file quality.",
    )
    image_size: int = Field(default=96, ge=32, le=512, description="JPEG width and height (px).")
    messy_rate: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Share of task episode files, images and reports given one problem of "
        "messy_kinds (each listed in the summary); 0 writes clean data.",
    )
    messy_kinds: tuple[MessyKind, ...] = Field(
        default=MESSY_KINDS, min_length=1, description="Problems a messy file may get."
    )

    @model_validator(mode="after")
    def _distinct_messy_kinds(self) -> SyntheticMimicConfig:
        if len(set(self.messy_kinds)) != len(self.messy_kinds):
            raise ValueError(f"messy_kinds: repeated entries in {list(self.messy_kinds)}")
        names = [hospital.name for hospital in self.hospitals]
        if len(set(names)) != len(names):
            raise ValueError(f"hospitals: repeated names in {names}; each name must be unique")
        return self


class SplitCounts(StrictModel):
    """One split (train / val / test, by subject); val stays live in the ``train/`` folders."""

    subjects: int
    stays: int
    ihm_stays: int
    ihm_positive: int
    phenotyping_stays: int


class ModalityCounts(StrictModel):
    """Files written and stays that MedFuse's rules pair with an image (latest AP in window)."""

    ehr_episodes: int
    cxr_studies: int
    cxr_images: int
    reports: int
    stays_with_cxr: int = Field(description="Stays with an AP image in [intime, intime + 48 h].")
    stays_with_report: int = Field(description="Stays whose image above has a report.")
    ihm_stays_with_cxr: int
    phenotyping_stays_with_cxr: int = Field(description="AP image in [intime, outtime].")


class MessyFile(StrictModel):
    """A file written with one deliberate problem, and where it is."""

    path: str = Field(description="Relative to out_dir, '/'-separated.")
    kind: MessyKind
    detail: str = Field(description="What was changed; line numbers count the header as 1.")


class SyntheticMimicSummary(StrictModel):
    """What was written: also saved, with the config, as ``synthetic_summary.json``."""

    num_subjects: int
    num_stays: int
    splits: dict[str, SplitCounts]
    modalities: ModalityCounts
    label_prevalence: dict[str, float] = Field(
        description="'in-hospital-mortality' over IHM stays; each phenotype over its stays."
    )
    messy_files: list[MessyFile]

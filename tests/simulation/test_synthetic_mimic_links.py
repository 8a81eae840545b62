"""The richer synthetic writer, measured on the files it writes: reports state exactly the
findings planted in (and drawn on) their images, X-rays and reports get likelier with acuity,
hospitals differ in image noise and report length, the non-linear links are what the config
says, and the latent state predicts the labels.

Expected words and formulas are written out here rather than imported from the package, so
that a typo in the package cannot make both sides agree.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from simulation.synthetic_mimic.cohort import LATENT_FACTORS, plan_cohort
from simulation.synthetic_mimic.links import linked, nonlinear_link
from simulation.synthetic_mimic.text import read_findings, without_leading_spaces
from simulation.synthetic_mimic.writer import SyntheticMimicConfig, write_synthetic_mimic

FINDINGS = ("opacity", "effusion", "cardiomegaly", "edema")
KEYWORDS = {
    "opacity": ("opacit", "consolidation"),
    "effusion": ("effusion",),
    "cardiomegaly": ("cardiomegaly", "enlarged"),
    "edema": ("edema",),
}
GRADE_WORDS = {
    "opacity": ("mild", "moderate", "dense"),
    "effusion": ("small", "moderate", "large"),
    "cardiomegaly": ("mild", "moderate", "severe"),
    "edema": ("mild", "moderate", "severe"),
}
HOSPITALS = [
    {"name": "plain", "share": 1.0},
    {"name": "noisy", "share": 1.0, "image_noise": 3.0},
    {"name": "terse", "share": 1.0, "report_length": 0.25},
    {"name": "wordy", "share": 1.0, "report_length": 2.0},
]
CONFIG = SyntheticMimicConfig(
    num_stays=400,
    seed=5,
    cxr_missing_rate=0.3,
    report_missing_rate=0.1,
    cxr_acuity_slope=1.0,
    hospitals=HOSPITALS,
)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rich") / "data"
    write_synthetic_mimic(CONFIG, out, progress=False)
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _report(out: Path, subject: str, study: str) -> str:
    return (out / f"mimic-cxr-reports/files/p{subject[:2]}/p{subject}/s{study}.txt").read_text()


def _planted(row: dict[str, str]) -> dict[str, tuple[int, str]]:
    return {
        name: (int(row[f"{name}_grade"]), row[f"{name}_side"])
        for name in FINDINGS
        if row[f"{name}_grade"] not in ("", "0")
    }


def _stated(section: str) -> dict[str, tuple[int, str]]:
    """Findings a report section states: a sentence naming one without no/not/without."""
    stated = {}
    for sentence in re.split(r"(?<=\.)\s+", " ".join(section.split()).lower()):
        if re.search(r"\b(no|not|without)\b", sentence):
            continue
        for name in FINDINGS:
            if any(key in sentence for key in KEYWORDS[name]):
                grades = [i for i, w in enumerate(GRADE_WORDS[name], 1) if w in sentence]
                sides = [s for s in ("left", "right", "bilateral") if f" {s} " in sentence]
                assert len(grades) == 1 and len(sides) <= 1, sentence
                stated[name] = (grades[0], sides[0] if sides else "")
    return stated


def _sections(report: str) -> tuple[str, str]:
    findings, impression = report.split(" FINDINGS:")[1].split(" IMPRESSION:")
    return findings, impression


# --- reports describe what the image shows ------------------------------------------------


def test_reports_state_exactly_the_planted_findings(written):
    studies = [r for r in _rows(written / "synthetic_studies.csv") if r["has_report"] == "1"]
    assert len(studies) > 200
    negated = 0
    for row in studies:
        report = _report(written, row["subject_id"], row["study_id"])
        findings, impression = _sections(report)
        planted = _planted(row)
        assert _stated(findings) == planted, (row["study_id"], report)
        assert _stated(impression) == planted, (row["study_id"], report)
        absent = [name for name in FINDINGS if name not in planted]
        lower = " ".join(findings.split()).lower()
        for name in absent:  # each absent finding is negated by name
            assert any(key in lower for key in KEYWORDS[name]), (name, report)
        negated += len(absent)
    assert negated > 100
    every = [_planted(r) for r in studies]
    assert all(any(name in p for p in every) for name in FINDINGS)
    assert {p[name][1] for p in every for name in ("opacity", "effusion") if name in p} == {
        "left",
        "right",
        "bilateral",
    }


def test_phrasing_varies_between_reports_with_the_same_findings(written):
    texts: dict[str, set[str]] = {}
    for row in _rows(written / "synthetic_studies.csv"):
        if row["has_report"] == "1" and row["hospital"] == "plain":
            findings = _sections(_report(written, row["subject_id"], row["study_id"]))[0]
            key = repr(sorted(_planted(row).items()))
            texts.setdefault(key, set()).add(" ".join(findings.split()))
    repeated = [variants for variants in texts.values() if len(variants) > 1]
    assert repeated, "no two reports with the same findings are phrased differently"


def test_package_reader_recovers_the_planted_findings(written):
    for row in _rows(written / "synthetic_studies.csv")[:150]:
        if row["has_report"] != "1":
            continue
        report = _report(written, row["subject_id"], row["study_id"])
        for text in (report, without_leading_spaces(report)):
            findings, impression = read_findings(text)
            as_tuples = [
                {n: (f.grade, f.side) for n, f in d.items()} for d in (findings, impression)
            ]
            assert as_tuples == [_planted(row), _planted(row)]


def _ap_pixels(out: Path, hospital: str) -> list[tuple[dict[str, str], np.ndarray]]:
    """(study row, pixels) of the only AP image of each single-image study at ``hospital``."""
    meta = _rows(out / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv")
    by_study: dict[str, list[dict[str, str]]] = {}
    for m in meta:
        by_study.setdefault(m["study_id"], []).append(m)
    result = []
    for row in _rows(out / "synthetic_studies.csv"):
        images = by_study[row["study_id"]]
        if row["hospital"] == hospital and len(images) == 1 and images[0]["ViewPosition"] == "AP":
            s, m = row["subject_id"], images[0]
            path = out / f"mimic-cxr-jpg/files/p{s[:2]}/p{s}/s{m['study_id']}/{m['dicom_id']}.jpg"
            result.append((row, np.asarray(Image.open(path), dtype=float)))
    return result


def _auc(positive: list[float], negative: list[float]) -> float:
    pairs = [(p > n) + 0.5 * (p == n) for p in positive for n in negative]
    return float(np.mean(pairs))


def test_images_show_the_planted_findings(written):
    images = [(r, px) for h in ("plain", "terse", "wordy") for r, px in _ap_pixels(written, h)]
    assert len(images) > 80
    # effusion: haze in the costophrenic angle of its side (image right = patient left)
    for side, cols in (("left", slice(64, 79)), ("right", slice(17, 32))):
        present, absent = [], []
        for row, px in images:
            if row["opacity_grade"] != "0":
                continue
            value = px[72:82, cols].mean()
            if row["effusion_side"] in (side, "bilateral"):
                present.append(value)
            elif row["effusion_grade"] == "0":
                absent.append(value)
        assert len(present) >= 5 and _auc(present, absent) > 0.9, side
    # cardiomegaly: a wider heart shadow brightens the band beside the heart
    plain = [
        (int(r["cardiomegaly_grade"]), px[60:68, 58:66].mean())
        for r, px in images
        if r["opacity_grade"] == "0" and r["effusion_grade"] == "0"
    ]
    grades, brightness = np.array(plain).T
    assert len(set(grades)) >= 3 and np.corrcoef(grades, brightness)[0, 1] > 0.6


# --- acuity-dependent missingness ------------------------------------------------------------


def _quartile_gap(acuity: np.ndarray, present: np.ndarray) -> float:
    low, high = np.quantile(acuity, [0.25, 0.75])
    return float(present[acuity >= high].mean() - present[acuity <= low].mean())


def _expected_gap(acuity: np.ndarray, missing_rate: float, slope: float) -> float:
    logit = math.log((1 - missing_rate) / missing_rate) + slope * acuity
    return _quartile_gap(acuity, 1.0 / (1.0 + np.exp(-logit)))


@pytest.mark.parametrize("slope", [0.0, 1.5])
def test_sicker_patients_get_more_xrays_and_reports_as_configured(slope):
    """The planner (no files, so a cohort large enough for tight bounds) gives the quartile gap
    that P(present) = sigmoid(logit(1 - missing_rate) + slope * acuity) predicts."""
    config = SyntheticMimicConfig(
        num_stays=3000,
        seed=9,
        cxr_missing_rate=0.5,
        report_missing_rate=0.4,
        cxr_acuity_slope=slope,
        report_acuity_slope=slope,
    )
    stays = [stay for subject in plan_cohort(config) for stay in subject.stays]
    acuity = np.array([stay.acuity for stay in stays])
    has_cxr = np.array([stay.linked_study(48.0) is not None for stay in stays], dtype=float)
    gap, expected = _quartile_gap(acuity, has_cxr), _expected_gap(acuity, 0.5, slope)
    assert abs(gap - expected) < 0.06
    study_acuity = np.array([stay.acuity for stay in stays for _ in stay.studies])
    has_report = np.array([s.has_report for stay in stays for s in stay.studies], dtype=float)
    report_gap = _quartile_gap(study_acuity, has_report)
    assert abs(report_gap - _expected_gap(study_acuity, 0.4, slope)) < 0.08
    if slope:
        assert gap > 0.4 and report_gap > 0.3
    else:
        assert expected == 0.0


def test_the_written_files_show_more_xrays_for_sicker_patients(written):
    """CONFIG has an acuity slope of 1: the truth file and the image tree agree on it."""
    stays = _rows(written / "synthetic_stays.csv")
    meta = {r["study_id"] for r in _rows(written / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv")}
    acuity = np.array([float(r["acuity"]) for r in stays])
    has_cxr = np.array([r["ihm_study_id"] in meta for r in stays], dtype=float)
    assert has_cxr.sum() == sum(r["ihm_study_id"] != "" for r in stays)
    gap, expected = _quartile_gap(acuity, has_cxr), _expected_gap(acuity, 0.3, 1.0)
    assert expected > 0.25 and abs(gap - expected) < 0.12


# --- per-hospital quality --------------------------------------------------------------------


def test_hospitals_differ_in_image_noise_and_report_length(written):
    noise = {}
    for hospital in ("plain", "noisy"):
        # pixel-to-pixel jitter in the smooth upper mediastinum
        noise[hospital] = np.mean(
            [np.diff(px[8:20, 40:56], axis=1).std() for _, px in _ap_pixels(written, hospital)]
        )
    assert noise["noisy"] > 1.8 * noise["plain"]
    length: dict[str, list[int]] = {}
    for row in _rows(written / "synthetic_studies.csv"):
        if row["has_report"] == "1":
            findings = _sections(_report(written, row["subject_id"], row["study_id"]))[0]
            length.setdefault(row["hospital"], []).append(len(" ".join(findings.split())))
    mean = {hospital: float(np.mean(values)) for hospital, values in length.items()}
    assert mean["terse"] < 0.75 * mean["plain"] < 0.75 * mean["wordy"]
    shares = {h: len(v) / sum(map(len, length.values())) for h, v in length.items()}
    assert all(0.15 < share < 0.35 for share in shares.values())


def test_one_default_hospital_and_its_name_in_the_truth(tmp_path):
    assert [h.name for h in SyntheticMimicConfig().hospitals] == ["general"]
    write_synthetic_mimic(SyntheticMimicConfig(num_stays=15), tmp_path / "d", progress=False)
    assert {r["hospital"] for r in _rows(tmp_path / "d/synthetic_stays.csv")} == {"general"}


# --- links and labels ------------------------------------------------------------------------


def test_nonlinear_links_are_standardised_seeded_by_name_and_not_linear():
    z = np.random.default_rng(0).normal(size=(20_000, len(LATENT_FACTORS)))
    assert np.array_equal(linked(z, "ehr", 0.0), z)
    h = linked(z, "ehr", 1.0)
    assert np.allclose(h.mean(axis=0), 0.0, atol=0.05) and np.allclose(h.std(axis=0), 1, atol=0.05)
    assert np.array_equal(h, nonlinear_link("ehr", 4)(z))
    assert not np.allclose(h, linked(z, "cxr", 1.0))
    design = np.column_stack([z, np.ones(len(z))])
    residual = h - design @ np.linalg.lstsq(design, h, rcond=None)[0]
    r2 = 1 - residual.var(axis=0) / h.var(axis=0)
    assert np.all(r2 < 0.9), f"the link is almost linear: R^2 {r2}"
    half = linked(z, "ehr", 0.5)
    assert np.allclose(half, 0.5 * z + 0.5 * h)


def test_modality_views_follow_the_configured_link():
    config = SyntheticMimicConfig(num_stays=30)
    config.ehr = config.ehr.model_copy(update={"noise": 0.0, "nonlinearity": 1.0, "signal": 2.0})
    for subject in plan_cohort(config):
        for stay in subject.stays:
            expected = 2.0 * nonlinear_link("ehr", len(LATENT_FACTORS))(stay.latent)
            assert np.allclose(stay.views["ehr"], expected)


def test_acuity_predicts_mortality_and_is_the_mortality_direction(written):
    stays = _rows(written / "synthetic_stays.csv")
    acuity = np.array([float(r["acuity"]) for r in stays])
    died = np.array([r["mortality"] == "1" for r in stays])
    assert _auc(list(acuity[died]), list(acuity[~died])) > 0.75
    latent = np.array([[float(r[f"latent_{n}"]) for n in LATENT_FACTORS] for r in stays])
    w = np.array([1.0, 0.35, 0.2, 0.1])
    assert np.allclose(acuity, latent @ (w / np.linalg.norm(w)), atol=1e-5)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"hospitals": [{"name": "a"}, {"name": "a"}]}, "hospitals"),
        ({"hospitals": []}, "hospitals"),
        ({"hospitals": [{"name": "a", "report_length": 0.1}]}, "report_length"),
        ({"hospitals": [{"name": "Bad Name"}]}, "name"),
        ({"cxr_acuity_slope": 9.0}, "cxr_acuity_slope"),
        ({"ehr": {"nonlinearity": 1.5}}, "nonlinearity"),
    ],
)
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ValidationError, match=field):
        SyntheticMimicConfig(**changes)

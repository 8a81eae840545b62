"""The synthetic MIMIC writer writes the real layouts (design/MIMIC_FORMATS.md), deterministically.

Expected headers and vocabularies are spelled out here, from the design document, rather than
imported from the package, so that a typo in the package cannot make both sides agree.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import re
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from simulation.synthetic_mimic.ehr import gcs_scores
from simulation.synthetic_mimic.writer import (
    SyntheticMimicConfig,
    SyntheticMimicSummary,
    write_synthetic_mimic,
)

STAYS_HEADER = (
    "SUBJECT_ID,HADM_ID,ICUSTAY_ID,LAST_CAREUNIT,DBSOURCE,INTIME,OUTTIME,LOS,ADMITTIME,DISCHTIME,"
    "DEATHTIME,ETHNICITY,DIAGNOSIS,GENDER,DOB,DOD,AGE,MORTALITY_INUNIT,MORTALITY,"
    "MORTALITY_INHOSPITAL"
)
EPISODE_HEADER = (
    "Hours,Capillary refill rate,Diastolic blood pressure,Fraction inspired oxygen,"
    "Glascow coma scale eye opening,Glascow coma scale motor response,Glascow coma scale total,"
    "Glascow coma scale verbal response,Glucose,Heart Rate,Height,Mean blood pressure,"
    "Oxygen saturation,Respiratory rate,Systolic blood pressure,Temperature,Weight,pH"
)
PHENOTYPES = ",".join(
    (
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
)
METADATA_HEADER = (
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
    "StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
    "PatientOrientationCodeSequence_CodeMeaning"
)
GCS_VOCAB = {
    "Glascow coma scale eye opening": {
        "To Pain", "3 To speech", "1 No Response", "4 Spontaneously", "None", "To Speech",
        "Spontaneously", "2 To pain",
    },
    "Glascow coma scale motor response": {
        "1 No Response", "3 Abnorm flexion", "Abnormal extension", "No response",
        "4 Flex-withdraws", "Localizes Pain", "Flex-withdraws", "Obeys Commands",
        "Abnormal Flexion", "6 Obeys Commands", "5 Localizes Pain", "2 Abnorm extensn",
    },
    "Glascow coma scale total": {str(v) for v in range(3, 16)},
    "Glascow coma scale verbal response": {
        "1 No Response", "No Response", "Confused", "Inappropriate Words", "Oriented",
        "No Response-ETT", "5 Oriented", "Incomprehensible sounds", "1.0 ET/Trach", "4 Confused",
        "2 Incomp sounds", "3 Inapprop words",
    },
    "Capillary refill rate": {"0.0", "1.0"},
}  # fmt: skip
INT_CHANNELS = ("Heart Rate", "Respiratory rate")
DOT0_CHANNELS = ("Systolic blood pressure", "Diastolic blood pressure", "Oxygen saturation")
DOT0_CHANNELS += ("Glucose",)
EPS = 1e-6
CONFIG = SyntheticMimicConfig(
    num_stays=150, seed=3, cxr_missing_rate=0.3, report_missing_rate=0.2, decoy_image_rate=0.8
)


def _write(tmp_path_factory, name: str, **changes) -> tuple[Path, SyntheticMimicSummary]:
    out = tmp_path_factory.mktemp(name) / "data"
    config = CONFIG.model_copy(update=changes) if changes else CONFIG
    return out, write_synthetic_mimic(SyntheticMimicConfig(**config.model_dump()), out, False)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return _write(tmp_path_factory, "clean")


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    return _write(tmp_path_factory, "messy", messy_rate=0.3)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _header(path: Path) -> str:
    with open(path) as f:
        return f.readline().rstrip("\n")


def _time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S")


def _episode(path: Path) -> list[dict[str, str]]:
    return _rows(path)


def _stay_of(out: Path, stay: str, folder: str) -> dict[str, str]:
    """The stays.csv row of ``{SUBJECT}_episode{N}_timeseries.csv``: N-th stay by INTIME."""
    subject, episode = re.fullmatch(r"(\d+)_episode(\d+)_timeseries\.csv", stay).groups()
    stays = sorted(_rows(out / "root" / folder / subject / "stays.csv"), key=lambda r: r["INTIME"])
    return stays[int(episode) - 1]


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- mimic3-benchmarks ------------------------------------------------------------------------


def test_root_csvs_have_the_exact_header_and_one_row_per_stay(clean):
    out, summary = clean
    assert _header(out / "root/all_stays.csv") == STAYS_HEADER
    all_stays = _rows(out / "root/all_stays.csv")
    assert len(all_stays) == summary.num_stays == CONFIG.num_stays
    per_subject = list((out / "root").glob("*/*/stays.csv"))
    assert len(per_subject) == summary.num_subjects
    assert all(_header(p) == STAYS_HEADER for p in per_subject)
    assert sum(len(_rows(p)) for p in per_subject) == summary.num_stays
    for row in all_stays:
        assert re.fullmatch(r"1\d{7}", row["SUBJECT_ID"])
        los = float(row["LOS"])
        assert los * 24 >= 4 - 0.01
        assert (
            abs((_time(row["OUTTIME"]) - _time(row["INTIME"])).total_seconds() / 86400 - los) < 1e-4
        )
        assert _time(row["ADMITTIME"]) <= _time(row["INTIME"]) < _time(row["OUTTIME"])
        assert row["MORTALITY"] == row["MORTALITY_INHOSPITAL"]
        assert (row["DEATHTIME"] != "") == (row["MORTALITY_INHOSPITAL"] == "1")
    # a subject's later stays start after the earlier ones, and episode files exist for all
    for path in per_subject:
        stays = sorted(_rows(path), key=lambda r: r["INTIME"])
        for n, _ in enumerate(stays, 1):
            assert (path.parent / f"episode{n}_timeseries.csv").is_file()


def test_every_episode_file_has_the_exact_header(clean):
    out, _ = clean
    files = list(out.glob("root/*/*/episode*_timeseries.csv"))
    files += list(out.glob("in-hospital-mortality/*/*_timeseries.csv"))
    files += list(out.glob("phenotyping/*/*_timeseries.csv"))
    assert len(files) > 2 * CONFIG.num_stays
    assert {_header(p) for p in files} == {EPISODE_HEADER}


def test_listfiles_have_exact_headers_and_every_listed_stay_exists(clean):
    out, summary = clean
    for task, header in (("in-hospital-mortality", "stay,y_true"), ("phenotyping", None)):
        header = header or "stay,period_length," + PHENOTYPES
        assert len(header.split(",")) == (2 if task != "phenotyping" else 27)
        listed = {}
        for split, folder in (("train", "train"), ("val", "train"), ("test", "test")):
            path = out / task / f"{split}_listfile.csv"
            assert _header(path) == header
            listed[split] = [r["stay"] for r in _rows(path)]
            assert all((out / task / folder / stay).is_file() for stay in listed[split])
            key = "ihm_stays" if task == "in-hospital-mortality" else "phenotyping_stays"
            assert len(listed[split]) == getattr(summary.splits[split], key) > 0
        for folder in ("train", "test"):
            path = out / task / folder / "listfile.csv"
            assert _header(path) == header
            files = {p.name for p in (out / task / folder).glob("*_timeseries.csv")}
            assert {r["stay"] for r in _rows(path)} == files
        # val stays are split off train/listfile.csv in its order; test listfile copied
        train_folder = [r["stay"] for r in _rows(out / task / "train/listfile.csv")]
        assert [s for s in train_folder if s not in set(listed["val"])] == listed["train"]
        assert [r["stay"] for r in _rows(out / task / "test/listfile.csv")] == listed["test"]
    ihm_test = [r["stay"] for r in _rows(out / "in-hospital-mortality/test_listfile.csv")]
    assert ihm_test == sorted(ihm_test)
    pheno_train = [r["stay"] for r in _rows(out / "phenotyping/train/listfile.csv")]
    assert pheno_train == sorted(pheno_train)


def test_no_subject_is_in_two_splits(clean):
    out, _ = clean
    subjects = {}
    for split in ("train", "val", "test"):
        rows = _rows(out / "in-hospital-mortality" / f"{split}_listfile.csv")
        rows += _rows(out / "phenotyping" / f"{split}_listfile.csv")
        subjects[split] = {r["stay"].split("_")[0] for r in rows}
    assert not subjects["train"] & subjects["val"]
    assert not subjects["train"] & subjects["test"]
    assert not subjects["val"] & subjects["test"]
    root = {f: {p.name for p in (out / "root" / f).iterdir()} for f in ("train", "test")}
    assert not root["train"] & root["test"]
    assert subjects["test"] <= root["test"]
    truth = _rows(out / "synthetic_stays.csv")
    split_of = defaultdict(set)
    for row in truth:
        split_of[row["subject_id"]].add(row["split"])
    assert all(len(splits) == 1 for splits in split_of.values())


def test_ihm_episodes_cover_48_hours_of_long_enough_stays(clean):
    out, _ = clean
    listed = _rows(out / "in-hospital-mortality/train/listfile.csv")
    listed = [(r, "train") for r in listed]
    listed += [(r, "test") for r in _rows(out / "in-hospital-mortality/test/listfile.csv")]
    for row, folder in listed:
        stay = _stay_of(out, row["stay"], folder)
        assert float(stay["LOS"]) * 24 >= 48 - EPS
        assert row["y_true"] == stay["MORTALITY_INHOSPITAL"]
        hours = [
            float(r["Hours"])
            for r in _episode(out / "in-hospital-mortality" / folder / row["stay"])
        ]
        assert hours and all(-EPS < h < 48 + EPS for h in hours)
        assert all(a < b for a, b in itertools.pairwise(hours))


def test_phenotyping_period_length_and_rows(clean):
    out, _ = clean
    for folder in ("train", "test"):
        for row in _rows(out / "phenotyping" / folder / "listfile.csv"):
            stay = _stay_of(out, row["stay"], folder)
            assert row["period_length"] == f"{24 * float(stay['LOS']):.6f}"
            assert {row[name] for name in PHENOTYPES.split(",")} <= {"0", "1"}
            rows = _episode(out / "phenotyping" / folder / row["stay"])
            assert all(-EPS < float(r["Hours"]) < float(row["period_length"]) + EPS for r in rows)
    # root episodes may start before INTIME (negative Hours), as in the real extraction
    root_hours = [float(r["Hours"]) for p in out.glob("root/*/*/episode*") for r in _episode(p)]
    assert min(root_hours) < 0


def test_values_are_spelled_as_the_benchmark_writes_them(clean):
    out, _ = clean
    seen = defaultdict(set)
    for path in out.glob("root/*/*/episode*_timeseries.csv"):
        for row in _episode(path):
            assert row["Hours"] == repr(float(row["Hours"]))
            for channel, value in row.items():
                if value:
                    seen[channel].add(value)
    for channel, vocabulary in GCS_VOCAB.items():
        assert seen[channel] <= vocabulary, channel
    # both charting systems occur: CareVue words and MetaVision numbered spellings
    assert {"Confused", "4 Confused", "No Response-ETT", "1.0 ET/Trach"} <= seen[
        "Glascow coma scale verbal response"
    ]
    assert len(seen["Glascow coma scale total"]) >= 8
    assert all(re.fullmatch(r"\d+", v) for c in INT_CHANNELS for v in seen[c])
    assert all(re.fullmatch(r"\d+\.0", v) for c in DOT0_CHANNELS for v in seen[c])
    mbp = seen["Mean blood pressure"]
    assert any(re.fullmatch(r"\d+", v) for v in mbp)
    assert any(len(v) > 12 for v in mbp)  # float32 repr such as 68.666702270507812
    assert any(len(v) > 10 for v in seen["Temperature"])  # converted from Fahrenheit
    assert all(0.2 <= float(v) <= 1.0 for v in seen["Fraction inspired oxygen"])
    for channel in ("Temperature", "Glucose", "Height", "Weight", "pH"):
        assert seen[channel] and all(math.isfinite(float(v)) for v in seen[channel])


@pytest.mark.parametrize("intubated", [False, True])
def test_gcs_components_add_up_to_the_total(intubated):
    totals = np.repeat(np.arange(3, 16), 50)
    flags = np.full(len(totals), intubated)
    eye, motor, verbal = gcs_scores(totals, flags, np.random.default_rng(0))
    assert eye.min() >= 1 and eye.max() <= 4 and motor.min() >= 1 and motor.max() <= 6
    if intubated:
        assert (verbal == 0).all()
        assert (eye + motor + 1 == np.minimum(totals, 11)).all()
    else:
        assert verbal.min() >= 1 and verbal.max() <= 5
        assert (eye + motor + verbal == totals).all()


# --- MIMIC-CXR-JPG and reports ----------------------------------------------------------------


def test_cxr_metadata_rows_parse_and_images_exist(clean):
    out, summary = clean
    path = out / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv"
    assert _header(path) == METADATA_HEADER
    rows = _rows(path)
    assert len(rows) == summary.modalities.cxr_images
    assert [(int(r["subject_id"]), int(r["study_id"])) for r in rows] == sorted(
        (int(r["subject_id"]), int(r["study_id"])) for r in rows
    )
    views = defaultdict(int)
    for row in rows:
        subject, study, dicom = row["subject_id"], row["study_id"], row["dicom_id"]
        assert re.fullmatch(r"1\d{7}", subject) and re.fullmatch(r"5\d{7}", study)
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}", dicom)
        assert re.fullmatch(r"21\d{6}", row["StudyDate"])
        assert re.fullmatch(r"\d{1,6}\.\d{1,3}", row["StudyTime"])
        datetime.strptime(row["StudyDate"] + f"{int(float(row['StudyTime'])):06}", "%Y%m%d%H%M%S")
        views[row["ViewPosition"]] += 1
        image = out / f"mimic-cxr-jpg/files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
        with Image.open(image) as img:
            assert img.format == "JPEG" and img.mode == "L"
            assert img.size == (int(row["Columns"]), int(row["Rows"])) == (96, 96)
            img.load()
    assert views["AP"] > len(rows) / 2
    assert views["LATERAL"] > 0 and views["PA"] + views[""] + views["LL"] > 0
    assert len({r["dicom_id"] for r in rows}) == len(rows)


def _medfuse_links(out: Path, hours: float | None) -> dict[str, str]:
    """stay_id -> dicom_id of the latest AP image in [intime, end] (MedFuse loadmetadata)."""
    images = defaultdict(list)
    for row in _rows(out / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv"):
        if row["ViewPosition"] == "AP":
            when = f"{row['StudyDate']} {int(float(row['StudyTime'])):06}"
            images[row["subject_id"]].append((datetime.strptime(when, "%Y%m%d %H%M%S"), row))
    links = {}
    for stay in _rows(out / "root/all_stays.csv"):
        start = _time(stay["INTIME"])
        end = _time(stay["OUTTIME"]) if hours is None else start + timedelta(hours=hours)
        inside = [(t, r) for t, r in images[stay["SUBJECT_ID"]] if start <= t <= end]
        if inside:
            links[stay["ICUSTAY_ID"]] = max(inside, key=lambda x: x[0])[1]["dicom_id"]
    return links


def test_images_fall_in_the_linking_windows_the_truth_table_says(clean):
    out, summary = clean
    truth = _rows(out / "synthetic_stays.csv")
    for hours, column in ((48.0, "ihm_dicom_id"), (None, "phenotyping_dicom_id")):
        links = _medfuse_links(out, hours)
        assert links == {r["stay_id"]: r[column] for r in truth if r[column]}
    linked_ihm = _medfuse_links(out, 48.0)
    assert len(linked_ihm) == summary.modalities.stays_with_cxr
    # decoys: AP images outside every window, non-AP images inside, phenotyping-only links
    all_images = {r["dicom_id"] for r in _rows(out / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv")}
    unlinked = all_images - set(_medfuse_links(out, None).values())
    assert len(unlinked) > 10
    assert summary.modalities.phenotyping_stays_with_cxr > summary.modalities.stays_with_cxr


def test_reports_have_the_mimic_cxr_style(clean):
    out, summary = clean
    reports = sorted(out.glob("mimic-cxr-reports/files/p1*/p1*/s5*.txt"))
    assert len(reports) == summary.modalities.reports > 0
    studies = {
        r["study_id"]: r["subject_id"]
        for r in _rows(out / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv")
    }
    sections = (
        "EXAMINATION:",
        "INDICATION:",
        "TECHNIQUE:",
        "COMPARISON:",
        "FINDINGS:",
        "IMPRESSION:",
    )
    for path in reports:
        study = path.stem[1:]
        assert (
            studies[study] == path.parent.name[1:]
            and path.parent.parent.name == f"p{studies[study][:2]}"
        )
        text = path.read_text()
        lines = text.splitlines()
        assert lines[0] == " " * 33 + "FINAL REPORT"
        assert all(line.startswith(" ") and len(line) <= 79 for line in lines)
        assert "" not in lines and " " in lines and "___" in text
        positions = [text.index("\n " + name) for name in sections]
        assert positions == sorted(positions)
        findings = text.split(" FINDINGS:")[1].split(" IMPRESSION:")[0]
        assert findings.strip()


def test_missingness_rates_are_roughly_respected(clean, tmp_path):
    _, summary = clean
    with_cxr = summary.modalities.stays_with_cxr / summary.num_stays
    assert abs(with_cxr - (1 - CONFIG.cxr_missing_rate)) < 0.12
    with_report = summary.modalities.stays_with_report / summary.modalities.stays_with_cxr
    assert abs(with_report - (1 - CONFIG.report_missing_rate)) < 0.12
    config = SyntheticMimicConfig(num_stays=20, cxr_missing_rate=1.0, decoy_image_rate=0.0)
    none = write_synthetic_mimic(config, tmp_path / "none", progress=False)
    assert none.modalities.cxr_images == none.modalities.stays_with_cxr == 0
    config = SyntheticMimicConfig(num_stays=20, cxr_missing_rate=0.0, report_missing_rate=0.0)
    every = write_synthetic_mimic(config, tmp_path / "every", progress=False)
    assert every.modalities.stays_with_cxr == every.modalities.stays_with_report == 20


# --- labels and signal --------------------------------------------------------------------------


def _states_opacity(report: str) -> bool:
    """A FINDINGS sentence names an opacity/consolidation without negating it."""
    body = " ".join(report.split(" FINDINGS:")[1].split(" IMPRESSION:")[0].split())
    return any(
        ("opacit" in s or "consolidation" in s) and not re.search(r"\b(no|not|without)\b", s)
        for s in body.lower().split(". ")
    )


def _signal(out: Path) -> dict[str, float]:
    """Correlations of each modality with the latent risk it should show."""
    truth = {r["stay"]: r for r in _rows(out / "synthetic_stays.csv")}
    sev, hr = [], []
    for path in out.glob("root/*/*/episode*_timeseries.csv"):
        stay = f"{path.parent.name}_{path.name}"
        rates = [float(r["Heart Rate"]) for r in _episode(path) if r["Heart Rate"]]
        sev.append(float(truth[stay]["latent_severity"]))
        hr.append(np.mean(rates))
    resp, consolidation = [], []
    for row in truth.values():
        if row["ihm_has_report"] == "1":
            subject, study = row["subject_id"], row["ihm_study_id"]
            text = (
                out / f"mimic-cxr-reports/files/p{subject[:2]}/p{subject}/s{study}.txt"
            ).read_text()
            resp.append(float(row["latent_respiratory"]))
            consolidation.append(_states_opacity(text))
    return {
        "ehr": float(np.corrcoef(sev, hr)[0, 1]),
        "report": float(np.corrcoef(resp, consolidation)[0, 1]),
    }


def test_labels_and_modalities_carry_the_latent_risk(clean, tmp_path):
    out, summary = clean
    truth = _rows(out / "synthetic_stays.csv")
    severity = np.array([float(r["latent_severity"]) for r in truth])
    died = np.array([r["mortality"] == "1" for r in truth])
    assert severity[died].mean() > severity[~died].mean() + 0.5
    assert 0.05 < summary.label_prevalence["in-hospital-mortality"] < 0.35
    signal = _signal(out)
    assert signal["ehr"] > 0.4 and signal["report"] > 0.2
    # images: brighter lower lungs with respiratory risk
    meta = {r["dicom_id"]: r for r in _rows(out / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv")}
    resp, brightness = [], []
    for row in truth:
        if row["ihm_dicom_id"]:
            m = meta[row["ihm_dicom_id"]]
            s = m["subject_id"]
            path = out / f"mimic-cxr-jpg/files/p{s[:2]}/p{s}/s{m['study_id']}/{m['dicom_id']}.jpg"
            pixels = np.asarray(Image.open(path), dtype=float)
            resp.append(float(row["latent_respiratory"]) + 0.5 * float(row["latent_severity"]))
            brightness.append(pixels[55:75, 10:86].mean())
    assert np.corrcoef(resp, brightness)[0, 1] > 0.2
    # a lazy modality: no signal, no correlation
    lazy_config = CONFIG.model_copy(update={"num_stays": 100})
    lazy_config.ehr = lazy_config.ehr.model_copy(update={"signal": 0.0})
    lazy_config.report = lazy_config.report.model_copy(update={"signal": 0.0})
    # the report describes the image's findings, so a lazy report needs a lazy image too
    lazy_config.cxr = lazy_config.cxr.model_copy(update={"signal": 0.0})
    write_synthetic_mimic(lazy_config, tmp_path / "lazy", progress=False)
    lazy = _signal(tmp_path / "lazy")
    assert abs(lazy["ehr"]) < 0.25 and abs(lazy["report"]) < 0.25


# --- determinism, messy records, summary, config ------------------------------------------------


def test_same_config_gives_byte_identical_trees(tmp_path):
    config = SyntheticMimicConfig(num_stays=40, seed=11, messy_rate=0.2)
    first = write_synthetic_mimic(config, tmp_path / "a", progress=False)
    second = write_synthetic_mimic(config, tmp_path / "b", progress=True)
    assert first == second
    hashes = _tree_hashes(tmp_path / "a")
    assert len(hashes) > 100 and hashes == _tree_hashes(tmp_path / "b")
    other = SyntheticMimicConfig(num_stays=40, seed=12, messy_rate=0.2)
    write_synthetic_mimic(other, tmp_path / "c", progress=False)
    assert hashes != _tree_hashes(tmp_path / "c")


def _check_messy(kind: str, clean: bytes, messy: bytes) -> None:
    if kind == "truncated_jpeg":
        assert clean.startswith(messy) and len(messy) < len(clean)
        with pytest.raises(OSError), Image.open(io.BytesIO(messy)) as img:
            img.load()
        return
    before, after = clean.decode(), messy.decode()
    if kind == "report_without_leading_spaces":
        assert after.splitlines() == [line[1:] for line in before.splitlines()]
        return
    old, new = before.splitlines(), after.splitlines()
    if kind == "truncated_file":
        assert before.startswith(after) and not after.endswith("\n")
        assert len(new[-1].split(",")) < 18
    elif kind == "blank_row":
        assert new.count("") == 1 and [line for line in new if line] == old
    elif kind == "unsorted_hours":
        assert sorted(new) == sorted(old)
        hours = [float(line.split(",")[0]) for line in new[1:]]
        assert any(a > b for a, b in itertools.pairwise(hours))
    else:
        changed = [
            (c, a, b)
            for x, y in zip(old, new, strict=True)
            for c, (a, b) in enumerate(zip(x.split(","), y.split(","), strict=True))
            if a != b
        ]
        assert len(changed) == 1
        column, a, b = changed[0]
        name = EPISODE_HEADER.split(",")[column]
        if kind == "gcs_total_float":
            assert name == "Glascow coma scale total" and b == a + ".0"
        else:
            assert kind == "unknown_spelling" and b not in GCS_VOCAB[name] and a in GCS_VOCAB[name]


def test_messy_injection_makes_exactly_the_listed_problems(clean, messy):
    clean_dir, clean_summary = clean
    messy_dir, summary = messy
    assert clean_summary.messy_files == [] and SyntheticMimicConfig().messy_rate == 0.0
    listed = {m.path: m for m in summary.messy_files}
    assert len(listed) == len(summary.messy_files)
    assert {m.kind for m in summary.messy_files} == set(CONFIG.messy_kinds)
    clean_hashes, messy_hashes = _tree_hashes(clean_dir), _tree_hashes(messy_dir)
    assert clean_hashes.keys() == messy_hashes.keys()
    differ = {p for p in clean_hashes if clean_hashes[p] != messy_hashes[p]}
    assert differ - {"synthetic_summary.json"} == set(listed)
    for path, item in listed.items():
        _check_messy(item.kind, (clean_dir / path).read_bytes(), (messy_dir / path).read_bytes())
    assert summary.model_dump(exclude={"messy_files"}) == clean_summary.model_dump(
        exclude={"messy_files"}
    )


def test_summary_json_holds_config_and_summary(clean):
    out, summary = clean
    payload = json.loads((out / "synthetic_summary.json").read_text())
    assert SyntheticMimicConfig(**payload["config"]) == CONFIG
    assert SyntheticMimicSummary(**payload["summary"]) == summary
    assert sum(s.stays for s in summary.splits.values()) == summary.num_stays
    assert sum(s.subjects for s in summary.splits.values()) == summary.num_subjects
    ihm = [
        r
        for s in ("train", "val", "test")
        for r in _rows(out / f"in-hospital-mortality/{s}_listfile.csv")
    ]
    mean = sum(r["y_true"] == "1" for r in ihm) / len(ihm)
    assert summary.label_prevalence["in-hospital-mortality"] == pytest.approx(mean, abs=1e-6)
    assert len(summary.label_prevalence) == 26


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"cxr_missing_rate": 1.5}, "cxr_missing_rate"),
        ({"num_stays": 0}, "num_stays"),
        ({"num_stay": 10}, "num_stay"),
        ({"ehr": {"signal": -1.0}}, "ehr.signal"),
        ({"report": {"noise": 1.0, "snr": 2}}, "report.snr"),
        ({"messy_kinds": ["bogus"]}, "messy_kinds"),
        ({"messy_kinds": ["blank_row", "blank_row"]}, "messy_kinds"),
        ({"test_fraction": 1.0}, "test_fraction"),
    ],
)
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ValidationError, match=re.escape(field)):
        SyntheticMimicConfig(**changes)


def test_refuses_to_write_into_a_non_empty_folder(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path))):
        write_synthetic_mimic(SyntheticMimicConfig(num_stays=2), tmp_path, progress=False)

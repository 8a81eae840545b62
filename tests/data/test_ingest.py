"""Ingest: every listed stay accounted for, faults counted per modality, MedFuse linking."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from omnifuse_model.data.ingest import episode_stay_ids, ingest_site
from omnifuse_model.data.ingest_report import SPLITS, print_ingest_report
from omnifuse_model.site_config import SiteConfig
from simulation.synthetic_mimic.writer import SyntheticMimicConfig, write_synthetic_mimic

IHM = "in-hospital-mortality"


def make_site(root: Path, task: str = IHM, modalities: tuple[str, ...] = ("ehr", "cxr", "rep"),
              **data: Path | None) -> SiteConfig:  # fmt: skip
    paths = {
        "benchmark_dir": root / task,
        "stays_csv": root / "root" / "all_stays.csv",
        "cxr_dir": root / "mimic-cxr-jpg",
        "reports_dir": root / "mimic-cxr-reports",
    } | data
    return SiteConfig(
        name="site_a", task=task, modalities=list(modalities), cache_dir=root / "cache",
        data=paths,
    )  # fmt: skip


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mimic") / "data"
    write_synthetic_mimic(SyntheticMimicConfig(num_stays=50, seed=3, image_size=32), root, False)
    return root


@pytest.fixture
def messy_root(tmp_path: Path) -> Path:
    config = SyntheticMimicConfig(num_stays=50, seed=5, image_size=32, messy_rate=0.4)
    write_synthetic_mimic(config, tmp_path / "data", False)
    return tmp_path / "data"


def listed_rows(task_dir: Path) -> dict[str, int]:
    return {
        split: len((task_dir / f"{split}_listfile.csv").read_text().strip().splitlines()) - 1
        for split in ("train", "val", "test")
    }


def test_every_stay_is_accounted_for(messy_root: Path) -> None:
    result = ingest_site(make_site(messy_root))
    report = result.report()
    report.check()
    rows = listed_rows(messy_root / IHM)
    for split, tally in report.splits.items():
        assert tally.listed == rows[split]
        for name in ("ehr", "cxr", "rep"):
            assert sum(tally.modalities[name].counts.values()) == rows[split]
    assert len(result.stays) == sum(rows.values())
    assert all(tuple(stay.outcomes) == ("ehr", "cxr", "rep") for stay in result.stays)
    totals = report.totals()
    # The messy writer's faults show up under named reasons, never as silent drops.
    messy = json.loads((messy_root / "synthetic_summary.json").read_text())["summary"]
    kinds = {m["kind"] for m in messy["messy_files"] if m["path"].startswith(IHM)}
    if "truncated_file" in kinds:
        assert totals["ehr"].reasons["rejected"]["short_row"] >= 1
    if kinds & {"blank_row", "unsorted_hours", "gcs_total_float", "unknown_spelling"}:
        assert totals["ehr"].counts["repaired"] >= 1
    for stay in result.stays:
        assert (stay.ehr is not None) == stay.outcomes["ehr"].usable
        assert (stay.image_path is not None) == stay.outcomes["cxr"].usable
        assert (stay.report_text is not None) == stay.outcomes["rep"].usable
        if stay.ehr is not None:
            assert stay.ehr.shape == (24, 76) and stay.ehr.dtype == np.float32


def test_linking_matches_the_medfuse_rules(clean_root: Path) -> None:
    """Stay ids come from stays_csv by episode number; images/reports match the truth."""
    result = ingest_site(make_site(clean_root))
    with open(clean_root / "synthetic_stays.csv", newline="") as handle:
        truth = {row["stay"]: row for row in csv.DictReader(handle)}
    assert result.linking["stay_id_source"] == "stays_csv"
    for stay in result.stays:
        expected = truth[stay.stay]
        assert stay.stay_id == int(expected["stay_id"])
        study = expected["ihm_study_id"]
        assert stay.study_id == (int(study) if study else None)
        if study:
            assert stay.image_path is not None
            assert stay.image_path.name == f"{expected['ihm_dicom_id']}.jpg"
            assert stay.outcomes["cxr"].status == "used"
            has_report = expected["ihm_has_report"] == "1"
            assert (stay.report_text is not None) == has_report
            if not has_report:
                assert stay.outcomes["rep"].reason == "no_report_file"
        else:
            assert stay.outcomes["cxr"].reason == "no_image_in_window"
            assert stay.outcomes["rep"].status == "missing"
        assert stay.labels == (int(expected["mortality"]),)


def test_phenotyping_uses_the_first_48_hours(clean_root: Path) -> None:
    result = ingest_site(make_site(clean_root, task="phenotyping", modalities=("ehr",)))
    assert result.window_hours == 48.0
    arrays = [stay.ehr for stay in result.stays if stay.ehr is not None]
    assert arrays and all(array.shape == (24, 76) for array in arrays)
    assert all(len(stay.labels) == 25 for stay in result.stays)


def test_faults_reject_the_modality_not_the_stay(clean_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(clean_root, root)
    site = make_site(root)
    full = [s for s in ingest_site(site).stays if len(s.usable_modalities) == 3]
    assert len(full) >= 3
    broken_image, empty_report, cut_episode = full[0], full[1], full[2]
    broken_image.image_path.write_bytes(b"this is not a JPEG")
    report_file = next((root / "mimic-cxr-reports").rglob(f"s{empty_report.study_id}.txt"))
    report_file.write_text("                                 FINAL REPORT\n \n")
    episode = root / IHM / ("test" if cut_episode.split == "test" else "train") / cut_episode.stay
    lines = episode.read_text().splitlines()
    episode.write_text("\n".join([*lines[:-1], lines[-1][: len(lines[-1]) // 3]]) + "\n")

    result = ingest_site(site)
    stays = {stay.stay: stay for stay in result.stays}
    outcome = stays[broken_image.stay].outcomes["cxr"]
    assert (outcome.status, outcome.reason) == ("rejected", "unreadable_image")
    outcome = stays[empty_report.stay].outcomes["rep"]
    assert (outcome.status, outcome.reason) == ("rejected", "empty_report")
    outcome = stays[cut_episode.stay].outcomes["ehr"]
    assert (outcome.status, outcome.reason) == ("rejected", "short_row")
    for name in (broken_image.stay, empty_report.stay, cut_episode.stay):
        assert stays[name].accepted and len(stays[name].usable_modalities) == 2
    report = result.report()
    totals = report.totals()
    assert totals["cxr"].reasons["rejected"] == {"unreadable_image": 1}
    assert totals["rep"].reasons["rejected"] == {"empty_report": 1}
    assert totals["ehr"].reasons["rejected"] == {"short_row": 1}
    assert sum(t.rejected for t in report.splits.values()) == 0
    reasons = {problem["reason"] for problem in report.problems}
    assert reasons == {"unreadable_image", "empty_report", "short_row"}

    # With nothing else left, the stay itself is rejected, with a reason.
    only_ehr = ingest_site(make_site(root, modalities=("ehr",)))
    rejected = [s for s in only_ehr.stays if not s.accepted]
    assert [s.stay for s in rejected] == [cut_episode.stay]
    tally = only_ehr.report().splits[cut_episode.split]
    assert tally.rejected_by_reason == {"no_usable_modality": 1}


def test_a_fifo_episode_is_a_counted_rejection(clean_root: Path, tmp_path: Path, fifo_at) -> None:
    """A FIFO in place of an episode CSV used to hang ingest (and `omnifuse prepare`)."""
    root = tmp_path / "data"
    shutil.copytree(clean_root, root)
    episode = next((root / IHM / "train").glob("*_timeseries.csv"))
    episode.unlink()
    fifo_at(episode)
    result = ingest_site(make_site(root, modalities=("ehr",)))
    (stay,) = [s for s in result.stays if s.stay == episode.name]
    outcome = stay.outcomes["ehr"]
    assert (outcome.status, outcome.reason) == ("rejected", "not_regular_file")
    assert f"{episode}: not a regular file (a FIFO)" in outcome.detail


def test_listfile_rows_that_are_not_stays_are_counted(clean_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(clean_root, root)
    listfile = root / IHM / "val_listfile.csv"
    lines = listfile.read_text().splitlines()
    listfile.write_text("\n".join([*lines, lines[1], "not_a_stay.csv,0"]) + "\n")
    (root / IHM / "train" / lines[1].split(",")[0]).unlink()  # missing file: EHR only
    report = ingest_site(make_site(root)).report()
    val = report.splits["val"]
    assert val.listed == len(lines) - 1 + 2
    assert val.rejected_by_reason["listfile_duplicate_stay"] == 1
    assert val.rejected_by_reason["listfile_bad_listfile_row"] == 1
    assert val.modalities["ehr"].reasons["rejected"]["missing_file"] == 1
    report.check()


def test_a_subject_in_two_splits_is_rejected_in_every_split(
    clean_root: Path, tmp_path: Path
) -> None:
    root = tmp_path / "data"
    shutil.copytree(clean_root, root)
    task_dir = root / IHM
    lines = {s: (task_dir / f"{s}_listfile.csv").read_text().splitlines() for s in SPLITS}
    same_stay, label = lines["train"][1].split(",")
    other = lines["train"][2].split(",")[0]
    other_subject = other.split("_")[0]
    flipped = f"{same_stay},{1 - int(label)}"  # the same stay in val, with the other label
    second_stay = f"{other_subject}_episode7_timeseries.csv,0"  # another stay, in test
    (task_dir / "val_listfile.csv").write_text("\n".join([*lines["val"], flipped]) + "\n")
    (task_dir / "test_listfile.csv").write_text("\n".join([*lines["test"], second_stay]) + "\n")

    result = ingest_site(make_site(root))
    report = result.report()
    report.check()
    listed = {s: len(lines[s]) - 1 for s in SPLITS}
    assert {s: report.splits[s].listed for s in SPLITS} == {
        "train": listed["train"], "val": listed["val"] + 1, "test": listed["test"] + 1
    }  # fmt: skip
    assert report.splits["train"].rejected_by_reason == {
        "listfile_stay_in_two_splits": 1, "listfile_subject_in_two_splits": 1
    }  # fmt: skip
    assert report.splits["val"].rejected_by_reason == {"listfile_stay_in_two_splits": 1}
    assert report.splits["test"].rejected_by_reason == {"listfile_subject_in_two_splits": 1}
    details = {(p["split"], p["stay"]): p["detail"] for p in report.problems}
    assert "listed in val and train" in details["val", same_stay]
    assert "listed in train and val" in details["train", same_stay]
    assert f"subject {other_subject} has stays in train and test" in details["train", other]
    kept = {(s.split, s.stay) for s in result.stays}
    assert not kept & {("train", same_stay), ("val", same_stay), ("train", other)}


def test_stay_ids_by_episode_number() -> None:
    stays = pd.DataFrame(
        {
            "subject_id": ["11", "11", "11", "12", "12"],
            "stay_id": ["300", "100", "200", "400", "bad"],
            "intime": ["2100-03-01 00:00:00", "2100-01-01 00:00:00", "2100-02-01 00:00:00",
                       "2100-01-01 00:00:00", "2100-02-01 00:00:00"],
            "outtime": [""] * 5,
        }
    )  # fmt: skip
    numbered = episode_stay_ids(stays)
    assert numbered.ids == {(11, 1): 100, (11, 2): 200, (11, 3): 300, (12, 1): 400}
    reason, detail = numbered.problem(12, 2)
    assert reason == "bad_stay_id" and "line 6 column stay_id: 'bad'" in detail


def test_a_bad_intime_never_shifts_a_subjects_episodes() -> None:
    """One unparseable INTIME made the subject's later stays take their neighbours' ids."""
    stays = pd.DataFrame(
        {
            "SUBJECT_ID": ["11", "11", "11", "12"],
            "ICUSTAY_ID": ["100", "200", "300", "400"],
            "INTIME": ["garbage", "2100-02-01 00:00:00", "2100-03-01 00:00:00",
                       "01/02/2100"],  # not ISO 8601 either (dateutil used to guess it)
            "OUTTIME": [""] * 4,
        }
    )  # fmt: skip
    stays.attrs["source"] = "all_stays.csv"
    numbered = episode_stay_ids(stays)
    assert numbered.ids == {}
    for subject, line, value in ((11, 2, "garbage"), (12, 5, "01/02/2100")):
        for episode in (1, 2, 3):
            reason, detail = numbered.problem(subject, episode)
            assert reason == "bad_intime"
            assert f"all_stays.csv line {line} column INTIME: {value!r}" in detail


def test_a_bad_intime_rejects_the_subjects_images(clean_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(clean_root, root)
    reference = {s.stay: s for s in ingest_site(make_site(clean_root)).stays}
    stays_csv = root / "root" / "all_stays.csv"
    table = pd.read_csv(stays_csv, dtype=str, keep_default_na=False)
    counts = table["SUBJECT_ID"].value_counts()
    subject = counts.index[0]
    assert counts.iloc[0] >= 2, "the synthetic data should have a subject with two stays"
    first = table[table["SUBJECT_ID"] == subject]["INTIME"].idxmin()
    table.loc[first, "INTIME"] = "garbage"
    table.to_csv(stays_csv, index=False)

    result = ingest_site(make_site(root))
    for stay in result.stays:
        if stay.subject_id != int(subject):
            assert stay.stay_id == reference[stay.stay].stay_id
            outcomes = {name: (o.status, o.reason) for name, o in stay.outcomes.items()}
            was = {name: (o.status, o.reason) for name, o in reference[stay.stay].outcomes.items()}
            assert outcomes == was
            continue
        assert stay.stay_id is None and stay.study_id is None
        for name in ("cxr", "rep"):
            outcome = stay.outcomes[name]
            assert (outcome.status, outcome.reason) == ("rejected", "bad_intime")
            assert f"line {first + 2} column INTIME: 'garbage'" in outcome.detail
    assert any(stay.subject_id == int(subject) for stay in result.stays)


def test_config_errors_name_the_field(clean_root: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.stays_csv"):
        ingest_site(make_site(clean_root, stays_csv=None))
    with pytest.raises(ValueError, match=r"data\.reports_dir"):
        ingest_site(make_site(clean_root, reports_dir=None))
    with pytest.raises(FileNotFoundError, match="train_listfile.csv"):
        ingest_site(make_site(clean_root, benchmark_dir=clean_root / "root"))


def test_report_json_and_table(clean_root: Path, tmp_path: Path) -> None:
    report = ingest_site(make_site(clean_root)).report()
    report.write_json(tmp_path / "ingest.json")
    data = json.loads((tmp_path / "ingest.json").read_text())
    assert data["totals"]["cxr"]["missing"] == report.totals()["cxr"].counts["missing"]
    console = Console(record=True, width=160)
    print_ingest_report(data, console)
    text = console.export_text()
    assert "no_image_in_window" in text and "ehr+cxr+rep" in text
    for name, split in data["splits"].items():
        assert name in text and str(split["listed"]) in text


def test_medfuse_listfiles_and_report_only_sites(clean_root: Path, tmp_path: Path) -> None:
    """A listfile's stay_id column is used as is; a site without images still gets reports."""
    root = tmp_path / "data"
    shutil.copytree(clean_root, root)
    reference = {s.stay: s for s in ingest_site(make_site(clean_root)).stays}
    for split in ("train", "val", "test"):
        listfile = root / IHM / f"{split}_listfile.csv"
        rows = [line.split(",") for line in listfile.read_text().splitlines()[1:]]
        lines = ["stay,period_length,stay_id,y_true"]
        lines += [f"{stay},0,{reference[stay].stay_id},{y}" for stay, y in rows]
        listfile.write_text("\n".join(lines) + "\n")
    (root / "root" / "all_stays.csv").write_text(
        (root / "root" / "all_stays.csv").read_text().splitlines()[0] + "\n"
    )  # no stay can be looked up by episode number any more
    metadata = clean_root / "mimic-cxr-jpg" / "mimic-cxr-2.0.0-metadata.csv"
    site = make_site(root, modalities=("ehr", "rep"), cxr_dir=None, cxr_metadata=metadata)
    with pytest.raises(ValueError, match=r"data\.cxr_dir"):
        ingest_site(make_site(root, cxr_dir=None))
    result = ingest_site(site)
    assert result.linking["stay_id_source"] == "listfile"
    assert all(stay.stay_id == reference[stay.stay].stay_id for stay in result.stays)
    assert result.linking["stays_linked"] == 0  # all_stays.csv is empty: no time windows

    # With the stays table back, reports link through the metadata alone (no image files).
    stays_csv = clean_root / "root" / "all_stays.csv"
    site = make_site(
        root, modalities=("ehr", "rep"), cxr_dir=None, cxr_metadata=metadata, stays_csv=stays_csv
    )
    result = ingest_site(site)
    assert tuple(result.stays[0].outcomes) == ("ehr", "rep")
    assert sum(stay.report_text is not None for stay in result.stays) > 0
    for stay in result.stays:
        assert stay.report_text == reference[stay.stay].report_text
        assert stay.image_path is None

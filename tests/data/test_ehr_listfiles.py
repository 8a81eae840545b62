"""Task listfiles (benchmark and MedFuse layouts) read from tiny folders in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from omnifuse_model.data.ehr.episodes import RejectReason
from omnifuse_model.data.ehr.listfiles import (
    PHENOTYPE_LABELS,
    StayRecord,
    Task,
    listfile_header,
    read_listfile,
    read_task_split,
)

PHENO_HEADER = "stay,period_length," + ",".join(PHENOTYPE_LABELS)


def make_task_dir(root: Path, task: str, listfiles: dict[str, str], stays: dict[str, list[str]]):
    """``listfiles``: split -> text; ``stays``: ``train``/``test`` -> episode files to create."""
    task_dir = root / task
    for folder, names in stays.items():
        (task_dir / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (task_dir / folder / name).write_text("Hours\n", encoding="utf-8")
    for split, text in listfiles.items():
        (task_dir / f"{split}_listfile.csv").write_text(text, encoding="utf-8")
    return task_dir


@pytest.fixture
def ihm_dir(tmp_path):
    return make_task_dir(
        tmp_path,
        "in-hospital-mortality",
        {
            "train": "stay,y_true\n"
            "10011_episode1_timeseries.csv,1\n41976_episode4_timeseries.csv,0\n",
            "val": "stay,y_true\n10026_episode1_timeseries.csv,0\n",
            "test": "stay,y_true\n10006_episode2_timeseries.csv,1\n",
        },
        {
            "train": [
                "10011_episode1_timeseries.csv",
                "41976_episode4_timeseries.csv",
                "10026_episode1_timeseries.csv",
            ],
            "test": ["10006_episode2_timeseries.csv"],
        },
    )


def test_phenotype_labels_are_the_25_sorted_names():
    assert len(PHENOTYPE_LABELS) == 25 and list(PHENOTYPE_LABELS) == sorted(PHENOTYPE_LABELS)
    assert PHENOTYPE_LABELS[8] == "Congestive heart failure; nonhypertensive"
    assert PHENOTYPE_LABELS[-1] == "Shock"


def test_ihm_benchmark_splits(ihm_dir):
    train = read_task_split(ihm_dir, "train")
    assert train.task is Task.IN_HOSPITAL_MORTALITY and not train.has_stay_id
    assert train.records[1] == StayRecord(
        stay="41976_episode4_timeseries.csv",
        subject_id=41976,
        episode=4,
        stay_id=None,
        period_length=48.0,
        labels=(0,),
        path=ihm_dir / "train" / "41976_episode4_timeseries.csv",
    )
    assert train.records[0].labels == (1,) and train.rejected == []
    val = read_task_split(ihm_dir, "val")
    assert [r.path for r in val.records] == [ihm_dir / "train" / "10026_episode1_timeseries.csv"]
    test = read_task_split(ihm_dir, "test")
    assert test.records[0].path.parent == ihm_dir / "test" and test.records[0].subject_id == 10006


def test_ihm_medfuse_listfile_period_zero_means_48(tmp_path):
    task_dir = make_task_dir(
        tmp_path,
        "in-hospital-mortality",
        {
            "train": "stay,period_length,stay_id,y_true\n"
            "14991576_episode3_timeseries.csv,0,30000153,1\n"
            "10000032_episode1_timeseries.csv,0.0,39553978.0,0\n"
        },
        {"train": ["14991576_episode3_timeseries.csv", "10000032_episode1_timeseries.csv"]},
    )
    listfile = read_task_split(task_dir, "train")
    assert listfile.has_stay_id
    first, second = listfile.records
    assert (first.subject_id, first.episode, first.stay_id) == (14991576, 3, 30000153)
    assert first.period_length == 48.0 and first.labels == (1,)
    assert second.stay_id == 39553978 and second.period_length == 48.0


def test_phenotyping_benchmark_and_medfuse(tmp_path):
    flags = ["0"] * 25
    flags[3] = flags[24] = "1"
    benchmark = f"{PHENO_HEADER}\n10006_episode1_timeseries.csv,39.180000,{','.join(flags)}\n"
    medfuse_header = "stay,period_length,stay_id," + ",".join(PHENOTYPE_LABELS)
    medfuse = f"{medfuse_header}\n10006_episode1_timeseries.csv,41.5,30001234,{','.join(flags)}\n"
    task_dir = make_task_dir(
        tmp_path,
        "phenotyping",
        {"train": benchmark, "test": medfuse},
        {"train": ["10006_episode1_timeseries.csv"], "test": ["10006_episode1_timeseries.csv"]},
    )
    (record,) = read_task_split(task_dir, "train").records
    assert record.period_length == 39.18 and record.stay_id is None
    assert len(record.labels) == 25 and record.labels[3] == record.labels[24] == 1
    assert sum(record.labels) == 2
    test = read_task_split(task_dir, "test")
    assert test.has_stay_id and test.label_names == PHENOTYPE_LABELS
    assert test.records[0].period_length == 41.5 and test.records[0].stay_id == 30001234


@pytest.mark.parametrize(
    ("task", "header", "message"),
    [
        ("in-hospital-mortality", "stay,label", "column 2 is 'label', expected 'y_true'"),
        ("in-hospital-mortality", "stay", "missing column 2 'y_true'"),
        ("in-hospital-mortality", "", "missing column 1 'stay'"),
        ("in-hospital-mortality", "stay,y_true,extra", "unexpected column 3 'extra'"),
        ("in-hospital-mortality", "stay,period_length,stay_id", "missing column 4 'y_true'"),
        ("phenotyping", "stay,y_true", "column 2 is 'y_true', expected 'period_length'"),
        ("phenotyping", PHENO_HEADER.removesuffix(",Shock"), "missing column 27 'Shock'"),
        (
            "phenotyping",
            PHENO_HEADER.replace("Shock", "shock"),
            "column 27 is 'shock', expected 'Shock'",
        ),
    ],
)
def test_bad_listfile_headers_name_file_and_column(tmp_path, task, header, message):
    path = tmp_path / "train_listfile.csv"
    path.write_text(header + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        read_listfile(path, task, tmp_path)
    assert str(path) in str(info.value)


def test_a_listfile_with_a_byte_order_mark_is_read(ihm_dir):
    path = ihm_dir / "train_listfile.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert len(read_task_split(ihm_dir, "train").records) == 2


def test_unreadable_listfiles_name_the_file(ihm_dir, fifo_at):
    path = ihm_dir / "train_listfile.csv"
    path.write_bytes(path.read_bytes() + b"10011_episode2_timeseries.csv,\xff\n")
    with pytest.raises(ValueError, match=r"train_listfile\.csv: not UTF-8 text: .*byte 0xff"):
        read_task_split(ihm_dir, "train")
    path.unlink()
    fifo_at(path)
    with pytest.raises(ValueError, match=r"train_listfile\.csv: not a regular file \(a FIFO\)"):
        read_task_split(ihm_dir, "train")


def test_missing_episode_files_are_counted_rejections(ihm_dir):
    (ihm_dir / "train" / "41976_episode4_timeseries.csv").unlink()
    listfile = read_task_split(ihm_dir, "train")
    assert [r.stay for r in listfile.records] == ["10011_episode1_timeseries.csv"]
    (rejected,) = listfile.rejected
    assert rejected.reject_reason is RejectReason.MISSING_FILE
    assert "line 3" in rejected.detail and "41976_episode4_timeseries.csv" in rejected.detail


def test_bad_rows_and_duplicates_are_counted_rejections(tmp_path):
    names = [f"1000{i}_episode1_timeseries.csv" for i in range(3)]
    text = (
        "stay,y_true\n"
        f"{names[0]},1\n"
        f"{names[1]},2\n"  # label not 0/1
        "notes.csv,0\n"  # not a stay name
        f"{names[2]},0,9\n"  # extra field
        f"{names[0]},0\n"  # listed twice
        "\n"  # blank lines are not stays
    )
    task_dir = make_task_dir(tmp_path, "in-hospital-mortality", {"train": text}, {"train": names})
    listfile = read_task_split(task_dir, "train")
    assert [r.stay for r in listfile.records] == [names[0]]
    reasons = [(r.reject_reason, r.detail.split(": ", 2)[-1]) for r in listfile.rejected]
    assert reasons == [
        (RejectReason.BAD_LISTFILE_ROW, "column 'y_true': '2' is not 0 or 1"),
        (
            RejectReason.BAD_LISTFILE_ROW,
            "column 'stay': 'notes.csv' is not '<SUBJECT_ID>_episode<N>_timeseries.csv'",
        ),
        (RejectReason.BAD_LISTFILE_ROW, "3 fields, expected 2"),
        (RejectReason.DUPLICATE_STAY, f"{names[0]} is listed again"),
    ]


def test_phenotyping_period_length_must_be_positive(tmp_path):
    row = ",".join(["10006_episode1_timeseries.csv", "0", *["0"] * 25])
    task_dir = make_task_dir(
        tmp_path, "phenotyping", {"train": f"{PHENO_HEADER}\n{row}\n"}, {"train": []}
    )
    (rejected,) = read_task_split(task_dir, "train").rejected
    assert "period_length" in rejected.detail


def test_split_and_task_arguments(tmp_path, ihm_dir):
    with pytest.raises(ValueError, match="split must be one of"):
        read_task_split(ihm_dir, "validation")
    other = tmp_path / "my-ihm"
    other.mkdir()
    with pytest.raises(ValueError, match="cannot tell the task"):
        read_task_split(other, "train")
    with pytest.raises(FileNotFoundError):
        read_task_split(other, "train", task="in-hospital-mortality")
    assert listfile_header("in-hospital-mortality", True) == (
        "stay",
        "period_length",
        "stay_id",
        "y_true",
    )
    assert listfile_header(Task.PHENOTYPING, False)[:3] == (
        "stay",
        "period_length",
        PHENOTYPE_LABELS[0],
    )

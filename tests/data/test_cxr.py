"""MIMIC-CXR-JPG metadata reading, MedFuse stay-image linking and image loading."""

from __future__ import annotations

import gzip
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from omnifuse_model.data.cxr.images import (
    MAX_IMAGE_PIXELS,
    ImageReadError,
    cxr_image_path,
    find_metadata_file,
    link_stays_to_images,
    load_cxr_image,
    open_cxr_image,
    parse_study_datetime,
    read_cxr_metadata,
    read_stays,
)

# The real header (design/MIMIC_FORMATS.md section 3), typed out rather than imported.
HEADER = (
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
    "StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
    "PatientOrientationCodeSequence_CodeMeaning"
)
SUBJECT = "10000032"
DICOM = "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"


def row(dicom_id: str, view: str, date: str, time: str, subject=SUBJECT, study="50414267"):
    return (
        f"{dicom_id},{subject},{study},CHEST (PORTABLE AP),{view},3056,2544,{date},{time},"
        "CHEST (PORTABLE AP),antero-posterior,Erect"
    )


def write_metadata(tmp_path: Path, *rows: str, gz: bool = False) -> Path:
    text = "\n".join([HEADER, *rows]) + "\n"
    if gz:
        path = tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz"
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path = tmp_path / "mimic-cxr-2.0.0-metadata.csv"
        path.write_text(text)
    return path


def stays(*rows: tuple[str, str, str, str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["subject_id", "stay_id", "intime", "outtime"])


# One stay: in 2180-05-06 10:00:00, out 2180-05-09 10:00:00 (72 h).
STAY = stays((SUBJECT, "30000001", "2180-05-06 10:00:00", "2180-05-09 10:00:00"))


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize(
    ("time", "expected"),
    [
        ("80556.875", datetime(2180, 5, 6, 8, 5, 56)),
        ("213014", datetime(2180, 5, 6, 21, 30, 14)),
        ("213014.0", datetime(2180, 5, 6, 21, 30, 14)),
        (" 59.999 ", datetime(2180, 5, 6, 0, 0, 59)),
        ("0", datetime(2180, 5, 6, 0, 0, 0)),
        ("235959.999", datetime(2180, 5, 6, 23, 59, 59)),
    ],
)
def test_study_time_is_truncated_hhmmss(time: str, expected: datetime) -> None:
    assert parse_study_datetime("21800506", time) == expected


@pytest.mark.parametrize("time", ["abc", "", "-1", "nan", "inf", "240000", "236000", "1000000"])
def test_bad_study_time_raises_naming_value(time: str) -> None:
    with pytest.raises(ValueError, match="StudyTime"):
        parse_study_datetime("21800506", time)


def test_metadata_rows_parse_like_the_single_row_parser(tmp_path: Path) -> None:
    times = ["80556.875", "213014", "213014.0", "0", "235959.999"]
    path = write_metadata(
        tmp_path, *(row(f"d{i}", "AP", "21800506", t) for i, t in enumerate(times))
    )
    images = read_cxr_metadata(path).images
    assert list(images["study_datetime"]) == [
        pd.Timestamp(parse_study_datetime("21800506", t)) for t in times
    ]
    assert images["study_time"].tolist() == [80556.875, 213014.0, 213014.0, 0.0, 235959.999]
    assert images["subject_id"].dtype == np.int64


def test_malformed_metadata_rows_are_counted_by_reason(tmp_path: Path) -> None:
    path = write_metadata(
        tmp_path,
        row(DICOM, "AP", "21800506", "80556.875"),
        row("ok-2", "", "21800506", "80556"),  # blank ViewPosition is valid, just not AP
        row("ok-3", "PA", "21800506.0", "80556", subject="10000032.0"),  # float round trip
        row(DICOM, "AP", "21800506", "90000"),  # repeat of the first dicom_id
        row("", "AP", "21800506", "80556"),
        row("../escape", "AP", "21800506", "80556"),
        row("bad-subject", "AP", "21800506", "80556", subject="p10000032"),
        row("short-subject", "AP", "21800506", "80556", subject="7"),
        row("bad-study", "AP", "21800506", "80556", study="s50414267"),
        row("bad-date", "AP", "2180-05-06", "80556"),
        row("bad-month", "AP", "21801306", "80556"),
        row("bad-time", "AP", "21800506", "8:05:56"),
        row("bad-clock", "AP", "21800506", "86000"),
    )
    metadata = read_cxr_metadata(path)
    assert metadata.rows_read == 13
    assert metadata.images["dicom_id"].tolist() == [DICOM, "ok-2", "ok-3"]
    assert metadata.images["view_position"].tolist() == ["AP", "", "PA"]
    assert dict(metadata.rejections) == {
        "duplicate_dicom_id": 1,
        "missing_dicom_id": 1,
        "bad_dicom_id": 1,
        "bad_subject_id": 2,
        "bad_study_id": 1,
        "bad_study_date": 2,
        "bad_study_time": 2,
    }


def test_gzipped_metadata_and_lookup(tmp_path: Path) -> None:
    write_metadata(tmp_path, row(DICOM, "AP", "21800506", "80556.875"), gz=True)
    path = find_metadata_file(tmp_path)
    assert path.name == "mimic-cxr-2.0.0-metadata.csv.gz"
    assert read_cxr_metadata(path).images["dicom_id"].tolist() == [DICOM]
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-metadata.csv"):
        find_metadata_file(tmp_path / "elsewhere")


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = tmp_path / "meta.csv"
    path.write_text("dicom_id,subject_id,study_id,ViewPosition,StudyDate\nx,10000032,5,AP,1\n")
    with pytest.raises(ValueError, match=r"meta\.csv.*StudyTime"):
        read_cxr_metadata(path)


def test_image_path_layout() -> None:
    assert cxr_image_path(10000032, 50414267, DICOM) == (
        f"files/p10/p10000032/s50414267/{DICOM}.jpg"
    )
    with pytest.raises(ValueError, match="dicom_id"):
        cxr_image_path(10000032, 50414267, "a/b")


# --------------------------------------------------------------------------- linking


def linked(tmp_path: Path, *rows: str, task="in-hospital-mortality", table=STAY, **kw):
    metadata = read_cxr_metadata(write_metadata(tmp_path, *rows))
    return link_stays_to_images(metadata, table, task, **kw)


@pytest.mark.parametrize(
    ("date", "time", "inside"),
    [
        ("21800506", "95959", False),  # 1 s before intime
        ("21800506", "100000", True),  # exactly intime
        ("21800508", "100000", True),  # exactly intime + 48 h
        ("21800508", "100000.999", True),  # fraction dropped, as MedFuse does
        ("21800508", "100001", False),  # 1 s after intime + 48 h
    ],
)
def test_mortality_window_is_inclusive_48_hours(tmp_path, date, time, inside) -> None:
    result = linked(tmp_path, row(DICOM, "AP", date, time))
    assert [r.stay_id for r in result.records] == ([30000001] if inside else [])
    assert result.counts["stays_without_image"] == (0 if inside else 1)


@pytest.mark.parametrize(
    ("date", "time", "inside"),
    [
        ("21800506", "95959", False),
        ("21800506", "100000", True),
        ("21800508", "220000", True),  # past 48 h, before outtime
        ("21800509", "100000", True),  # exactly outtime
        ("21800509", "100001", False),
    ],
)
def test_phenotyping_window_ends_at_outtime(tmp_path, date, time, inside) -> None:
    result = linked(tmp_path, row(DICOM, "AP", date, time), task="phenotyping")
    assert len(result.records) == (1 if inside else 0)


def test_latest_image_with_path_and_ids(tmp_path: Path) -> None:
    result = linked(
        tmp_path,
        row("early", "AP", "21800506", "120000", study="50000001"),
        row("latest", "AP", "21800507", "080000", study="50000003"),
        row("middle", "AP", "21800506", "230000", study="50000002"),
    )
    (record,) = result.records
    assert (record.dicom_id, record.study_id, record.subject_id) == ("latest", 50000003, 10000032)
    assert record.study_datetime == datetime(2180, 5, 7, 8, 0, 0)
    assert record.path == "files/p10/p10000032/s50000003/latest.jpg"
    assert result.counts["images_in_window"] == 3


def test_tie_within_one_second_goes_to_later_fraction(tmp_path: Path) -> None:
    result = linked(
        tmp_path,
        row("later-fraction", "AP", "21800507", "080000.9"),
        row("earlier-fraction", "AP", "21800507", "080000.1"),
    )
    assert result.records[0].dicom_id == "later-fraction"


def test_view_position_filter(tmp_path: Path) -> None:
    rows = (
        row("ap", "AP", "21800506", "120000"),
        row("pa-later", "PA", "21800506", "130000"),
        row("lateral-latest", "LATERAL", "21800506", "140000"),
    )
    assert linked(tmp_path, *rows).records[0].dicom_id == "ap"
    assert linked(tmp_path, *rows, view_positions=("PA",)).records[0].dicom_id == "pa-later"
    assert linked(tmp_path, *rows, view_positions=None).records[0].dicom_id == "lateral-latest"
    assert linked(tmp_path, *rows, view_positions=("LL",)).records == []


def test_each_stay_of_a_subject_gets_its_own_window(tmp_path: Path) -> None:
    table = stays(
        (SUBJECT, "30000002", "2180-06-01 00:00:00", "2180-06-02 00:00:00"),
        (SUBJECT, "30000001", "2180-05-06 10:00:00", "2180-05-09 10:00:00"),
        ("10000099", "30000003", "2180-05-06 10:00:00", "2180-05-09 10:00:00"),
    )
    result = linked(
        tmp_path,
        row("first-stay", "AP", "21800507", "000000"),
        row("second-stay", "AP", "21800601", "120000", study="50000009"),
        table=table,
    )
    assert {r.stay_id: r.dicom_id for r in result.records} == {
        30000001: "first-stay",
        30000002: "second-stay",
    }
    assert [r.stay_id for r in result.records] == [30000001, 30000002]
    assert result.counts["stays_without_image"] == 1


def test_bad_stay_rows_are_counted(tmp_path: Path) -> None:
    table = stays(
        (SUBJECT, "30000001", "2180-05-06 10:00:00", "2180-05-09 10:00:00"),
        (SUBJECT, "30000001", "2180-05-06 10:00:00", "2180-05-09 10:00:00"),
        (SUBJECT, "30000004", "not a time", "2180-05-09 10:00:00"),
        (SUBJECT, "30000005", "2180-05-06 10:00:00", ""),
        ("x", "30000006", "2180-05-06 10:00:00", "2180-05-09 10:00:00"),
        (SUBJECT, "", "2180-05-06 10:00:00", "2180-05-09 10:00:00"),
    )
    rows = [row(DICOM, "AP", "21800506", "120000")]
    ihm = linked(tmp_path, *rows, table=table)
    assert dict(ihm.rejections) == {
        "duplicate_stay_id": 1,
        "bad_intime": 1,
        "bad_subject_id": 1,
        "bad_stay_id": 1,
    }
    assert {r.stay_id for r in ihm.records} == {30000001, 30000005}  # IHM needs no outtime
    pheno = linked(tmp_path, *rows, table=table, task="phenotyping")
    assert pheno.rejections["bad_outtime"] == 1
    assert {r.stay_id for r in pheno.records} == {30000001}


@pytest.mark.parametrize(
    "intime",
    [
        "2180-05-06 10:00:00+05:00",  # pandas raised "Mixed timezones detected"
        "2180-05-06 10:00:00+00:00",  # a timezone-aware column failed astype with a traceback
        "2262-04-11 00:00:00",  # intime + 48 h overflowed
        "9999-01-01 00:00:00",
        "05/06/2180 10:00",
    ],
)
def test_stay_times_out_of_format_or_range_are_bad_intime(tmp_path: Path, intime: str) -> None:
    path = tmp_path / "all_stays.csv"
    path.write_text(
        "SUBJECT_ID,ICUSTAY_ID,INTIME,OUTTIME\n"
        f"{SUBJECT},30000001,{intime},2180-05-09 10:00:00\n"
        f"{SUBJECT},30000002,2180-05-06 10:00:00,2180-05-09 10:00:00\n"
    )
    for task in ("in-hospital-mortality", "phenotyping"):
        table = read_stays(path)
        result = linked(tmp_path, row(DICOM, "AP", "21800506", "120000"), task=task, table=table)
        assert dict(result.rejections) == {"bad_intime": 1}, task
        assert [r.stay_id for r in result.records] == [30000002]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "cannot read the stays table"),
        (b"SUBJECT_ID,ICUSTAY_ID,INTIME,OUTTIME\n1\xff,2,3,4\n", "cannot read the stays table"),
    ],
)
def test_unreadable_stays_files_are_named(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "all_stays.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"all_stays\.csv: {message}"):
        read_stays(path)


def test_mimic3_and_mimic4_stays_files(tmp_path: Path) -> None:
    mimic3 = tmp_path / "all_stays_iii.csv"
    mimic3.write_text(
        "SUBJECT_ID,HADM_ID,ICUSTAY_ID,LAST_CAREUNIT,DBSOURCE,INTIME,OUTTIME,LOS\n"
        f"{SUBJECT},20000001,30000001,MICU,metavision,2180-05-06 10:00:00,"
        "2180-05-09 10:00:00,3.0\n"
    )
    mimic4 = tmp_path / "all_stays_iv.csv"
    mimic4.write_text(
        "subject_id,hadm_id,stay_id,last_careunit,intime,outtime,los\n"
        f"{SUBJECT},20000001,30000001,MICU,2180-05-06 10:00:00,2180-05-09 10:00:00,3.0\n"
    )
    for path in (mimic3, mimic4):
        table = read_stays(path)
        assert list(table.columns) == ["subject_id", "stay_id", "intime", "outtime"]
        result = linked(tmp_path, row(DICOM, "AP", "21800507", "120000"), table=table)
        assert [r.stay_id for r in result.records] == [30000001]
    (tmp_path / "odd.csv").write_text("subject,icu,in,out\n1,2,3,4\n")
    with pytest.raises(ValueError, match=r"odd\.csv: no subject_id column"):
        read_stays(tmp_path / "odd.csv")


def test_unknown_task_and_missing_stay_column(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="decompensation"):
        linked(tmp_path, row(DICOM, "AP", "21800506", "120000"), task="decompensation")
    with pytest.raises(ValueError, match="outtime"):
        linked(tmp_path, row(DICOM, "AP", "21800506", "120000"), table=STAY.drop(columns="outtime"))


# --------------------------------------------------------------------------- images

# (value - ImageNet mean) / std, worked by hand for each channel.
GREY_128 = (0.0740646, 0.2051821, 0.4264924)  # 128 / 255 = 0.5019608
WHITE = (2.2489083, 2.4285714, 2.6400000)  # 1.0
BLACK = (-2.1179039, -2.0357143, -1.8044444)  # 0.0
HALF_16BIT = (0.0655355, 0.1964626, 0.4178117)  # 32768 / 65535 = 0.5000076


def assert_constant(tensor: torch.Tensor, expected: tuple[float, float, float]) -> None:
    assert tensor.shape == (3, 224, 224)
    assert tensor.dtype == torch.float32
    for channel, value in enumerate(expected):
        torch.testing.assert_close(
            tensor[channel], torch.full((224, 224), value), atol=1e-5, rtol=0
        )


def test_grayscale_constant_image(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.new("L", (40, 30), 128).save(path)
    assert_constant(load_cxr_image(path), GREY_128)


def test_rgb_constant_image_keeps_channels(tmp_path: Path) -> None:
    path = tmp_path / "rgb.png"
    Image.new("RGB", (17, 23), (255, 0, 128)).save(path)
    tensor = load_cxr_image(path)
    assert_constant(tensor[[0, 0, 2]], (WHITE[0], WHITE[0], GREY_128[2]))
    torch.testing.assert_close(tensor[1], torch.full((224, 224), BLACK[1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("value", "expected"), [(32768, HALF_16BIT), (65535, WHITE), (0, BLACK)])
def test_16_bit_png_uses_the_16_bit_range(tmp_path: Path, value: int, expected) -> None:
    path = tmp_path / "sixteen.png"
    Image.fromarray(np.full((20, 30), value, dtype=np.uint16)).save(path)
    with Image.open(path) as image:
        assert image.mode in ("I;16", "I")
    assert_constant(load_cxr_image(path), expected)


def test_32_bit_integer_mode_within_16_bit_range(tmp_path: Path) -> None:
    path = tmp_path / "int.tif"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.int32), mode="I").save(path)
    assert_constant(load_cxr_image(path), HALF_16BIT)
    Image.fromarray(np.full((8, 8), 70000, dtype=np.int32), mode="I").save(path)
    with pytest.raises(ImageReadError, match="unsupported_image") as caught:
        load_cxr_image(path)
    assert caught.value.reason == "unsupported_image"


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (900, 700)])
def test_any_size_jpeg_gives_224(tmp_path: Path, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
    path = tmp_path / "x.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    tensor = load_cxr_image(path)
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32
    assert torch.isfinite(tensor).all()
    # grey replicated to the three channels before normalisation
    torch.testing.assert_close(tensor[0] * 0.229 + 0.485, tensor[1] * 0.224 + 0.456)
    lo, hi = BLACK[0] - 1e-5, WHITE[0] + 1e-5
    assert lo <= tensor[0].min() and tensor[0].max() <= hi


def test_constant_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "grey.jpg"
    Image.new("L", (64, 48), 128).save(path, quality=95)
    assert_constant(load_cxr_image(path), GREY_128)


def test_corrupt_truncated_and_missing_images(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(ImageReadError, match="garbage.jpg") as caught:
        load_cxr_image(garbage)
    assert caught.value.reason == "unreadable_image"
    assert caught.value.path == str(garbage)

    truncated = tmp_path / "truncated.jpg"
    noise = np.random.default_rng(1).integers(0, 256, size=(64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(ImageReadError) as caught:
        load_cxr_image(truncated)
    assert caught.value.reason == "unreadable_image"

    with pytest.raises(ImageReadError, match="missing_image"):
        load_cxr_image(tmp_path / "absent.jpg")


@pytest.mark.parametrize(
    ("width", "height", "cause"),
    [(30000, 30000, "DecompressionBombError"), (10000, 10000, "Warning"), (8000, 7000, "cap")],
)
def test_bombs_and_oversized_images_are_rejected_by_name(
    tmp_path: Path, jpeg_declaring, width: int, height: int, cause: str
) -> None:
    path = jpeg_declaring(tmp_path / "bomb.jpg", width, height)
    if cause == "DecompressionBombError":  # what used to abort all of `prepare`
        with pytest.raises(Image.DecompressionBombError):
            Image.open(path)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # the header really declares that size
                assert image.size == (width, height)
    with pytest.raises(ImageReadError) as caught:
        load_cxr_image(path)
    assert caught.value.reason == "oversized_image"
    assert caught.value.path == str(path)
    if cause == "cap":
        assert f"{width} x {height}" in caught.value.detail
        assert str(MAX_IMAGE_PIXELS) in caught.value.detail
    with pytest.raises(ImageReadError, match="oversized_image"), open_cxr_image(path):
        pass

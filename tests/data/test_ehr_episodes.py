"""Tolerant ingest: every kind of bad episode is repaired or rejected by name, never raised."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from omnifuse_model.data.ehr.discretizer import FEATURE_HEADER, discretize_episode
from omnifuse_model.data.ehr.episodes import (
    EpisodeReport,
    EpisodeStatus,
    RejectReason,
    RepairReason,
    discretize_episode_tolerant,
    normalize_category,
    read_episode,
    summarize_reports,
)

HR, MASK_HR = 50, 67


def tolerant(path, timestep=2.0, end=48.0, **kwargs):
    return discretize_episode_tolerant(path, timestep, end, **kwargs)


def test_valid_episode_is_used_unchanged(write_episode):
    path = write_episode(
        ("-0.5", {"hr": "82", "total": "15"}),
        ("3.0", {"eye": "To Pain", "crr": "1.0"}),
        ("60.0", {"hr": "junk beyond the window is never read"}),
    )
    x, header, report = tolerant(path)
    np.testing.assert_array_equal(x, discretize_episode(path)[0])
    assert header == list(FEATURE_HEADER)
    assert report.status is EpisodeStatus.USED and report.repairs == {}
    assert (report.rows_read, report.rows_used) == (3, 2)


@pytest.mark.parametrize(
    ("content", "reason", "detail"),
    [
        ("", RejectReason.EMPTY_FILE, "no text"),
        ("\n\n  \n", RejectReason.EMPTY_FILE, "no text"),
        ("{header}\n", RejectReason.NO_ROWS, "no data rows"),
        ("{header}\n\n", RejectReason.NO_ROWS, "no data rows"),
        ("\n{header}\n{row}\n", RejectReason.BAD_HEADER, "first line is blank"),
        ("{header_no_ph}\n1.0" + "," * 16 + "\n", RejectReason.BAD_HEADER, "missing columns"),
        ("{header},Urine\n{row},5\n", RejectReason.BAD_HEADER, "unexpected columns ['Urine']"),
        ("hours,{rest}\n{row}\n", RejectReason.BAD_HEADER, "missing columns ['Hours']"),
        ("{header}\n{row}\n2.0,,,80\n", RejectReason.SHORT_ROW, "line 3 has 4 fields"),
        ("{header}\n{row},\n", RejectReason.LONG_ROW, "line 2 has 19 fields"),
        ("{header}\nabc" + "," * 17 + "\n", RejectReason.UNPARSEABLE_HOURS, "'abc'"),
        ("{header}\nnan,,,,,,,,,82" + "," * 8 + "\n", RejectReason.UNPARSEABLE_HOURS, "'nan'"),
        ("{header}\n,,,,,,,,,82" + "," * 8 + "\n", RejectReason.UNPARSEABLE_HOURS, "Hours ''"),
        ("{header}\n{junk_hr}\n", RejectReason.UNPARSEABLE_VALUE, "'Heart Rate': 'high'"),
        ("{header}\n{sleepy}\n", RejectReason.UNKNOWN_CATEGORY, "'Sleepy' is not one of"),
        ("{header}\n{gcs_15_5}\n", RejectReason.UNKNOWN_CATEGORY, "'15.5'"),
    ],
)
def test_bad_episodes_are_rejected_with_a_named_reason(
    write_raw, header_line, make_line, content, reason, detail
):
    text = content.format(
        header=header_line,
        header_no_ph=header_line.removesuffix(",pH"),
        rest=header_line.removeprefix("Hours,"),
        row=make_line("1.0", hr="80"),
        junk_hr=make_line("1.0", hr="high"),
        sleepy=make_line("1.0", eye="Sleepy"),
        gcs_15_5=make_line("1.0", total="15.5"),
    )
    path = write_raw(text)
    x, header, report = tolerant(path)
    assert x is None and header == list(FEATURE_HEADER)
    assert report.status is EpisodeStatus.REJECTED
    assert report.reject_reason is reason
    assert detail in report.detail and str(path) in report.detail


def test_missing_and_unreadable_files_are_rejected(tmp_path, write_raw, header_line):
    _, _, missing = tolerant(tmp_path / "nowhere.csv")
    assert missing.reject_reason is RejectReason.MISSING_FILE
    latin1 = write_raw(f"{header_line}\n1.0,,,,\xe9".encode("latin-1"))
    _, _, unreadable = tolerant(latin1)
    assert unreadable.reject_reason is RejectReason.UNREADABLE_FILE


def test_a_fifo_is_rejected_without_being_opened(tmp_path, fifo_at):
    """A FIFO in place of an episode CSV used to block `omnifuse prepare` forever."""
    x, _, report = tolerant(fifo_at(tmp_path / "10011_episode1_timeseries.csv"))
    assert x is None and report.reject_reason is RejectReason.NOT_REGULAR_FILE
    assert "10011_episode1_timeseries.csv: not a regular file (a FIFO)" in report.detail


def test_blank_rows_are_dropped_and_counted(write_raw, header_line, make_line):
    rows = [make_line("0.5", hr="82"), make_line("3.0", hr="90")]
    clean = write_raw("\n".join([header_line, *rows]) + "\n", name="clean.csv")
    messy_text = "\n".join([header_line, rows[0], "", "," * 17, "   ", rows[1], ""]) + "\n"
    x, _, report = tolerant(write_raw(messy_text, name="messy.csv"))
    np.testing.assert_array_equal(x, discretize_episode(clean)[0])
    assert report.status is EpisodeStatus.REPAIRED
    assert report.repairs == {RepairReason.BLANK_ROWS: 4}


def test_reordered_columns_are_mapped_back(write_episode, header_line):
    columns = header_line.split(",")
    shuffled = [columns[9], *columns[:9], *columns[10:]][::-1]  # any permutation
    rows = [("0.5", {"hr": "82", "total": "15"}), ("3.0", {"eye": "To Pain"})]
    x, _, report = tolerant(write_episode(*rows, name="shuffled.csv", columns=shuffled))
    np.testing.assert_array_equal(x, discretize_episode(write_episode(*rows))[0])
    assert report.repairs == {RepairReason.REORDERED_COLUMNS: 1}


def test_byte_order_mark_is_removed(write_raw, header_line, make_line):
    x, _, report = tolerant(write_raw(f"\ufeff{header_line}\n{make_line('1.0', hr='80')}\n"))
    assert x[0, HR] == 80 and report.repairs == {RepairReason.BYTE_ORDER_MARK: 1}


def test_unsorted_hours_are_stably_sorted(write_episode):
    x, _, report = tolerant(
        write_episode(("5.0", {"hr": "90"}), ("1.0", {"hr": "70"}), ("1.0", {"hr": "80"}))
    )
    # sorted: 1.0 (70), 1.0 (80), 5.0 (90): the later 1.0 row wins bin 0; 5.0 -> bin 2
    assert x[:4, HR].tolist() == [80, 80, 90, 90]
    assert x[:4, MASK_HR].tolist() == [1, 0, 1, 0]
    assert report.repairs == {RepairReason.UNSORTED_HOURS: 1}  # one inversion: 5.0 > 1.0
    result = read_episode(write_episode(("5.0", {}), ("1.0", {}), ("1.0", {}), name="l.csv"))
    assert result.hours == [1.0, 1.0, 5.0] and result.lines == [3, 4, 2]


def test_hours_far_below_zero_are_dropped_and_counted(write_episode):
    path = write_episode(
        ("-5.0", {"hr": "60"}),
        ("-2.0", {"hr": "65"}),  # int(-1 - eps) = -1 at timestep 2: dropped
        ("-1.0", {"hr": "70"}),  # int(-0.5 - eps) = 0: kept in bin 0
        ("3.0", {"dbp": "50"}),
    )
    x, _, report = tolerant(path)
    assert x[0, HR] == 70 and x[0, MASK_HR] == 1 and x[1, HR] == 70
    assert report.repairs == {RepairReason.HOURS_BEFORE_WINDOW: 2}
    assert (report.rows_read, report.rows_used) == (4, 2)


def test_every_row_before_bin_zero_with_open_end_is_an_empty_window(write_episode):
    path = write_episode(("-5.0", {"hr": "60"}))
    x, _, report = tolerant(path, 1.0, None)
    assert x is None and report.reject_reason is RejectReason.EMPTY_WINDOW


def test_row_past_the_last_bin_is_dropped(write_episode):
    # timestep 0.5: 96 bins; 48.0000008 <= 48 + eps but int(96.0000016 - eps) = 96.
    path = write_episode(("1.0", {"hr": "80"}), ("48.0000008", {"hr": "99"}))
    with pytest.raises(ValueError, match="bin 96"):
        discretize_episode(path, 0.5, 48.0)
    x, _, report = tolerant(path, 0.5, 48.0)
    assert x.shape == (96, 76) and x[95, HR] == 80
    assert report.repairs == {RepairReason.HOURS_AFTER_LAST_BIN: 1}


@pytest.mark.parametrize(
    ("alias", "variant", "canonical"),
    [
        ("total", "15.0", "15"),
        ("total", " 15", "15"),
        ("total", "3.00", "3"),
        ("crr", "0", "0.0"),
        ("crr", "1", "1.0"),
        ("verbal", "confused", "Confused"),
        ("verbal", "1.0 et/trach", "1.0 ET/Trach"),
        ("eye", "4  spontaneously ", "4 Spontaneously"),
        ("eye", "to speech", "To Speech"),
        ("eye", "3 TO SPEECH", "3 To speech"),
        ("motor", "no response", "No response"),
    ],
)
def test_obvious_category_variants_are_normalised(write_episode, alias, variant, canonical):
    x, _, report = tolerant(write_episode(("1.0", {alias: variant}), name="variant.csv"))
    np.testing.assert_array_equal(
        x, discretize_episode(write_episode(("1.0", {alias: canonical})))[0]
    )
    assert report.repairs == {RepairReason.CATEGORY_VARIANT: 1}


def test_normalize_category_refuses_ambiguity():
    assert normalize_category("yes", ("Yes", "YES")) is None
    assert normalize_category("1.00", ("1", "1.0")) is None
    assert normalize_category("1.00", ("1", "2")) == "1"
    assert normalize_category("Sleepy", ("Awake",)) is None
    assert normalize_category("nan", ("1", "2")) is None


def test_whitespace_cells_read_as_not_charted(write_episode):
    x, _, report = tolerant(write_episode(("1.0", {"hr": "80"}), ("3.0", {"hr": "  "})))
    assert x[1, HR] == 80 and x[1, MASK_HR] == 0
    assert report.repairs == {RepairReason.WHITESPACE_CELL: 1}


def test_nonfinite_values_read_as_not_charted_by_default(write_episode):
    path = write_episode(("1.0", {"hr": "80"}), ("3.0", {"hr": "nan", "temp": "1e300"}))
    x, _, report = tolerant(path)
    assert x[1, HR] == 80 and x[1, MASK_HR] == 0 and x[1, 56] == np.float32(36.6)
    assert report.repairs == {RepairReason.NONFINITE_VALUE: 2}
    kept, _, as_is = tolerant(path, drop_nonfinite=False)
    assert math.isnan(kept[1, HR]) and as_is.status is EpisodeStatus.USED
    np.testing.assert_array_equal(kept, discretize_episode(path)[0])


def test_tolerant_mode_rejects_bad_arguments_loudly(write_episode):
    path = write_episode(("1.0", {"hr": "80"}))
    with pytest.raises(ValueError, match="timestep"):
        tolerant(path, timestep=-1.0)
    with pytest.raises(ValueError, match="end must be"):
        tolerant(path, end=math.nan)


def test_summary_accounts_for_every_episode(tmp_path, write_episode):
    reports = [
        tolerant(write_episode(("1.0", {"hr": "80"}), name="ok.csv"))[2],
        tolerant(write_episode(("1.0", {"total": "15.0"}), ("3.0", {"crr": "1"}), name="v.csv"))[2],
        tolerant(write_episode(("5.0", {}), ("1.0", {}), name="unsorted.csv"))[2],
        tolerant(write_episode(("1.0", {"eye": "Sleepy"}), name="bad.csv"))[2],
        tolerant(tmp_path / "gone.csv")[2],
    ]
    summary = summarize_reports(reports)
    assert (summary.episodes, summary.used, summary.repaired, summary.rejected) == (5, 1, 2, 2)
    assert summary.rejected_by_reason == {"missing_file": 1, "unknown_category": 1}
    assert summary.repaired_by_reason == {"category_variant": 1, "unsorted_hours": 1}
    assert summary.repair_counts == {"category_variant": 2, "unsorted_hours": 1}
    json.dumps(summary.to_dict())
    assert json.loads(json.dumps(reports[1].to_dict()))["repairs"] == {"category_variant": 2}


def test_report_status_follows_repairs_and_rejection():
    report = EpisodeReport(path="x.csv")
    assert report.status is EpisodeStatus.USED
    report.add_repair(RepairReason.BLANK_ROWS, 0)
    assert report.status is EpisodeStatus.USED
    report.add_repair(RepairReason.BLANK_ROWS, 2)
    assert report.status is EpisodeStatus.REPAIRED
    report.reject(RejectReason.NO_ROWS, "x.csv: nothing")
    assert report.status is EpisodeStatus.REJECTED

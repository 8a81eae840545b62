"""The benchmark discretiser: layout, bin edges, imputation, overwrite; every value by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from omnifuse_model.data.ehr.discretizer import (
    CATEGORY_VALUES,
    CHANNEL_OFFSETS,
    CHANNELS,
    CONTINUOUS_COLUMNS,
    EPISODE_HEADER,
    FEATURE_HEADER,
    IS_CATEGORICAL,
    MASK_COLUMNS,
    NORMAL_VALUES,
    NUM_FEATURES,
    discretize_episode,
    discretize_rows,
    read_episode_csv,
)

# Output columns by hand (design/MIMIC_FORMATS.md 1b).
HR, DBP, TEMP = 50, 2, 56
MASK_HR, MASK_DBP, MASK_CRR, MASK_EYE = 67, 60, 59, 62

# Every categorical value and its output column, counted by hand from the config-list order.
ONE_HOT_COLUMNS = [
    ("crr", "0.0", 0),
    ("crr", "1.0", 1),
    ("eye", "To Pain", 4),
    ("eye", "3 To speech", 5),
    ("eye", "1 No Response", 6),
    ("eye", "4 Spontaneously", 7),
    ("eye", "None", 8),
    ("eye", "To Speech", 9),
    ("eye", "Spontaneously", 10),
    ("eye", "2 To pain", 11),
    ("motor", "1 No Response", 12),
    ("motor", "3 Abnorm flexion", 13),
    ("motor", "Abnormal extension", 14),
    ("motor", "No response", 15),
    ("motor", "4 Flex-withdraws", 16),
    ("motor", "Localizes Pain", 17),
    ("motor", "Flex-withdraws", 18),
    ("motor", "Obeys Commands", 19),
    ("motor", "Abnormal Flexion", 20),
    ("motor", "6 Obeys Commands", 21),
    ("motor", "5 Localizes Pain", 22),
    ("motor", "2 Abnorm extensn", 23),
    ("total", "11", 24),
    ("total", "10", 25),
    ("total", "13", 26),
    ("total", "12", 27),
    ("total", "15", 28),
    ("total", "14", 29),
    ("total", "3", 30),
    ("total", "5", 31),
    ("total", "4", 32),
    ("total", "7", 33),
    ("total", "6", 34),
    ("total", "9", 35),
    ("total", "8", 36),
    ("verbal", "1 No Response", 37),
    ("verbal", "No Response", 38),
    ("verbal", "Confused", 39),
    ("verbal", "Inappropriate Words", 40),
    ("verbal", "Oriented", 41),
    ("verbal", "No Response-ETT", 42),
    ("verbal", "5 Oriented", 43),
    ("verbal", "Incomprehensible sounds", 44),
    ("verbal", "1.0 ET/Trach", 45),
    ("verbal", "4 Confused", 46),
    ("verbal", "2 Incomp sounds", 47),
    ("verbal", "3 Inapprop words", 48),
]
BLOCKS = {"crr": (0, 2), "eye": (4, 12), "motor": (12, 24), "total": (24, 37), "verbal": (37, 49)}
NAMES = {
    "crr": "Capillary refill rate",
    "eye": "Glascow coma scale eye opening",
    "motor": "Glascow coma scale motor response",
    "total": "Glascow coma scale total",
    "verbal": "Glascow coma scale verbal response",
}
MASK_OF = {"crr": 59, "eye": 62, "motor": 63, "total": 64, "verbal": 65}


def normal_bin() -> np.ndarray:
    """A bin with nothing observed: every channel at its normal value, every mask 0."""
    row = np.zeros(NUM_FEATURES, dtype=np.float32)
    row[0] = 1  # CRR "0.0"
    row[7] = 1  # eye "4 Spontaneously"
    row[21] = 1  # motor "6 Obeys Commands"
    row[28] = 1  # total "15"
    row[43] = 1  # verbal "5 Oriented"
    continuous = {2: 59.0, 3: 0.21, 49: 128.0, 50: 86, 51: 170.0, 52: 77.0, 53: 98.0}
    continuous |= {54: 19, 55: 118.0, 56: 36.6, 57: 81.0, 58: 7.4}
    for column, value in continuous.items():
        row[column] = value
    return row


def test_episode_header_is_the_benchmark_header(header_line):
    assert ",".join(EPISODE_HEADER) == header_line
    assert EPISODE_HEADER[1:] == CHANNELS and len(CHANNELS) == 17
    assert CHANNELS[-1] == "pH" and "Heart Rate" in CHANNELS


def test_categorical_vocabularies_keep_config_order():
    assert CATEGORY_VALUES["Glascow coma scale total"] == tuple(
        ["11", "10", "13", "12", "15", "14", "3", "5", "4", "7", "6", "9", "8"]
    )
    assert CATEGORY_VALUES["Capillary refill rate"] == ("0.0", "1.0")
    assert CATEGORY_VALUES["Glascow coma scale eye opening"][:3] == (
        "To Pain",
        "3 To speech",
        "1 No Response",
    )
    assert sorted(c for c, cat in IS_CATEGORICAL.items() if cat) == sorted(NAMES.values())
    assert NORMAL_VALUES["Heart Rate"] == "86" and NORMAL_VALUES["Glascow coma scale total"] == "15"


def test_feature_header_names():
    assert len(FEATURE_HEADER) == 76
    assert FEATURE_HEADER[0] == "Capillary refill rate->0.0"
    assert FEATURE_HEADER[2] == "Diastolic blood pressure"
    assert FEATURE_HEADER[3] == "Fraction inspired oxygen"
    assert FEATURE_HEADER[24] == "Glascow coma scale total->11"
    assert FEATURE_HEADER[49] == "Glucose" and FEATURE_HEADER[58] == "pH"
    assert FEATURE_HEADER[59] == "mask->Capillary refill rate"
    assert FEATURE_HEADER[75] == "mask->pH"
    assert CONTINUOUS_COLUMNS == (2, 3, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58)
    assert tuple(range(59, 76)) == MASK_COLUMNS
    assert CHANNEL_OFFSETS["Glascow coma scale verbal response"] == 37


@pytest.mark.parametrize(("alias", "value", "column"), ONE_HOT_COLUMNS)
def test_one_hot_column_of_each_category(write_episode, alias, value, column):
    x, header = discretize_episode(write_episode(("1.0", {alias: value})))
    start, stop = BLOCKS[alias]
    expected = np.zeros(stop - start, dtype=np.float32)
    expected[column - start] = 1
    np.testing.assert_array_equal(x[0, start:stop], expected)
    np.testing.assert_array_equal(x[1:, start:stop], np.tile(expected, (23, 1)))  # carried
    assert header[column] == f"{NAMES[alias]}->{value}"
    assert x[0, MASK_OF[alias]] == 1 and x[1, MASK_OF[alias]] == 0


def test_unobserved_bins_take_normal_values_with_mask_zero(write_episode):
    x, _ = discretize_episode(write_episode(("60.0", {"hr": "120"})))  # after the window
    assert x.dtype == np.float32 and x.shape == (24, 76)
    np.testing.assert_array_equal(x, np.tile(normal_bin(), (24, 1)))


@pytest.mark.parametrize(
    ("timestep", "end", "bins"),
    [(2.0, 48.0, 24), (1.0, 48.0, 48), (1.0, 41.5, 42), (1.0, 60.0, 60), (0.8, 48.0, 60)],
)
def test_number_of_bins(write_episode, timestep, end, bins):
    x, header = discretize_episode(write_episode(("0.5", {"hr": "82"})), timestep, end)
    assert x.shape == (bins, 76) and len(header) == 76


@pytest.mark.parametrize(
    ("hours", "timestep", "expected_bin"),
    [
        ("0", 2.0, 0),
        ("0.0", 1.0, 0),
        ("2.0", 2.0, 0),  # bins are right-closed: (0, 2] -> 0
        ("2.0", 1.0, 1),
        ("2.01", 2.0, 1),
        ("1.9999", 2.0, 0),
        ("-1.0", 2.0, 0),  # int() truncates -0.5 toward zero
        ("-0.5", 1.0, 0),
        ("47.5", 1.0, 47),
        ("48.0", 2.0, 23),
        ("48.0000005", 2.0, 23),  # within EPS of the end: kept
        ("0.43333333333333335", 1.0, 0),
    ],
)
def test_bin_edges(write_episode, hours, timestep, expected_bin):
    x, _ = discretize_episode(write_episode((hours, {"hr": "100"})), timestep, 48.0)
    assert np.flatnonzero(x[:, MASK_HR]).tolist() == [expected_bin]
    assert x[expected_bin, HR] == 100
    assert (x[:expected_bin, HR] == 86).all() and (x[expected_bin:, HR] == 100).all()


def test_rows_after_end_are_skipped(write_episode):
    x, _ = discretize_episode(write_episode(("47.0", {"hr": "90"}), ("48.01", {"hr": "150"})))
    assert x[23, HR] == 90 and x[23, MASK_HR] == 1  # 47.0 -> bin 23; 48.01 skipped
    assert x[:, MASK_HR].sum() == 1


def test_hours_far_below_zero_raise_in_strict_mode(write_episode):
    path = write_episode(("-2.0", {"hr": "70"}), ("1.0", {"hr": "80"}))
    with pytest.raises(ValueError, match=r"10011_episode1_timeseries\.csv.*-2\.0.*bin -1"):
        discretize_episode(path)


def test_previous_imputation_carries_last_observation(write_episode):
    path = write_episode(
        ("0.5", {"hr": "82"}),  # bin 0
        ("5.0", {"hr": "90"}),  # bin int(2.5 - eps) = 2
        ("7.0", {"dbp": "49.0"}),  # bin 3
    )
    x, _ = discretize_episode(path)
    assert x[:5, HR].tolist() == [82, 82, 90, 90, 90]
    assert x[:5, MASK_HR].tolist() == [1, 0, 1, 0, 0]
    assert x[:5, DBP].tolist() == [59, 59, 59, 49, 49]  # normal value before the first one
    assert x[:5, MASK_DBP].tolist() == [0, 0, 0, 1, 0]
    assert (x[23, [HR, DBP]] == [90, 49]).all()


def test_imputation_uses_raw_strings_for_categories(write_episode):
    x, _ = discretize_episode(write_episode(("3.0", {"crr": "1.0", "verbal": "Confused"})))
    assert x[0, 0:2].tolist() == [1, 0]  # normal "0.0" before the observation in bin 1
    assert (x[1:, 0:2] == [0, 1]).all() and x[1:, MASK_CRR].tolist() == [1] + [0] * 22
    assert (x[1:, 39] == 1).all() and x[0, 43] == 1  # "Confused" carried, "5 Oriented" before


@pytest.mark.parametrize(
    ("text", "value"), [(" 97", 97.0), ("1e2", 100.0), (".5", 0.5), ("-0", 0.0), ("82", 82.0)]
)
def test_continuous_values_parse_as_python_float(write_episode, text, value):
    x, _ = discretize_episode(write_episode(("1.0", {"temp": text})))
    assert x[0, TEMP] == np.float32(value) and x[23, TEMP] == np.float32(value)


def test_float_precision_is_float32_of_the_string(write_episode):
    x, _ = discretize_episode(write_episode(("1.0", {"mbp": "68.666702270507812"})))
    assert x[0, 52] == np.float32(68.666702270507812)


def test_literal_nan_is_carried_forward(write_episode):
    x, _ = discretize_episode(write_episode(("1.0", {"temp": "nan"})))
    assert math.isnan(x[0, TEMP]) and math.isnan(x[23, TEMP])
    assert x[0, 73] == 1 and x[23, 73] == 0


def test_later_row_in_same_bin_overwrites(write_episode):
    path = write_episode(
        ("0.5", {"hr": "80", "eye": "To Pain", "dbp": "60"}),
        ("1.0", {"sbp": "120"}),  # blank cells do not overwrite
        ("1.5", {"hr": "90", "eye": "Spontaneously"}),  # same bin 0 at timestep 2
    )
    x, _ = discretize_episode(path)
    assert x[0, HR] == 90 and x[1, HR] == 90 and x[1, MASK_HR] == 0
    assert x[0, DBP] == 60
    assert x[0, 4:12].tolist() == [0, 0, 0, 0, 0, 0, 1, 0]  # "To Pain" cleared
    assert x[1, 4:12].tolist() == [0, 0, 0, 0, 0, 0, 1, 0]
    assert x[0, MASK_EYE] == 1


def test_equal_and_nearly_equal_hours_keep_file_order(write_episode):
    # Within EPS a decrease is accepted, and rows are applied in file order.
    path = write_episode(("1.0000005", {"hr": "70"}), ("1.0", {"hr": "75"}), ("1.0", {"hr": "71"}))
    x, _ = discretize_episode(path)
    assert x[0, HR] == 71


@pytest.mark.parametrize(
    ("cells", "message"),
    [
        ({"total": "15.0"}, "'15.0' is not one of"),
        ({"crr": "0"}, "'0' is not one of"),
        ({"verbal": "confused"}, "'confused' is not one of"),
        ({"hr": "abc"}, "'Heart Rate': 'abc' is not a number"),
    ],
)
def test_strict_mode_rejects_what_the_reference_rejects(write_episode, cells, message):
    with pytest.raises(ValueError, match=message) as info:
        discretize_episode(write_episode(("1.0", cells)))
    assert "10011_episode1_timeseries.csv" in str(info.value)


def test_strict_mode_rejects_unsorted_hours(write_episode):
    with pytest.raises(ValueError, match="non-decreasing"):
        discretize_episode(write_episode(("5.0", {"hr": "80"}), ("1.0", {"hr": "70"})))


def test_strict_mode_rejects_malformed_files(write_raw, header_line, make_line):
    with pytest.raises(ValueError, match="line 3 has 5 fields, expected 18"):
        discretize_episode(write_raw(f"{header_line}\n{make_line('1.0')}\n2.0,,,,\n"))
    with pytest.raises(ValueError, match="no data rows"):
        discretize_episode(write_raw(header_line + "\n"))
    with pytest.raises(ValueError, match=r"missing columns \['pH'\]"):
        discretize_episode(write_raw(header_line.removesuffix(",pH") + "\n1.0" + "," * 16))
    with pytest.raises(ValueError, match="Hours 'x' is not a number"):
        discretize_episode(write_raw(f"{header_line}\n{make_line('x')}\n"))


def test_crlf_and_lf_files_give_the_same_array(write_raw, header_line, make_line):
    rows = [make_line("0.5", hr="82", total="15"), make_line("3.0", eye="To Pain")]
    lf = write_raw("\n".join([header_line, *rows]) + "\n", name="lf.csv")
    crlf = write_raw("\r\n".join([header_line, *rows]) + "\r\n", name="crlf.csv")
    np.testing.assert_array_equal(discretize_episode(lf)[0], discretize_episode(crlf)[0])


def test_reader_keeps_cells_as_strings(write_episode):
    header, rows, lines = read_episode_csv(write_episode(("0.5", {"total": "15", "crr": "1.0"})))
    assert header == list(EPISODE_HEADER)
    assert rows[0][6] == "15" and rows[0][1] == "1.0" and lines == [2]


def test_discretize_rows_with_a_channel_subset_in_any_order():
    x, _ = discretize_rows([0.5], [["82", "1.0"]], ("Heart Rate", "Capillary refill rate"), 1.0)
    assert x.shape == (48, 76)
    assert x[0, HR] == 82 and x[0, 0:2].tolist() == [0, 1]
    assert x[0, MASK_HR] == 1 and x[0, MASK_CRR] == 1 and x[0, MASK_DBP] == 0


def test_end_none_takes_the_last_hour():
    x, _ = discretize_rows([0.5, 5.0], [["80"], ["90"]], ("Heart Rate",), 1.0, None)
    assert x.shape == (5, 76)  # int(5 / 1 + 1 - eps) = 5
    assert x[:, HR].tolist() == [80, 80, 80, 80, 90]  # 5.0 -> bin int(5 - eps) = 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([0.5], [["80"], ["90"]], ("Heart Rate",)), "1 Hours values for 2 rows"),
        (([0.5], [["80"]], ("Heart rate",)), "unknown channel names"),
        (([0.5], [["80", "81"]], ("Heart Rate", "Heart Rate")), "duplicate channel"),
        (([0.5], [["80"]], ("Heart Rate",), 0.0), "timestep must be"),
        (([0.5], [["80", "1"]], ("Heart Rate",)), "has 2 cells for 1 channels"),
        (([math.nan], [["80"]], ("Heart Rate",)), "Hours is NaN"),
        (([], [], ("Heart Rate",), 1.0, None), "end=None needs at least one row"),
    ],
)
def test_discretize_rows_argument_errors(args, message):
    with pytest.raises(ValueError, match=message):
        discretize_rows(*args)

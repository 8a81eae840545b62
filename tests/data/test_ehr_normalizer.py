"""The benchmark normaliser: pooled mean and sample std, fitted whole or from site aggregates."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from omnifuse_model.data.ehr.discretizer import CONTINUOUS_COLUMNS, discretize_episode
from omnifuse_model.data.ehr.normalizer import (
    STD_FLOOR,
    EHRAggregates,
    EHRNormalizer,
    combine_aggregates,
    compute_aggregates,
)

HR, FIO2, MASK_HR = 50, 3, 67


def two_episodes() -> list[np.ndarray]:
    """Heart rate 1, 2 in the first episode and 3, 4 in the second; FiO2 constant 0.21."""
    first = np.zeros((2, 76), dtype=np.float32)
    second = np.zeros((2, 76), dtype=np.float32)
    first[:, HR], second[:, HR] = [1, 2], [3, 4]
    first[:, FIO2] = second[:, FIO2] = 0.21
    first[:, 0] = second[:, 0] = 1  # a one-hot column: never scaled
    first[:, MASK_HR] = [1, 0]
    return [first, second]


def test_mean_and_sample_std_by_hand():
    norm = EHRNormalizer.fit(two_episodes())
    # N = 4, S1 = 10, S2 = 30: mean 2.5, std = sqrt((30 - 2*10*2.5 + 4*2.5^2) / 3) = sqrt(5/3)
    assert norm.count == 4
    assert norm.means[HR] == 2.5
    assert norm.stds[HR] == pytest.approx(math.sqrt(5 / 3), rel=1e-15)
    assert norm.stds[HR] == pytest.approx(np.std([1, 2, 3, 4], ddof=1), rel=1e-15)
    assert norm.stds[FIO2] == STD_FLOOR  # constant column: floored at 1e-7
    assert norm.means[FIO2] == pytest.approx(0.21, rel=1e-7)


def test_std_formula_from_aggregates_by_hand():
    sums, sumsq = np.zeros(76), np.zeros(76)
    sums[HR], sumsq[HR] = 10.0, 30.0
    norm = EHRNormalizer.from_aggregates(4, sums, sumsq)
    assert norm.means[HR] == 2.5
    assert norm.stds[HR] == math.sqrt((30 - 2 * 10 * 2.5 + 4 * 2.5**2) / 3)
    assert norm.stds[0] == STD_FLOOR


def test_transform_scales_only_continuous_columns():
    episodes = two_episodes()
    norm = EHRNormalizer.fit(episodes)
    before = episodes[0].copy()
    out = norm.transform(episodes[0])
    np.testing.assert_array_equal(episodes[0], before)  # input untouched
    assert out.dtype == np.float32
    expected_hr = (np.array([1, 2]) - 2.5) / math.sqrt(5 / 3)
    np.testing.assert_allclose(out[:, HR], expected_hr, rtol=1e-6)
    untouched = [c for c in range(76) if c not in CONTINUOUS_COLUMNS]
    np.testing.assert_array_equal(out[:, untouched], episodes[0][:, untouched])
    batch = norm.transform(np.stack(episodes))  # [B, T, 76]
    np.testing.assert_array_equal(batch[0], out)


def test_transform_in_place_gives_transform_s_numbers_bit_for_bit():
    """The loader scales a fresh float32 array in place: the same bits as transform, for
    float32 and float64 arrays; other dtypes are refused (the result could not hold them)."""
    norm = EHRNormalizer.fit(two_episodes())
    cols = list(norm.columns)

    def reference(x: np.ndarray) -> np.ndarray:  # transform as first written: from x, a copy
        out = np.array(x, dtype=np.result_type(x.dtype, np.float32), copy=True)
        scaled = (x[..., cols].astype(np.float64) - norm.means[cols]) / norm.stds[cols]
        out[..., cols] = scaled.astype(out.dtype)
        return out

    rng = np.random.default_rng(0)
    for dtype in (np.float16, np.int32, np.float32, np.float64):
        x = (rng.standard_normal((3, 2, 76)) * 40).astype(dtype)
        expected = reference(x)
        assert norm.transform(x).tobytes() == expected.tobytes()
        if dtype in (np.float32, np.float64):
            assert norm.transform_in_place(x) is x
            assert x.dtype == dtype and x.tobytes() == expected.tobytes()
    with pytest.raises(ValueError, match="float32/float64"):
        norm.transform_in_place(np.zeros((2, 76), dtype=np.int64))
    with pytest.raises(ValueError, match="76"):
        norm.transform_in_place(np.zeros((2, 75), dtype=np.float32))


def test_split_aggregates_equal_the_pooled_fit():
    rng = np.random.default_rng(0)
    arrays = [rng.normal(80, 15, size=(int(rng.integers(1, 30)), 76)) for _ in range(20)]
    whole = EHRNormalizer.fit(arrays)
    site_a, site_b = compute_aggregates(arrays[:7]), compute_aggregates(arrays[7:])
    combined = combine_aggregates([site_a, site_b])
    assert combined.count == site_a.count + site_b.count == whole.count
    federated = EHRNormalizer.from_aggregates(combined.count, combined.sums, combined.sumsq)
    np.testing.assert_allclose(federated.means, whole.means, rtol=1e-12)
    np.testing.assert_allclose(federated.stds, whole.stds, rtol=1e-12)
    pooled = np.concatenate(arrays)
    np.testing.assert_allclose(whole.stds, pooled.std(axis=0, ddof=1), rtol=1e-9)
    wire = EHRAggregates.from_dict(json.loads(json.dumps(site_a.to_dict())))
    np.testing.assert_array_equal((wire + site_b).sums, combined.sums)


def test_save_and_load_round_trip_exactly(tmp_path):
    norm = EHRNormalizer.fit(two_episodes())
    norm.save(tmp_path / "normalizer.json")
    loaded = EHRNormalizer.load(tmp_path / "normalizer.json")
    np.testing.assert_array_equal(loaded.means, norm.means)
    np.testing.assert_array_equal(loaded.stds, norm.stds)
    assert loaded.columns == CONTINUOUS_COLUMNS and loaded.count == 4


def test_load_rejects_foreign_states_naming_the_file(tmp_path):
    state = EHRNormalizer.fit(two_episodes()).to_dict()
    cases = {
        "garbage.json": "not json",
        "other.json": json.dumps({**state, "format": "pickle"}),
        "layout.json": json.dumps({**state, "feature_header": ["x"] * 76}),
        "short.json": json.dumps({**state, "stds": state["stds"][:5]}),
        "zero.json": json.dumps({**state, "stds": [0.0] * 76}),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=name):
            EHRNormalizer.load(tmp_path / name)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="at least 2 bins"):
        EHRNormalizer.from_aggregates(1, np.zeros(76), np.zeros(76))
    with pytest.raises(ValueError, match=r"array 0 has shape \(2, 5\)"):
        compute_aggregates([np.zeros((2, 5))])
    with pytest.raises(ValueError, match="no aggregates"):
        combine_aggregates([])
    with pytest.raises(ValueError, match="cannot combine"):
        EHRAggregates(1, np.zeros(3), np.zeros(3)) + EHRAggregates(1, np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="expected"):
        EHRNormalizer.fit(two_episodes()).transform(np.zeros((2, 75)))


def test_fit_on_discretised_episodes(write_episode):
    arrays = [
        discretize_episode(write_episode(("1.0", {"hr": "80"}), name="a.csv"))[0],
        discretize_episode(write_episode(("1.0", {"hr": "100"}), name="b.csv"))[0],
    ]
    norm = EHRNormalizer.fit(arrays)  # 24 bins at 80, 24 at 100
    assert norm.count == 48 and norm.means[HR] == 90
    assert norm.stds[HR] == pytest.approx(math.sqrt(48 * 100 / 47), rel=1e-12)
    assert norm.means[MASK_HR] == pytest.approx(2 / 48)  # stored, but never applied
    out = norm.transform(arrays[0])
    assert out[0, MASK_HR] == 1 and out[0, HR] == pytest.approx(-10 / norm.stds[HR], rel=1e-6)

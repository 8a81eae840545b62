"""The paired bootstrap CI (checked by hand on small cases) and the holds rules."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from simulation.benchmarks.mechanism_result import (
    MechanismResult,
    decide_holds,
    merge_over_seeds,
    paired_bootstrap_ci,
    paired_result,
)


def test_constant_differences_give_a_point_interval() -> None:
    assert paired_bootstrap_ci([0.03, 0.03, 0.03]) == pytest.approx((0.03, 0.03))


def test_two_differences_by_hand() -> None:
    # Resampling [1, 3] with replacement gives means 1 (p 1/4), 2 (p 1/2), 3 (p 1/4); the 2.5%
    # and 97.5% quantiles of that distribution are 1 and 3.
    low, high = paired_bootstrap_ci([1.0, 3.0], samples=20_000)
    assert (low, high) == pytest.approx((1.0, 3.0))
    # A 40% interval sits inside the middle atom: both ends are 2.
    assert paired_bootstrap_ci([1.0, 3.0], samples=20_000, level=0.4) == pytest.approx((2.0, 2.0))


def test_interval_of_many_differences_matches_the_normal_approximation() -> None:
    # 400 differences alternating 0 and 1: mean 0.5, sd of the mean = 0.5 / sqrt(400) = 0.025,
    # so the 95% interval is about 0.5 +- 1.96 * 0.025 = [0.451, 0.549].
    low, high = paired_bootstrap_ci([0.0, 1.0] * 200)
    assert low == pytest.approx(0.451, abs=0.006)
    assert high == pytest.approx(0.549, abs=0.006)


def test_interval_is_reproducible_and_rejects_bad_input() -> None:
    assert paired_bootstrap_ci([0.1, -0.2, 0.3]) == paired_bootstrap_ci([0.1, -0.2, 0.3])
    with pytest.raises(ValueError, match="non-empty"):
        paired_bootstrap_ci([])
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap_ci([0.1, float("nan")])


@pytest.mark.parametrize(
    ("sign", "diff", "low", "high", "expected"),
    [
        ("positive", 0.05, 0.01, 0.09, True),
        ("positive", 0.05, 0.0, 0.09, False),  # touching 0 is not excluding it
        ("positive", -0.05, -0.09, -0.01, False),
        ("non-positive", -0.02, -0.05, 0.01, True),
        ("non-positive", 0.005, -0.01, 0.02, True),  # within tolerance, CI reaches 0
        ("non-positive", 0.03, 0.01, 0.05, False),  # a clear gain: leakage
        ("non-positive", 0.02, -0.01, 0.05, False),  # CI reaches 0 but diff above tolerance
        ("zero", 0.03, -0.01, 0.07, True),  # CI contains 0
        ("zero", 0.008, 0.004, 0.012, True),  # CI excludes 0 but |diff| <= tolerance
        ("zero", 0.05, 0.02, 0.08, False),
        ("zero", -0.05, -0.08, -0.02, False),
    ],
)
def test_holds_rules(sign: str, diff: float, low: float, high: float, expected: bool) -> None:
    assert decide_holds(sign, diff, low, high, tolerance=0.01) is expected


def test_holds_rejects_an_unknown_sign_and_nan() -> None:
    with pytest.raises(ValueError, match="expected_sign"):
        decide_holds("negative", 0.0, 0.0, 0.0)  # type: ignore[arg-type]
    assert decide_holds("zero", float("nan"), -1.0, 1.0) is False


def test_paired_result_computes_mean_ci_and_verdict() -> None:
    result = paired_result(
        name="demo",
        mechanism="imputation",
        control=False,
        expected_sign="positive",
        method="f",
        reference="c",
        metric="auroc",
        method_values=[0.80, 0.82, 0.81],
        reference_values=[0.75, 0.78, 0.76],
        details={"oracle_auroc": 0.9},
    )
    assert result.paired_diff == pytest.approx(0.0467, abs=1e-4)
    assert result.ci_low == pytest.approx(0.04) and result.ci_high == pytest.approx(0.05)
    assert result.holds and result.n_seeds == 3
    again = MechanismResult.model_validate(result.model_dump(mode="json"))
    assert again == result


def test_result_rejects_mismatched_seed_counts_and_unknown_fields() -> None:
    with pytest.raises(ValueError, match="one pair per seed"):
        paired_result(
            name="x",
            mechanism="m",
            control=True,
            expected_sign="zero",
            method="a",
            reference="b",
            metric="auroc",
            method_values=[0.1, 0.2],
            reference_values=[0.1],
        )
    good = paired_result(
        name="x",
        mechanism="m",
        control=True,
        expected_sign="zero",
        method="a",
        reference="b",
        metric="auroc",
        method_values=[0.1],
        reference_values=[0.1],
    ).model_dump()
    with pytest.raises(ValidationError, match="n_seeds=2"):
        MechanismResult.model_validate({**good, "n_seeds": 2})
    with pytest.raises(ValidationError, match="extra"):
        MechanismResult.model_validate({**good, "surprise": 1})
    with pytest.raises(ValidationError):
        MechanismResult.model_validate({**good, "expected_sign": "negative"})


def test_merge_over_seeds_equals_one_run_over_all_seeds() -> None:
    def run(method: list[float], reference: list[float], oracle: float) -> MechanismResult:
        return paired_result(
            name="s", mechanism="m", control=False, expected_sign="positive", method="a",
            reference="b", metric="auroc", method_values=method, reference_values=reference,
            details={"oracle": oracle, "per_seed": [oracle], "note": "x"},
        )  # fmt: skip

    whole = run([0.8, 0.9, 0.7], [0.7, 0.8, 0.75], 0.9)
    merged = merge_over_seeds([[run([0.8], [0.7], 0.9)], [run([0.9, 0.7], [0.8, 0.75], 0.9)]])
    assert len(merged) == 1
    assert merged[0].method_values == whole.method_values
    assert (merged[0].paired_diff, merged[0].ci_low, merged[0].ci_high) == pytest.approx(
        (whole.paired_diff, whole.ci_low, whole.ci_high)
    )
    assert merged[0].details == {"oracle": pytest.approx(0.9), "per_seed": [0.9, 0.9], "note": "x"}

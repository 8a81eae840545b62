"""The outcome of one mechanism scenario: a paired difference, its CI, and whether it holds.

Every scenario compares a *method* with a *reference* on the same seeds (same data draw, same
initialisation seed, same test set), so each seed gives one paired difference
``method - reference`` of the metric. The result reports the mean of those differences, a
paired 95% percentile-bootstrap interval over seeds (``paired_bootstrap_ci``: seeds are
resampled with replacement, the differences stay paired), and a verdict against a sign that the
scenario states before it runs.

Rules for ``holds`` (``decide_holds``), with ``tolerance`` the stated small margin (default
``DEFAULT_TOLERANCE`` = 0.01, in the metric's units; AUROC for most scenarios):

- ``positive``: the method must help: ``ci_low > 0``.
- ``non-positive``: the method must not help (a control; a gain would mean leakage or a
  spurious mechanism): ``ci_low <= 0`` *and* ``paired_diff <= tolerance``.
- ``zero``: no effect expected: the CI contains 0 *or* ``|paired_diff| <= tolerance``.

Seed-level bootstrap with few seeds is coarse (with n seeds the interval can be no wider than
the range of the n differences), which is why the per-seed values are stored next to the
interval: a reader can check the verdict by eye.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

ExpectedSign = Literal["positive", "zero", "non-positive"]

DEFAULT_TOLERANCE = 0.01
DEFAULT_BOOTSTRAP_SAMPLES = 10_000
CI_LEVEL = 0.95


class MechanismResult(BaseModel):
    """One scenario's paired comparison and verdict (see the module docstring for the rules)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, description="Scenario name, e.g. 'imputation/mlp/n=200'.")
    mechanism: str = Field(min_length=1, description="Mechanism tested: imputation, dwfuse, ...")
    control: bool = Field(description="True for a control (no gain expected).")
    expected_sign: ExpectedSign = Field(description="Sign stated before the run.")
    method: str = Field(min_length=1, description="The arm whose effect is measured.")
    reference: str = Field(min_length=1, description="The arm it is compared with.")
    metric: str = Field(min_length=1, description="What is differenced, e.g. 'auroc_b_missing'.")
    n_seeds: int = Field(gt=0)
    paired_diff: float = Field(description="Mean over seeds of method - reference.")
    ci_low: float = Field(description="Lower end of the paired 95% bootstrap CI.")
    ci_high: float = Field(description="Upper end of the paired 95% bootstrap CI.")
    tolerance: float = Field(default=DEFAULT_TOLERANCE, ge=0.0, description="The stated margin.")
    holds: bool = Field(description="Verdict of decide_holds for expected_sign.")
    method_values: list[float] = Field(description="Per-seed metric of the method.")
    reference_values: list[float] = Field(description="Per-seed metric of the reference.")
    details: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra measured numbers: oracle bound, distances to it, omega means, ...",
    )

    @model_validator(mode="after")
    def _consistent(self) -> MechanismResult:
        if not (len(self.method_values) == len(self.reference_values) == self.n_seeds):
            raise ValueError(
                f"scenario '{self.name}': n_seeds={self.n_seeds} but "
                f"{len(self.method_values)} method and {len(self.reference_values)} reference "
                "values; expected one of each per seed"
            )
        if self.ci_low > self.ci_high:
            raise ValueError(
                f"scenario '{self.name}': ci_low {self.ci_low} > ci_high {self.ci_high}"
            )
        return self


def paired_bootstrap_ci(
    differences: Sequence[float],
    samples: int = DEFAULT_BOOTSTRAP_SAMPLES,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of paired differences.

    Resamples the n differences with replacement ``samples`` times (a fixed-seed numpy
    generator, so the interval is reproducible) and returns the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles of the resampled means.

    Args:
        differences: one paired difference (method - reference) per seed; at least one.
    """
    values = np.asarray(list(differences), dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"differences: expected a non-empty list of numbers, got {differences!r}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"differences: expected finite numbers, got {values.tolist()}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a number in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, values.size, size=(samples, values.size))
    means = values[picks].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def decide_holds(
    expected_sign: ExpectedSign,
    paired_diff: float,
    ci_low: float,
    ci_high: float,
    tolerance: float = DEFAULT_TOLERANCE,
) -> bool:
    """Whether a measured difference agrees with the stated sign (rules: module docstring)."""
    if math.isnan(paired_diff) or math.isnan(ci_low) or math.isnan(ci_high):
        return False
    if expected_sign == "positive":
        return ci_low > 0.0
    if expected_sign == "non-positive":
        return ci_low <= 0.0 and paired_diff <= tolerance
    if expected_sign == "zero":
        return ci_low <= 0.0 <= ci_high or abs(paired_diff) <= tolerance
    raise ValueError(
        f"expected_sign: expected 'positive', 'zero' or 'non-positive', got {expected_sign!r}"
    )


def paired_result(
    *,
    name: str,
    mechanism: str,
    control: bool,
    expected_sign: ExpectedSign,
    method: str,
    reference: str,
    metric: str,
    method_values: Sequence[float],
    reference_values: Sequence[float],
    details: dict[str, Any] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> MechanismResult:
    """Build a MechanismResult from per-seed values of both arms (same seed order)."""
    if len(method_values) != len(reference_values):
        raise ValueError(
            f"scenario '{name}': {len(method_values)} method values but "
            f"{len(reference_values)} reference values; expected one pair per seed"
        )
    diffs = [float(m) - float(r) for m, r in zip(method_values, reference_values, strict=True)]
    low, high = paired_bootstrap_ci(diffs)
    mean = float(np.mean(diffs))
    return MechanismResult(
        name=name,
        mechanism=mechanism,
        control=control,
        expected_sign=expected_sign,
        method=method,
        reference=reference,
        metric=metric,
        n_seeds=len(diffs),
        paired_diff=mean,
        ci_low=low,
        ci_high=high,
        tolerance=tolerance,
        holds=decide_holds(expected_sign, mean, low, high, tolerance),
        method_values=[float(v) for v in method_values],
        reference_values=[float(v) for v in reference_values],
        details=details or {},
    )


def merge_over_seeds(parts: list[list[MechanismResult]]) -> list[MechanismResult]:
    """Results of the same scenarios run on disjoint seeds, merged into one per scenario.

    Per-seed values are concatenated in the parts' order and the mean, CI and verdict are
    recomputed (``paired_result``). Details: numbers become their mean over the parts
    (weighted by each part's seeds), lists are concatenated, anything else is taken from the
    first part. Used when a scenario source runs one seed per worker process.
    """
    if not parts:
        return []
    merged: list[MechanismResult] = []
    for first in parts[0]:
        same = [next(r for r in part if r.name == first.name) for part in parts]
        merged.append(
            paired_result(
                name=first.name,
                mechanism=first.mechanism,
                control=first.control,
                expected_sign=first.expected_sign,
                method=first.method,
                reference=first.reference,
                metric=first.metric,
                method_values=[v for r in same for v in r.method_values],
                reference_values=[v for r in same for v in r.reference_values],
                details=_merged_details(same),
                tolerance=first.tolerance,
            )
        )
    return merged


def _merged_details(results: list[MechanismResult]) -> dict[str, Any]:
    details: dict[str, Any] = {}
    weights = [r.n_seeds for r in results]
    for key, value in results[0].details.items():
        values = [r.details.get(key) for r in results]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            details[key] = float(np.average(values, weights=weights))
        elif all(isinstance(v, list) for v in values):
            details[key] = [item for v in values for item in v]
        else:
            details[key] = value
    return details

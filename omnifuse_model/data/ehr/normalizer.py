"""Normaliser of discretised EHR features, fittable from pooled or federated statistics.

Implements the mimic3-benchmarks ``Normalizer`` (``create_normalizer_state.py``), see
design/MIMIC_FORMATS.md section 1b: over all bins of all training episodes pooled,
mean = S1 / N and the sample standard deviation

    std = sqrt((S2 - 2 * S1 * mean + N * mean^2) / (N - 1)),   std < 1e-7 -> 1e-7,

with S1 = sum of x and S2 = sum of x^2. Only the continuous columns (no ``->`` in the header
name: [2, 3, 49..58]) are scaled, ``(x - mean) / std``; one-hots and masks pass through.
Because (N, S1, S2) add up across sites, a federation can fit the same normaliser without
pooling data: each site sends :func:`compute_aggregates` of its training arrays and the server
combines them (:func:`combine_aggregates`, :meth:`EHRNormalizer.from_aggregates`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omnifuse_model.data.ehr.discretizer import (
    CHANNEL_OFFSETS,
    CONTINUOUS_COLUMNS,
    FEATURE_HEADER,
    NUM_FEATURES,
    PLAUSIBLE_RANGES,
    plausible_range_text,
)

STD_FLOOR = 1e-7
_FORMAT = "omnifuse-ehr-normalizer"
_VERSION = 1


@dataclass(frozen=True, eq=False)
class EHRAggregates:
    """Sufficient statistics of a set of bins: count N, per-column sums S1 and S2 ``[F]``."""

    count: int
    sums: np.ndarray
    sumsq: np.ndarray

    def __post_init__(self) -> None:
        sums = np.asarray(self.sums, dtype=np.float64)
        sumsq = np.asarray(self.sumsq, dtype=np.float64)
        if sums.ndim != 1 or sums.shape != sumsq.shape:
            raise ValueError(
                f"sums and sumsq must be 1-D of equal length, got {sums.shape} and {sumsq.shape}"
            )
        if int(self.count) != self.count or self.count < 0:
            raise ValueError(f"count must be a non-negative integer, got {self.count!r}")
        object.__setattr__(self, "count", int(self.count))
        object.__setattr__(self, "sums", sums)
        object.__setattr__(self, "sumsq", sumsq)

    def __add__(self, other: EHRAggregates) -> EHRAggregates:
        if self.sums.shape != other.sums.shape:
            raise ValueError(
                f"cannot combine aggregates of {self.sums.shape[0]} and "
                f"{other.sums.shape[0]} columns"
            )
        return EHRAggregates(
            self.count + other.count, self.sums + other.sums, self.sumsq + other.sumsq
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what a site sends)."""
        return {"count": self.count, "sums": self.sums.tolist(), "sumsq": self.sumsq.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EHRAggregates:
        """Inverse of :meth:`to_dict`."""
        return cls(data["count"], np.asarray(data["sums"]), np.asarray(data["sumsq"]))


def compute_aggregates(
    arrays: Iterable[np.ndarray], num_features: int = NUM_FEATURES
) -> EHRAggregates:
    """N, S1, S2 over every bin of ``arrays`` (each ``[bins, F]``), summed in float64."""
    count = 0
    sums = np.zeros(num_features, dtype=np.float64)
    sumsq = np.zeros(num_features, dtype=np.float64)
    for k, array in enumerate(arrays):
        x = np.asarray(array, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != num_features:
            raise ValueError(f"array {k} has shape {x.shape}, expected [bins, {num_features}]")
        count += x.shape[0]
        sums += x.sum(axis=0)
        sumsq += (x**2).sum(axis=0)
    return EHRAggregates(count, sums, sumsq)


def check_plausible_aggregates(aggregates: EHRAggregates, source: str) -> None:
    """Raise ``ValueError`` unless ``aggregates`` can come from plausible values only.

    Ingest reads values outside :data:`~omnifuse_model.data.ehr.discretizer.PLAUSIBLE_RANGES` as not
    charted, so every bin of a continuous channel lies in ``[low, high]``; then its mean does
    too and, by Popoviciu's inequality, its population variance is at most
    ``(high - low)^2 / 4``. Statistics that break either bound hold an implausible value (e.g.
    a site whose cache predates the range check) and would distort every site's normaliser;
    the error names ``source``, the variable, the offending statistic and the expected range.
    """
    n = aggregates.count
    if n == 0 or aggregates.sums.shape[0] != NUM_FEATURES:
        return
    _check_sums_of_squares(aggregates, source)
    for channel, (low, high, _unit) in PLAUSIBLE_RANGES.items():
        column = CHANNEL_OFFSETS[channel]
        mean = aggregates.sums[column] / n
        variance = aggregates.sumsq[column] / n - mean**2
        slack = 1e-9 * max(1.0, abs(low), abs(high)) ** 2
        if not low - 1e-9 * max(1.0, abs(low)) <= mean <= high + 1e-9 * max(1.0, abs(high)):
            problem = f"mean {mean:g}"
        elif not variance <= (high - low) ** 2 / 4 + slack:
            problem = f"variance {variance:g} (at most {(high - low) ** 2 / 4:g} in range)"
        else:
            continue
        raise ValueError(
            f"{source}: EHR statistics of {channel!r} cannot come from plausible values: "
            f"{problem}, expected values in {plausible_range_text(channel)}; re-run "
            "`omnifuse prepare` for that site (ingest reads implausible values as not charted)"
        )


def _check_sums_of_squares(aggregates: EHRAggregates, source: str) -> None:
    """Every column: a variance that is not negative (N * S2 >= S1^2, Cauchy-Schwarz); the
    one-hot and mask columns (no plausible range): values in [0, 1], so 0 <= S2 <= S1 <= N.
    A negative variance would floor the pooled std at 1e-7 and scale that column by 1e7 at
    every site; a huge sum in an unchecked column would make its statistics non-finite."""
    n = aggregates.count
    ranged = {CHANNEL_OFFSETS[channel] for channel in PLAUSIBLE_RANGES}
    for column in range(NUM_FEATURES):
        s1, s2 = float(aggregates.sums[column]), float(aggregates.sumsq[column])
        slack = 1e-9 * max(1.0, abs(s2) * n)
        if not n * s2 >= s1 * s1 - slack:
            problem = f"a negative variance (N*S2 = {n * s2:g} < S1^2 = {s1 * s1:g})"
        elif column not in ranged and not -1e-9 <= s2 <= s1 + 1e-9 * n <= n * (1 + 2e-9):
            problem = f"S1 = {s1:g}, S2 = {s2:g} over {n} bins (0/1 values: 0 <= S2 <= S1 <= N)"
        else:
            continue
        raise ValueError(
            f"{source}: EHR statistics of column {column} ({FEATURE_HEADER[column]!r}) cannot "
            f"come from real values: {problem}"
        )


def combine_aggregates(parts: Iterable[EHRAggregates]) -> EHRAggregates:
    """Sum several sites' aggregates (at least one)."""
    parts = list(parts)
    if not parts:
        raise ValueError("no aggregates to combine")
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


class EHRNormalizer:
    """Per-column mean/std scaling of the continuous columns of ``[..., F]`` arrays."""

    def __init__(
        self,
        means: Sequence[float] | np.ndarray,
        stds: Sequence[float] | np.ndarray,
        columns: Sequence[int] = CONTINUOUS_COLUMNS,
        count: int | None = None,
    ) -> None:
        self.means = np.asarray(means, dtype=np.float64).copy()
        self.stds = np.asarray(stds, dtype=np.float64).copy()
        self.columns = tuple(int(c) for c in columns)
        self.count = count
        width = self.means.shape[0] if self.means.ndim == 1 else -1
        if width < 0 or self.stds.shape != self.means.shape:
            raise ValueError(
                f"means and stds must be 1-D of equal length, got {self.means.shape} "
                f"and {self.stds.shape}"
            )
        if any(not 0 <= c < width for c in self.columns):
            raise ValueError(f"columns {list(self.columns)} out of range for {width} features")
        picked = list(self.columns)
        if not (np.all(np.isfinite(self.means[picked])) and np.all(self.stds[picked] > 0)):
            raise ValueError("means must be finite and stds > 0 on the normalised columns")

    @classmethod
    def from_aggregates(
        cls,
        count: int,
        sums: Sequence[float] | np.ndarray,
        sumsq: Sequence[float] | np.ndarray,
        columns: Sequence[int] = CONTINUOUS_COLUMNS,
    ) -> EHRNormalizer:
        """Fit from N, S1, S2 with the benchmark's sample-std formula and 1e-7 floor."""
        agg = EHRAggregates(count, np.asarray(sums), np.asarray(sumsq))
        n = agg.count
        if n < 2:
            raise ValueError(f"need at least 2 bins to estimate a sample std, got {n}")
        means = 1.0 / n * agg.sums
        variance_sum = agg.sumsq - 2.0 * agg.sums * means + n * means**2
        # Rounding can make a constant column's sum slightly negative (NaN in the reference).
        stds = np.sqrt(1.0 / (n - 1) * np.maximum(variance_sum, 0.0))
        stds[stds < STD_FLOOR] = STD_FLOOR
        return cls(means, stds, columns, count=n)

    @classmethod
    def fit(
        cls, arrays: Iterable[np.ndarray], columns: Sequence[int] = CONTINUOUS_COLUMNS
    ) -> EHRNormalizer:
        """Fit on training arrays ``[bins, 76]``, all bins pooled."""
        agg = compute_aggregates(arrays)
        return cls.from_aggregates(agg.count, agg.sums, agg.sumsq, columns)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std`` on the normalised columns of ``x`` ``[..., F]``; a new array
        (float32, or float64 for float64 and integer input)."""
        x = np.asarray(x)
        if x.shape[-1:] != self.means.shape:
            raise ValueError(f"expected [..., {self.means.shape[0]}] features, got {x.shape}")
        return self.transform_in_place(np.array(x, dtype=np.result_type(x.dtype, np.float32)))

    def transform_in_place(self, x: np.ndarray) -> np.ndarray:
        """:meth:`transform` written into ``x`` (a float32 or float64 array ``[..., F]``),
        which is returned: the same numbers (computed in float64, rounded to ``x``'s dtype),
        without copying the columns that are not scaled."""
        if x.dtype not in (np.float32, np.float64) or x.shape[-1:] != self.means.shape:
            raise ValueError(
                f"expected a float32/float64 array [..., {self.means.shape[0]}], got "
                f"{x.dtype} {x.shape}"
            )
        cols = list(self.columns)
        scaled = (x[..., cols].astype(np.float64) - self.means[cols]) / self.stds[cols]
        x[..., cols] = scaled.astype(x.dtype)
        return x

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, self-describing state."""
        data: dict[str, Any] = {
            "format": _FORMAT,
            "version": _VERSION,
            "count": self.count,
            "columns": list(self.columns),
            "means": self.means.tolist(),
            "stds": self.stds.tolist(),
        }
        if self.means.shape[0] == NUM_FEATURES:
            data["feature_header"] = list(FEATURE_HEADER)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EHRNormalizer:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on a foreign or stale state."""
        if data.get("format") != _FORMAT or data.get("version") != _VERSION:
            raise ValueError(
                f"not an {_FORMAT} v{_VERSION} state: format={data.get('format')!r}, "
                f"version={data.get('version')!r}"
            )
        header = data.get("feature_header")
        if header is not None and tuple(header) != FEATURE_HEADER:
            raise ValueError("state was fitted on a different feature layout (feature_header)")
        try:
            return cls(data["means"], data["stds"], data["columns"], count=data.get("count"))
        except KeyError as err:
            raise ValueError(f"state lacks field {err.args[0]!r}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state as JSON (floats round-trip exactly)."""
        Path(path).write_text(json.dumps(self.to_dict(), allow_nan=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EHRNormalizer:
        """Read a state written by :meth:`save`; errors name the file."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("top level is not a JSON object")
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

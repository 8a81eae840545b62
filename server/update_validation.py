"""Server-side checks of every site update before it is averaged.

An update is rejected, with a named reason, when its parameter keys differ from the global
model's, a shape differs, a value is NaN or infinite, its L2 distance to the global weights
exceeds the configured bound, or its metrics lack the counts aggregation needs. Rejected
updates are logged, recorded in the round's history and in the audit, and left out; the
round goes on with the rest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from omnifuse_model import federation_schema as wire


def update_rejection(
    state: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    metrics: Mapping[str, object],
    modality_names: list[str],
    max_norm: float | None,
) -> str | None:
    """None when the update may be averaged, else the reason it may not."""
    missing = sorted(set(reference) - set(state))
    if missing:
        return f"missing_keys:{missing[0]}" + (f"+{len(missing) - 1}" if len(missing) > 1 else "")
    unexpected = sorted(set(state) - set(reference))
    if unexpected:
        return f"unexpected_keys:{unexpected[0]}"
    needed = [wire.NUM_EXAMPLES, *(wire.present_key(m) for m in modality_names)]
    for key in needed:
        value = metrics.get(key)
        if not isinstance(value, int | float) or value < 0 or not math.isfinite(value):
            return f"bad_metric:{key}"
    squared = 0.0
    for key, expected in reference.items():
        value = np.asarray(state[key])
        if value.shape != expected.shape:
            return f"shape_mismatch:{key}"
        if not np.isfinite(value).all():
            return f"non_finite:{key}"
        squared += float(np.sum((value.astype(np.float64) - expected.astype(np.float64)) ** 2))
    if max_norm is not None and math.sqrt(squared) > max_norm:
        return f"norm_exceeded:{math.sqrt(squared):.3g}>{max_norm:g}"
    return None

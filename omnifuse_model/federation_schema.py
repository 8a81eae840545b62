"""The federation's wire format, defined once and imported by both client and server.

Nothing here imports Flower: these are the key names and plain-Python encodings of what
travels in ConfigRecords and MetricRecords, the mapping of parameters to modalities that
modality-aware aggregation needs, and the audit row schema with small-count suppression.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping

from pydantic import Field

from omnifuse_model.config import StrictModel
from omnifuse_model.laziness import LazinessReport, combination_label, modality_combinations
from omnifuse_model.suppression import published_count

# -- records in a message -----------------------------------------------------------------
ARRAYS = "arrays"  # ArrayRecord: trainable weights only
CONFIG = "config"  # ConfigRecord: server -> client instructions
METRICS = "metrics"  # MetricRecord: client -> server aggregates used for weighting
AUDIT = "audit"  # ConfigRecord: client -> server audit aggregates (flat scalars)
TLA_SUMS = "tla-sums"  # ConfigRecord: per-combination distance sums and counts (global TLA)

# -- server -> client config keys ---------------------------------------------------------
MODEL_CONFIG = "model-config"  # JSON of OmniFuseConfig (the registration query before round 1)
AUDIT_MIN_COUNT = "audit-min-count"  # the registration query's suppression threshold (int)
ROUND_PLAN = "round-plan"  # JSON of omnifuse_model.round_plan.RoundPlan: the round's instructions
QUERY_KIND = "query-kind"  # a QUERY's purpose; absent = the registration query
STATISTICS_QUERY = "statistics"  # QUERY_KIND of the statistics phase before round 1

# -- client -> server metric keys ---------------------------------------------------------
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"  # wall time of the site's local training + audit pass
LOAD_SECONDS = "load-seconds"  # wall time of loading the site's data for the round (optional)
VAL_AUROC = "val-auroc"
VAL_AUPRC = "val-auprc"
EPSILON = "epsilon"  # DP-SGD sites only: epsilon spent so far in the run (Opacus' accountant)


def present_key(modality: str) -> str:
    """Metric key: training samples in which ``modality`` was present."""
    return f"num-present.{modality}"


def parameter_modality(key: str, modality_names: list[str]) -> str | None:
    """The modality a parameter belongs to, or None for shared parts (CRA, joint head).

    Encoder parameters are ``encoders.encoders.<name>.*``; DWFuse per-modality heads are
    ``heads.modality_heads.<index>.*`` with the index in ``modality_names`` order.
    """
    parts = key.split(".")
    if parts[:2] == ["encoders", "encoders"] and len(parts) > 2 and parts[2] in modality_names:
        return parts[2]
    if parts[:2] == ["heads", "modality_heads"] and len(parts) > 2 and parts[2].isdigit():
        index = int(parts[2])
        if index < len(modality_names):
            return modality_names[index]
    return None


# -- audit ----------------------------------------------------------------------------------
class AuditRow(StrictModel):
    """What one site reports about one round: aggregates only, never per-sample values.

    Counts below the suppression threshold are reported as None (suppressed), and so are
    the statistics computed from them.
    """

    site: str
    round: int = Field(ge=0)
    num_examples: int | None = Field(description="Training samples (None when suppressed).")
    availability_counts: dict[str, int | None] = Field(
        description="Samples holding exactly each modality combination (label -> count)."
    )
    tla_scores: dict[str, float | None] = Field(description="Combination label -> TLA score.")
    lazy_combination: str | None = Field(description="'+'-joined names of the lazy combination.")
    mean_dwfuse_weight: dict[str, float | None]
    imputation_error: dict[str, float | None] = Field(
        description="Modality -> mean squared error of its forward imputation (embedding units)."
    )
    imputation_error_normalised: dict[str, float | None] = Field(
        default_factory=dict,
        description=(
            "Modality -> imputation MSE divided by the MSE of predicting the site's training "
            "mean embedding (1 - R^2: 0 perfect, 1 no better than the mean); comparable "
            "across modalities. Empty in rows written before it existed."
        ),
    )
    observed_modalities: list[str] | None = Field(
        default=None,
        description=(
            "Modalities held by at least one training sample at the site; the weights of the "
            "others come from imputed embeddings only. None in rows written before it existed."
        ),
    )
    min_count: int | None = Field(
        default=None,
        ge=1,
        description="The suppression threshold the site applied (None in older rows).",
    )
    val_auroc: float | None
    epsilon: float | None = Field(default=None, description="DP epsilon spent so far.")
    update_status: str = Field(
        default="accepted",
        description=(
            "Set by the server: 'accepted', or why the site's update was not used: "
            "'rejected:<reason>' (update validation), 'failed:<reason>', 'excluded:<reason>' "
            "or 'not_aggregated:<reason>' (the round's model was kept)."
        ),
    )


def exact_combination_counts(
    availability_rows: Iterable[Iterable[bool]], modality_names: list[str]
) -> dict[str, int]:
    """Samples per exact availability pattern, keyed by combination label (all 2^M - 1)."""
    counts = {combination_label(c): 0 for c in modality_combinations(modality_names)}
    for row in availability_rows:
        present = tuple(name for name, held in zip(modality_names, row, strict=True) if held)
        if present:
            counts[combination_label(present)] += 1
    return counts


def suppress(count: int, threshold: int) -> int | None:
    """A count, or None when 0 < count < threshold (small cells identify patients)."""
    return None if 0 < count < threshold else count


def encode_audit(row: AuditRow) -> dict[str, str | int | float]:
    """Flatten an audit row into ConfigRecord-compatible scalars (None -> JSON null)."""
    return {"row": json.dumps(row.model_dump(mode="json"), allow_nan=False, default=str)}


def decode_audit(record: Mapping[str, object]) -> AuditRow:
    """Inverse of ``encode_audit``; errors name the missing key."""
    if "row" not in record:
        raise ValueError(f"audit record: missing key 'row', got keys {sorted(record)}")
    return AuditRow.model_validate(json.loads(str(record["row"])))


def finite_or_none(value: float | None) -> float | None:
    """JSON-safe float: NaN and infinities become None."""
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return float(value)


def encode_tla_sums(report: LazinessReport, threshold: int) -> dict[str, float | int]:
    """Per-combination distance sums and counts for the server's global merge; combinations
    held by fewer than ``threshold`` samples are left out, and each count is sent rounded up
    to a multiple of ``threshold`` (``suppression.published_count``; the merged mean's
    relative error is below threshold / count)."""
    record: dict[str, float | int] = {}
    for key, count in report.counts.items():
        if count >= threshold:
            record[f"sum.{key}"] = float(report.distance_sums[key])
            record[f"count.{key}"] = published_count(int(count), threshold)
    return record


def decode_tla_sums(record: Mapping[str, object]) -> tuple[dict[str, float], dict[str, int]]:
    """Inverse of ``encode_tla_sums``: (sums, counts) keyed by combination label."""
    sums = {k[4:]: float(v) for k, v in record.items() if k.startswith("sum.")}
    counts = {k[6:]: int(v) for k, v in record.items() if k.startswith("count.")}
    return sums, counts

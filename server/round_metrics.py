"""A round's numbers merged over sites: sample-weighted metrics, global TLA, audit status rows.

The strategy (``server.strategy``) calls these after screening; they read only accepted,
validated values.
"""

from __future__ import annotations

from omnifuse_model import federation_schema as wire
from omnifuse_model.laziness import LazinessMiner


def merge_tla(
    replies: list[dict[str, object]], modality_names: list[str], reduction: str
) -> tuple[str, ...] | None:
    """Global TLA: merge per-site sums/counts and take the argmax combination (Eq. 15)."""
    miner = LazinessMiner(modality_names, reduction)
    for record in replies:
        sums, counts = wire.decode_tla_sums(record)
        miner.merge(sums, counts)
    return miner.report().lazy_combination


def status_row(site: str, global_round: int, status: str, reason: str) -> wire.AuditRow:
    """An audit row for a site that sent no usable statistics this round: only its status."""
    return wire.AuditRow(
        site=site,
        round=global_round,
        num_examples=None,
        availability_counts={},
        tla_scores={},
        lazy_combination=None,
        mean_dwfuse_weight={},
        imputation_error={},
        val_auroc=None,
        update_status=f"{status}:{reason}",
    )


def tla_record(tla: tuple[dict[str, float], dict[str, int]]) -> dict[str, float | int]:
    sums, counts = tla
    return {
        **{f"sum.{k}": v for k, v in sums.items()},
        **{f"count.{k}": v for k, v in counts.items()},
    }


def weighted_metrics(metrics: list[dict[str, float]]) -> dict[str, float]:
    """Sample-weighted mean of each metric over sites; undefined values (-1) are skipped.

    Counts are summed; DP epsilon (reported by DP-SGD sites only) is the largest any site
    has spent.
    """
    result: dict[str, float] = {
        wire.NUM_EXAMPLES: float(sum(m[wire.NUM_EXAMPLES] for m in metrics))
    }
    keys = {k for m in metrics for k in m} - {wire.NUM_EXAMPLES}
    for key in sorted(keys):
        if key.startswith("num-present."):
            result[key] = float(sum(m.get(key, 0) for m in metrics))
            continue
        if key == wire.EPSILON:
            result[key] = float(max(m[key] for m in metrics if key in m))
            continue
        pairs = [(m[key], m[wire.NUM_EXAMPLES]) for m in metrics if key in m and m[key] != -1.0]
        total = sum(w for _, w in pairs)
        result[key] = float(sum(v * w for v, w in pairs) / total) if total else -1.0
    return result

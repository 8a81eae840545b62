"""Optional experiment tracking: every round's global and per-site metrics to TensorBoard.

Enabled by the run-config key ``tensorboard = true`` (off by default); events go to
``RUN_DIR/tensorboard``. Needs the ``tensorboard`` package (``pip install
'omnifuse-fl[tracking]'``); asking for it without the package is an error that says so.
The tags are ``global/<group>/<metric>`` (groups: server, evaluate_clients, train, bytes,
time) and ``site/<site>/<statistic>`` from each accepted audit row (val_auroc, epsilon,
test_time_weight/<modality>, test_time_weight_imputed/<modality> for a modality the site
does not hold (the test-time confidence weight, not the training omega),
imputation_error_normalised/<modality>, tla/<combination>). Suppressed or undefined values
are not written.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from omnifuse_model import federation_schema as wire

TENSORBOARD_DIR = "tensorboard"


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value != -1.0 else None


def global_scalars(history_entry: dict) -> Iterator[tuple[str, float]]:
    """``(tag, value)`` of one metrics.json round entry (see ``RoundRecord.history_entry``)."""
    for group in ("server", "evaluate_clients", "train", "bytes"):
        for key, value in sorted((history_entry.get(group) or {}).items()):
            number = _finite(value)
            if number is not None:
                yield f"global/{group}/{key}", number
    wall = _finite(history_entry.get("wall_seconds"))
    if wall is not None:
        yield "global/time/wall_seconds", wall
    yield "global/sites/failed_or_rejected", float(len(history_entry.get("failed_or_rejected", [])))


def site_scalars(row: wire.AuditRow) -> Iterator[tuple[str, float]]:
    """``(tag, value)`` of one site's audit row; suppressed (None) values are left out."""
    prefix = f"site/{row.site}"
    for name, value in (("val_auroc", row.val_auroc), ("epsilon", row.epsilon)):
        if value is not None:
            yield f"{prefix}/{name}", float(value)
    held = row.observed_modalities
    for key, value in sorted(row.mean_dwfuse_weight.items()):
        if value is not None:  # a modality the site lacks: its weight is of an imputed embedding
            # the test-time confidence weight (docs/AUDIT.md), not the training omega
            group = (
                "test_time_weight" if held is None or key in held else "test_time_weight_imputed"
            )
            yield f"{prefix}/{group}/{key}", float(value)
    for group, values in (
        ("imputation_error_normalised", row.imputation_error_normalised),
        ("tla", row.tla_scores),
    ):
        for key, value in sorted(values.items()):
            if value is not None:
                yield f"{prefix}/{group}/{key}", float(value)


class TensorBoardTracker:
    """Writes each round's scalars as it is recorded (``RoundRecorder``'s ``tracker``)."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # torch raises ImportError naming tensorboard
            raise ImportError(
                "run config 'tensorboard = true' needs the tensorboard package: "
                "pip install 'omnifuse-fl[tracking]' (or tensorboard), or set it to false"
            ) from error
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def __call__(self, round_: int, history_entry: dict, rows: list[wire.AuditRow]) -> None:
        for tag, value in global_scalars(history_entry):
            self.writer.add_scalar(tag, value, round_)
        for row in rows:
            if row.update_status == "accepted":
                for tag, value in site_scalars(row):
                    self.writer.add_scalar(tag, value, round_)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

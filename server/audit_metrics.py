"""metrics.json as the audit report reads it: every round's entry validated before use.

The ServerApp writes ``run_dir/metrics.json`` (``RoundRecord.history_entry`` per round). The
report reads it back from disk, so a hand-edited or corrupt file must fail with the file,
the round and the field named, never surface as a traceback or a silent '-'. Metric values
are numbers or null; -1 and non-finite numbers are the documented "undefined" markers that
the report shows as '-'. Entries the report does not read (``train``, ``excluded``,
``note``) are kept as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

METRICS_JSON = "metrics.json"
MetricValue = float | None  # strict: an int is a number, a bool or a string is not


class RoundMetricsEntry(BaseModel):
    """The fields of one round's metrics.json entry that the report reads."""

    model_config = ConfigDict(strict=True, extra="allow")

    evaluate_clients: dict[str, MetricValue] = Field(
        default_factory=dict, description="Federated evaluation, sample-weighted over sites."
    )
    server: dict[str, MetricValue] = Field(
        default_factory=dict, description="Server test metrics ('test-auroc', 'test-n', ...)."
    )
    bytes: dict[str, MetricValue] = Field(
        default_factory=dict, description="'sent' and 'received' bytes of the round."
    )
    wall_seconds: MetricValue = Field(default=None, description="The round's wall-clock time.")
    failed_or_rejected: list[dict] = Field(
        default_factory=list, description="Training replies that failed or were rejected."
    )
    evaluate_failed_or_rejected: list[dict] = Field(
        default_factory=list, description="Evaluation replies that failed or were rejected."
    )


def _problem(path: Path, key: str, error: ValidationError) -> str:
    """'<file>: round <key>: field '<a.b>': <what was expected>, got <value>' for each error."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(the entry)"
        got = repr(item.get("input"))[:80]
        lines.append(f"{path}: round {key}: field '{where}': {item['msg']}, got {got}")
    return "; ".join(lines)


def read_metrics(run_dir: Path) -> dict[int, dict] | None:
    """Per-round history from metrics.json (each entry validated), or None when absent.
    Raises ``ValueError`` naming the file, the round and the field on anything else."""
    path = Path(run_dir) / METRICS_JSON
    if not path.is_file():
        return None
    try:
        history = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{path}: not readable JSON ({error})") from error
    if not isinstance(history, dict):
        raise ValueError(
            f"{path}: expected {{'<round>': {{...}}}} per-round metrics, "
            f"got a JSON {type(history).__name__}"
        )
    rounds: dict[int, dict] = {}
    for key, entry in history.items():
        if not (key.isascii() and key.isdigit()) or int(key) in rounds:
            raise ValueError(f"{path}: round key {key[:40]!r}: expected a distinct round number")
        try:
            validated = RoundMetricsEntry.model_validate(entry)
        except ValidationError as error:
            raise ValueError(_problem(path, key, error)) from error
        rounds[int(key)] = validated.model_dump()
    return rounds

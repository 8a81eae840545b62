"""The tidy per-site, per-round audit table the server keeps (CSV + JSON).

One row per (site, round). Nested aggregates become columns with a prefix:
``avail.<combination>``, ``tla.<combination>``, ``weight.<modality>``, ``imperr.<modality>``,
``imperr_norm.<modality>`` (1 - R^2); ``observed_modalities`` is '+'-joined (empty in rows
written before the field existed). Suppressed values (small counts and what derives from them)
are empty cells / JSON null.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from omnifuse_model.federation_schema import AuditRow

AUDIT_CSV = "audit.csv"
AUDIT_JSON = "audit.json"
BASE_COLUMNS = [
    "round",
    "site",
    "update_status",
    "num_examples",
    "lazy_combination",
    "val_auroc",
    "epsilon",
    "min_count",
    "observed_modalities",
]
PREFIXES = {
    "availability_counts": "avail.",
    "tla_scores": "tla.",
    "mean_dwfuse_weight": "weight.",
    "imputation_error": "imperr.",
    "imputation_error_normalised": "imperr_norm.",
}


def flatten(row: AuditRow) -> dict[str, object]:
    """One audit row as a flat dict of columns."""
    return flatten_dumped(row.model_dump(mode="json"))


def flatten_dumped(data: dict) -> dict[str, object]:
    """``flatten`` of a row's ``model_dump(mode="json")``."""
    flat = {column: data[column] for column in BASE_COLUMNS}
    if flat["observed_modalities"] is not None:
        flat["observed_modalities"] = "+".join(flat["observed_modalities"])
    for field, prefix in PREFIXES.items():
        for key, value in sorted(data[field].items()):
            flat[prefix + key] = value
    return flat


def write_audit(
    run_dir: Path, rows: list[AuditRow], dumped: list[dict] | None = None
) -> tuple[Path, Path]:
    """Rewrite audit.csv and audit.json in ``run_dir`` from all rows so far; ``dumped``: the
    rows' ``model_dump(mode="json")`` when the caller has them (the server keeps them in its
    round state), so that they are not dumped again. audit.json is written on one line
    (json's C encoder; the table for people is audit.csv)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if dumped is None:
        dumped = [r.model_dump(mode="json") for r in rows]
    elif len(dumped) != len(rows):
        raise ValueError(f"write_audit: {len(rows)} rows but {len(dumped)} dumped rows")
    order = sorted(range(len(rows)), key=lambda i: (rows[i].round, rows[i].site))
    flat = [flatten_dumped(dumped[i]) for i in order]
    columns = list(BASE_COLUMNS)
    for record in flat:
        columns.extend(c for c in record if c not in columns)
    csv_path, json_path = run_dir / AUDIT_CSV, run_dir / AUDIT_JSON
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for record in flat:
            writer.writerow({k: "" if v is None else v for k, v in record.items()})
    json_path.write_text(json.dumps(dumped))
    return csv_path, json_path


def read_audit(run_dir: Path) -> list[AuditRow]:
    """Audit rows of a run directory (from audit.json); errors name the file."""
    path = Path(run_dir) / AUDIT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no audit table in {run_dir} (expected {AUDIT_JSON})")
    try:
        rows = [AuditRow.model_validate(item) for item in json.loads(path.read_text())]
    except (json.JSONDecodeError, ValueError) as error:
        raise ValueError(f"{path}: not a valid audit table: {error}") from error
    check_unique(rows, str(path))
    return rows


def check_unique(rows: list[AuditRow], source: str) -> None:
    """Raise ``ValueError`` naming ``source``, the site and the round when two rows share a
    (site, round): the server writes one per site and round, so a second one means the
    table was edited or corrupted, and either would silently replace the other."""
    seen: set[tuple[str, int]] = set()
    for index, row in enumerate(rows):
        if (row.site, row.round) in seen:
            raise ValueError(
                f"{source}: row {index}: a second row for site {row.site!r} round {row.round} "
                "(expected one row per site and round)"
            )
        seen.add((row.site, row.round))

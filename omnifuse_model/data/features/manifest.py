"""The feature cache's manifest: which cached entries make up each split of a site.

``<cache_dir>/manifest.json`` (written by
:func:`~omnifuse_model.data.features.cache.prepare_site`)::

    {"format": "omnifuse-feature-manifest", "version": 1, "site": ..., "task": ...,
     "preprocessing_version": ..., "modalities": ["ehr", "cxr", "rep"],
     "identities": {"ehr": ..., "cxr": ..., "rep": ...}, "label_names": [...],
     "shapes": {"ehr": [24, 76], "rep": [150, 768]},
     "splits": {"train": [{"stay": "10011_episode1_timeseries.csv", "stay_id": 200001,
                           "subject_id": 10011, "labels": [0], "ehr": "<key>" | null,
                           "cxr": "<key>" | null, "rep": "<key>" | null}, ...],
                "val": [...], "test": [...]}}

Only accepted stays (at least one usable modality) are listed; a null key means the modality
is missing, rejected or not held for that stay (the ingest report says which and why).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from omnifuse_model.data.ehr.listfiles import IHM_LABELS, PHENOTYPE_LABELS
from omnifuse_model.data.features.store import PREPROCESSING_VERSION
from omnifuse_model.data.ingest_report import SPLITS

if TYPE_CHECKING:
    from omnifuse_model.data.ingest import IngestResult

MANIFEST_FILE = "manifest.json"
NORMALIZER_FILE = "ehr_normalizer.json"
AGGREGATES_FILE = "ehr_aggregates.json"
INGEST_REPORT_FILE = "ingest_report.json"
SUMMARY_FILE = "prepare_summary.json"
MANIFEST_FORMAT = "omnifuse-feature-manifest"
MANIFEST_VERSION = 1


class EhrKeys(Protocol):
    """Anything that maps an episode content digest to its cache key."""

    def key(self, digest: str) -> str: ...


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file and rename it into place."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def build_manifest(
    result: IngestResult,
    identities: Mapping[str, str],
    ehr_keys: EhrKeys,
    image_keys: Mapping[str, str],
    text_keys: Mapping[str, str],
    shapes: Mapping[str, list[int]],
) -> dict[str, Any]:
    """The manifest of ``result``'s accepted stays (see the module docstring)."""
    splits: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        entries = []
        for stay in result.split(split):
            ehr = None
            if stay.ehr is not None and stay.ehr_digest is not None:
                ehr = ehr_keys.key(stay.ehr_digest)
            image = None if stay.image_path is None else image_keys.get(str(stay.image_path))
            text = None if stay.report_text is None else text_keys.get(stay.report_text)
            entries.append(
                {
                    "stay": stay.stay,
                    "stay_id": stay.stay_id,
                    "subject_id": stay.subject_id,
                    "labels": list(stay.labels),
                    "ehr": ehr,
                    "cxr": image,
                    "rep": text,
                }
            )
        splits[split] = entries
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "site": result.site,
        "task": result.task,
        "preprocessing_version": PREPROCESSING_VERSION,
        "modalities": list(result.modalities),
        "identities": dict(identities),
        "label_names": list(
            IHM_LABELS if result.task == "in-hospital-mortality" else PHENOTYPE_LABELS
        ),
        "shapes": {name: list(shape) for name, shape in shapes.items()},
        "splits": splits,
    }


def read_manifest(cache_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``<cache_dir>/manifest.json``; errors name the file and the fix."""
    path = Path(cache_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no feature cache manifest; run `omnifuse prepare` for this site first"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read the manifest: {error}") from error
    if data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"{path}: format {data.get('format')!r} v{data.get('version')!r}, expected "
            f"{MANIFEST_FORMAT!r} v{MANIFEST_VERSION}"
        )
    if data.get("preprocessing_version") != PREPROCESSING_VERSION:
        raise ValueError(
            f"{path}: prepared with preprocessing {data.get('preprocessing_version')!r}, this "
            f"build uses {PREPROCESSING_VERSION!r}; run `omnifuse prepare` again"
        )
    return data

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
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from omnifuse_model.config import StrictModel
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
TASK_LABELS: dict[str, tuple[str, ...]] = {
    "in-hospital-mortality": IHM_LABELS,
    "phenotyping": PHENOTYPE_LABELS,
}
"""The label columns of each task; every label is 0 or 1 (binary, or multilabel flags)."""


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


class ManifestStay(StrictModel):
    """One accepted stay of a split: ids, labels and its cache key per modality."""

    model_config = ConfigDict(extra="forbid", strict=True)
    stay: str = Field(min_length=1)
    stay_id: int | None
    subject_id: int
    labels: list[Annotated[int, Field(strict=True, ge=0, le=1)]]
    """0 or 1 each (no bools, no floats), one per label of the task."""
    ehr: str | None = None
    cxr: str | None = None
    rep: str | None = None


class FeatureManifest(StrictModel):
    """``manifest.json`` as :func:`build_manifest` writes it (see the module docstring);
    strict: no coercion (``"1"`` is not a label), no unknown keys, every split present."""

    model_config = ConfigDict(extra="forbid", strict=True)
    format: Literal["omnifuse-feature-manifest"]
    version: Literal[1]
    site: str
    task: Literal["in-hospital-mortality", "phenotyping"]
    preprocessing_version: str
    modalities: list[Literal["ehr", "cxr", "rep"]]
    identities: dict[str, str]
    label_names: list[str]
    shapes: dict[Literal["ehr", "cxr", "rep"], list[int]]
    splits: dict[Literal["train", "val", "test"], list[ManifestStay]]

    @field_validator("shapes")
    @classmethod
    def _shapes_are_positive(cls, shapes: dict[str, list[int]]) -> dict[str, list[int]]:
        for name, shape in shapes.items():
            two_d = name in ("ehr", "rep")
            if (two_d and len(shape) != 2) or not shape or min(shape) < 1:
                expected = "[rows, width]: two" if two_d else "a list of"
                raise ValueError(f"{name}: {shape}: expected {expected} positive integers")
        return shapes

    @model_validator(mode="after")
    def _fits_the_task(self) -> FeatureManifest:
        expected = list(TASK_LABELS[self.task])
        if self.label_names != expected:
            raise ValueError(f"label_names {self.label_names}: task {self.task} has {expected}")
        missing = [split for split in SPLITS if split not in self.splits]
        if missing:
            raise ValueError(f"splits: missing {missing}; expected {list(SPLITS)}")
        for split, stays in self.splits.items():
            for i, stay in enumerate(stays):
                if len(stay.labels) != len(expected):
                    raise ValueError(
                        f"splits.{split}.{i}.labels: {stay.labels}: expected "
                        f"{len(expected)} label(s) of 0 or 1 for {self.task}"
                    )
        return self


def _validation_problems(error: ValidationError, limit: int = 5) -> str:
    """``field.path: message (found value)`` for the first few problems."""
    problems = []
    for item in error.errors()[:limit]:
        where = "".join(f"{part}: " for part in (".".join(map(str, item["loc"])),) if part)
        message = item["msg"].removeprefix("Value error, ")
        own = item["type"] in ("missing", "value_error")  # the message names the value itself
        found = "" if own else f" (found {item['input']!r:.60})"
        problems.append(f"{where}{message}{found}")
    more = error.error_count() - limit
    return "; ".join(problems) + (f"; and {more} more" if more > 0 else "")


def read_manifest(cache_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``<cache_dir>/manifest.json`` (:class:`FeatureManifest`: labels fit the
    task, shapes and keys are well typed); errors name the file, the field and the fix."""
    path = Path(cache_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no feature cache manifest; run `omnifuse prepare` for this site first"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read the manifest: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
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
    try:
        FeatureManifest.model_validate(data)
    except ValidationError as error:
        raise ValueError(f"{path}: invalid manifest: {_validation_problems(error)}") from None
    return data

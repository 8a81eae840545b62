"""manifest.json of a feature cache is validated before anything trains on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from omnifuse_model.data.features.manifest import MANIFEST_FILE, read_manifest
from omnifuse_model.data.features.store import PREPROCESSING_VERSION


def manifest(labels: Any = (1,)) -> dict[str, Any]:
    """A minimal well-formed in-hospital-mortality manifest with one training stay."""
    stay = {"stay": "10011_episode1_timeseries.csv", "stay_id": 200001, "subject_id": 10011,
            "labels": list(labels), "ehr": "ab" * 32, "cxr": None, "rep": None}  # fmt: skip
    return {
        "format": "omnifuse-feature-manifest", "version": 1, "site": "site_a",
        "task": "in-hospital-mortality",
        "preprocessing_version": PREPROCESSING_VERSION, "modalities": ["ehr", "cxr", "rep"],
        "identities": {"ehr": "discretizer"}, "label_names": ["y_true"],
        "shapes": {"ehr": [24, 76], "rep": [150, 768]},
        "splits": {"train": [stay], "val": [], "test": []},
    }  # fmt: skip


def write(cache: Path, data: Any) -> Path:
    cache.mkdir(exist_ok=True)
    (cache / MANIFEST_FILE).write_text(json.dumps(data))
    return cache


def broken(change) -> dict[str, Any]:
    data = manifest()
    change(data)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            manifest(labels=[7]),
            r"splits\.train\.0\.labels\.0: .*less than or equal to 1 \(found 7\)",
        ),
        (manifest(labels=[-3]), r"splits\.train\.0\.labels\.0: .*greater than or equal to 0"),
        (manifest(labels=[float("nan")]), r"splits\.train\.0\.labels\.0: .*integer \(found nan\)"),
        (manifest(labels=["1"]), r"splits\.train\.0\.labels\.0: .*integer \(found '1'\)"),
        (manifest(labels=[0, 1]), r"splits\.train\.0\.labels: \[0, 1\]: expected 1 label\(s\)"),
        ([manifest()], "expected a JSON object, found list"),
        (broken(lambda m: m.pop("splits")), "splits: Field required"),
        (broken(lambda m: m["splits"].pop("val")), r"splits: missing \['val'\]"),
        (broken(lambda m: m["shapes"].update(rep=[150])), r"shapes: rep: \[150\]: expected"),
        (broken(lambda m: m.update(label_names=["Shock"])), r"label_names \['Shock'\]"),
        (broken(lambda m: m["splits"]["train"][0].update(ehr=3)), r"splits\.train\.0\.ehr"),
    ],
)
def test_a_bad_manifest_names_the_file_and_field(tmp_path: Path, data: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        read_manifest(write(tmp_path, data))
    assert str(info.value).startswith(f"{tmp_path / MANIFEST_FILE}: ")

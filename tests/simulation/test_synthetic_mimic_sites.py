"""Synthetic hospitals become partition sites: with ``site_sidecar`` every subject goes to the
site named by its hospital in ``synthetic_stays.csv``, so each site's files carry its hospital's
quality (one site's images noisier, one site's reports shorter), measured on the site views."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omnifuse_model.site_config import load_site_config
from simulation.partition import PartitionConfig, SitePlan, partition
from simulation.synthetic_mimic.writer import SyntheticMimicConfig, write_synthetic_mimic

HOSPITALS = [
    {"name": "plain"},
    {"name": "noisy", "image_noise": 3.0},
    {"name": "terse", "report_length": 0.25},
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sites") / "data"
    config = SyntheticMimicConfig(
        num_stays=180, seed=4, cxr_missing_rate=0.2, report_missing_rate=0.1, hospitals=HOSPITALS
    )
    write_synthetic_mimic(config, out, progress=False)
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _config(data: Path, **changes) -> PartitionConfig:
    fields = {"sites": [SitePlan(name=h["name"]) for h in HOSPITALS]}
    fields |= {"site_sidecar": data / "synthetic_stays.csv", **changes}
    return PartitionConfig(data_dir=data, **fields)


def _site_subjects(site_dir: Path) -> set[int]:
    subjects = set()
    for split in ("train", "val"):
        for row in _rows(site_dir / "in-hospital-mortality" / f"{split}_listfile.csv"):
            subjects.add(int(row["stay"].split("_")[0]))
    return subjects


def test_sites_follow_the_hospitals_and_keep_their_quality(data, tmp_path):
    scenario = partition(_config(data), tmp_path)
    hospital = {int(r["subject_id"]): r["hospital"] for r in _rows(data / "synthetic_stays.csv")}
    noise, length = {}, {}
    for relative in scenario.site_configs:
        site = load_site_config(tmp_path / relative)
        subjects = _site_subjects(tmp_path / relative.parent)
        assert subjects and {hospital[s] for s in subjects} == {site.name}
        meta = _rows(site.data.cxr_metadata)  # the site's own rows; images stay in the source
        jitter = []
        for m in meta:
            if m["ViewPosition"] == "AP":
                s = m["subject_id"]
                path = (
                    site.data.cxr_dir / f"files/p{s[:2]}/p{s}/s{m['study_id']}/{m['dicom_id']}.jpg"
                )
                pixels = np.asarray(Image.open(path), dtype=float)
                jitter.append(np.diff(pixels[8:20, 40:56], axis=1).std())
        noise[site.name] = float(np.mean(jitter))
        reports = list(site.data.reports_dir.rglob("s*.txt"))
        findings = [r.read_text().split(" FINDINGS:")[1].split(" IMPRESSION:")[0] for r in reports]
        length[site.name] = float(np.mean([len(" ".join(f.split())) for f in findings]))
    assert noise["noisy"] > 1.8 * max(noise["plain"], noise["terse"])
    assert length["terse"] < 0.75 * min(length["plain"], length["noisy"])


def test_sidecar_errors_name_the_file_and_the_value(data, tmp_path):
    with pytest.raises(ValueError, match="'terse', which is not a site"):
        partition(
            PartitionConfig(
                data_dir=data,
                sites=[SitePlan(name="plain"), SitePlan(name="noisy")],
                site_sidecar=data / "synthetic_stays.csv",
            ),
            tmp_path / "a",
        )
    with pytest.raises(ValueError, match="no column.*'site'"):
        partition(_config(data, site_column="site"), tmp_path / "b")
    with pytest.raises(ValueError, match="label_alpha"):
        _config(data, label_alpha=0.5)
    bad = tmp_path / "two_sites.csv"
    bad.write_text("subject_id,hospital\n1,plain\n1,noisy\n")
    with pytest.raises(ValueError, match=r"two_sites.csv, line 3: subject 1"):
        partition(_config(data, site_sidecar=bad), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()

"""`omnifuse partition`: whole patients per site, site views the real readers accept."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from omnifuse_model.data.ehr.listfiles import read_task_split
from omnifuse_model.scenario import Scenario
from omnifuse_model.site_config import load_site_config
from simulation.partition import (
    PartitionConfig,
    SitePlan,
    assign_subjects,
    default_site_plans,
    partition,
)
from simulation.synthetic_mimic.writer import SyntheticMimicConfig, write_synthetic_mimic


@pytest.fixture(scope="module")
def mimic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mimic") / "data"
    write_synthetic_mimic(
        SyntheticMimicConfig(num_stays=120, seed=3, image_size=32), out, progress=False
    )
    return out


def _subjects(listfile: Path) -> set[int]:
    with listfile.open() as handle:
        return {int(row["stay"].split("_")[0]) for row in csv.DictReader(handle)}


def test_sites_hold_whole_disjoint_patients_and_readable_views(mimic, tmp_path):
    scenario = partition(
        PartitionConfig(data_dir=mimic, sites=default_site_plans(3), seed=1), tmp_path
    )
    task = mimic / "in-hospital-mortality"
    source = _subjects(task / "train_listfile.csv") | _subjects(task / "val_listfile.csv")
    seen: set[int] = set()
    for relative in scenario.site_configs:
        site = load_site_config(tmp_path / relative)
        listfiles = site.data.benchmark_dir
        mine = _subjects(listfiles / "train_listfile.csv") | _subjects(
            listfiles / "val_listfile.csv"
        )
        assert not mine & seen, "a patient at two sites"
        seen |= mine
        for split in ("train", "val"):
            assert not read_task_split(listfiles, split).rejected
    assert seen == source
    test_site = load_site_config(tmp_path / scenario.server_test_site)
    assert _subjects(test_site.data.benchmark_dir / "test_listfile.csv") == _subjects(
        task / "test_listfile.csv"
    )
    assert json.loads((tmp_path / "scenario.json").read_text())["model_config"]["task"] == "binary"


def test_site_modality_availability(mimic, tmp_path):
    plans = [
        SitePlan(name="full"),
        SitePlan(name="no_reports", modalities=["ehr", "cxr"]),
        SitePlan(name="few_xrays", cxr_keep=0.0),
    ]
    partition(PartitionConfig(data_dir=mimic, sites=plans, seed=2), tmp_path)
    no_reports = load_site_config(tmp_path / "no_reports" / "site.toml")
    assert no_reports.modalities == ["ehr", "cxr"] and no_reports.data.reports_dir is None
    assert not (tmp_path / "no_reports" / "mimic-cxr-reports").exists()
    with (tmp_path / "few_xrays" / "mimic-cxr-2.0.0-metadata.csv").open() as handle:
        assert len(list(csv.reader(handle))) == 1  # header only: every study dropped
    with (tmp_path / "full" / "mimic-cxr-2.0.0-metadata.csv").open() as handle:
        assert len(list(csv.reader(handle))) > 1


def test_label_skew_and_size_skew():
    rng = np.random.default_rng(0)
    classes = {i: int(rng.random() < 0.3) for i in range(3000)}
    plans = [SitePlan(name="a", size_weight=1.0), SitePlan(name="b", size_weight=3.0)]
    even = assign_subjects(classes, plans, alpha=None, seed=0, min_subjects=1)
    sizes = np.bincount(list(even.values()))
    assert sizes[1] / sizes.sum() == pytest.approx(0.75, abs=0.01)
    rates = [np.mean([classes[s] for s, site in even.items() if site == k]) for k in (0, 1)]
    assert rates[0] == pytest.approx(rates[1], abs=0.02)
    plans = [SitePlan(name=n) for n in "abcde"]
    skewed = assign_subjects(classes, plans, alpha=0.1, seed=0, min_subjects=1)
    rates = [np.mean([classes[s] for s, site in skewed.items() if site == k]) for k in range(5)]
    assert max(rates) - min(rates) > 0.3
    assert skewed == assign_subjects(classes, plans, alpha=0.1, seed=0, min_subjects=1)


def test_bad_input_is_named(mimic, tmp_path):
    with pytest.raises(ValueError, match="subjects"):
        assign_subjects({1: 0, 2: 1}, default_site_plans(3), None, 0, min_subjects=1)
    with pytest.raises(FileNotFoundError, match="train_listfile.csv"):
        partition(PartitionConfig(data_dir=tmp_path, sites=default_site_plans(2)), tmp_path / "o")
    with pytest.raises(ValueError, match="ehr"):
        SitePlan(name="x", modalities=["cxr"])


def test_awkward_paths_survive_and_scenario_reads_back_typed(mimic, tmp_path):
    """Site configs are TOML written by SiteConfig.to_toml: quotes, backslashes, spaces and
    non-ASCII in the data path and backbone paths cannot break them."""
    awkward = tmp_path / 'MIMIC "v2" \\ données'
    shutil.copytree(mimic, awkward)
    weights = tmp_path / "weights 'r34' \\.pt"
    config = PartitionConfig(
        data_dir=awkward,
        task="phenotyping",
        sites=[SitePlan(name="full"), SitePlan(name="no_reports", modalities=["ehr", "cxr"])],
        seed=1,
        backbones={"resnet34_weights": weights},
    )
    written = partition(config, tmp_path / "out")
    scenario = Scenario.load(tmp_path / "out")
    assert scenario == written.resolve_paths((tmp_path / "out").resolve())
    assert scenario.task == "phenotyping" and scenario.model.num_classes == 25
    assert [s.site for s in scenario.sites] == ["full", "no_reports", "server_test"]
    for path in [*scenario.site_configs, scenario.server_test_site]:
        site = load_site_config(path)
        assert site.data.cxr_dir == awkward / "mimic-cxr-jpg"
        assert site.backbones.resnet34_weights == weights
        assert site.task == "phenotyping"
        assert site.data.ehr_normalizer is None  # the federation sends its normaliser

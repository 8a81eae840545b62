"""Sites for the deployment tests: a prepared MIMIC-format site (synthetic files in the real
layouts, the default frozen backbones, a shared report vocabulary file) and feature-level
scenarios."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.data.features.backbones import wordpiece_vocabulary
from omnifuse_model.data.features.cache import prepare_site
from omnifuse_model.site_config import SiteConfig
from omnifuse_model.synthetic import SyntheticFeatureConfig, SyntheticModality
from simulation.scenarios import write_feature_scenario
from simulation.synthetic_mimic.writer import SyntheticMimicConfig, write_synthetic_mimic

IHM = "in-hospital-mortality"


def write_vocab(path: Path, words: list[str]) -> Path:
    """A BERT vocab.txt over ``words`` (the consortium's shared report vocabulary)."""
    path.write_text("\n".join(wordpiece_vocabulary(words, 300)) + "\n", encoding="utf-8")
    return path


def mimic_site(root: Path, cache: Path, vocab: Path) -> SiteConfig:
    return SiteConfig(
        name="site_a",
        task=IHM,
        modalities=["ehr", "cxr", "rep"],
        cache_dir=cache,
        device="cpu",
        data={
            "benchmark_dir": root / IHM,
            "stays_csv": root / "root" / "all_stays.csv",
            "cxr_dir": root / "mimic-cxr-jpg",
            "reports_dir": root / "mimic-cxr-reports",
        },
        backbones={"wordpiece_vocab": vocab},
    )


@pytest.fixture(scope="session")
def prepared_site(tmp_path_factory: pytest.TempPathFactory) -> SiteConfig:
    """A MIMIC-format site whose feature cache `omnifuse prepare` built (read-only: copy
    it with `site_copy` before damaging anything)."""
    root = tmp_path_factory.mktemp("mimic_site") / "data"
    write_synthetic_mimic(
        SyntheticMimicConfig(num_stays=60, seed=5, image_size=32, mortality_prevalence=0.4),
        root,
        False,
    )
    vocab = write_vocab(root / "vocab.txt", ["no acute findings", "pleural effusion left"])
    site = mimic_site(root, root / "cache", vocab)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prepare_site(site, progress=False, batch_size=16)
    finally:
        torch.set_num_threads(threads)
    return site


@pytest.fixture
def site_copy(prepared_site: SiteConfig, tmp_path: Path) -> SiteConfig:
    """The prepared site with a private copy of its feature cache."""
    cache = tmp_path / "cache"
    shutil.copytree(prepared_site.cache_dir, cache)
    return prepared_site.model_copy(update={"cache_dir": cache})


def feature_scenario(directory: Path) -> Path:
    """Two feature-level sites (site_0: ehr+cxr, site_1: ehr) and scenario.json."""
    data = SyntheticFeatureConfig(
        modalities=[
            SyntheticModality(name="ehr", dim=8, signal=1.5, noise=0.5, missing_rate=0.1),
            SyntheticModality(name="cxr", dim=8, signal=1.0, noise=1.0, missing_rate=0.3),
        ]
    )
    model = OmniFuseConfig(
        modalities=data.modality_specs(), task="binary", d=8, cra_hidden=(16, 8), num_blocks=1
    )
    write_feature_scenario(
        directory,
        data,
        model,
        site_modalities=[["ehr", "cxr"], ["ehr"]],
        site_sizes=[(80, 40), (60, 40)],
        test_size=100,
    )
    return directory


@pytest.fixture
def two_site_scenario(tmp_path: Path) -> Path:
    """site_0 (ehr + cxr) and site_1 (ehr only), tiny synthetic features; the directory."""
    return feature_scenario(tmp_path / "scenario")

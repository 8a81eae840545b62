"""The report fallback of a simulated scenario is the consortium's vocabulary file: written once
by `omnifuse prepare --scenario` from the sites' train reports, the same vocabulary (so the same
backbone identity, cache keys and features) as the in-memory shared fallback it replaces."""

from __future__ import annotations

import pytest

from omnifuse_model.data.features.backbones import TextBackbone, read_wordpiece_vocabulary
from omnifuse_model.data.ingest import ingest_site
from omnifuse_model.site_config import BackboneConfig, SiteConfig
from simulation.preparation import shared_fallback_text_backbone
from simulation.synthetic_mimic.writer import SyntheticMimicConfig, write_synthetic_mimic

IHM = "in-hospital-mortality"


def _site(root, name: str, vocab) -> SiteConfig:
    return SiteConfig(
        name=name, task=IHM, modalities=["ehr", "rep"], cache_dir=root / f"cache_{name}",
        device="cpu", backbones=BackboneConfig(wordpiece_vocab=vocab),
        data={"benchmark_dir": root / name / IHM,
              "stays_csv": root / name / "root" / "all_stays.csv",
              "cxr_dir": root / name / "mimic-cxr-jpg",
              "reports_dir": root / name / "mimic-cxr-reports"},
    )  # fmt: skip


def test_the_scenario_vocabulary_file_is_the_shared_fallback(tmp_path):
    for k, name in enumerate(("a", "b")):
        config = SyntheticMimicConfig(num_stays=30, seed=3 + k, image_size=32)
        write_synthetic_mimic(config, tmp_path / name, progress=False)
    vocab = tmp_path / "wordpiece_vocab.txt"
    sites = [_site(tmp_path, name, vocab) for name in ("a", "b")]
    factory = shared_fallback_text_backbone(sites)
    assert vocab.is_file()
    texts = sorted(
        {s.report_text for site in sites for s in ingest_site(site).split("train") if s.report_text}
    )
    in_memory = TextBackbone(None, fallback_texts=texts)
    assert read_wordpiece_vocabulary(vocab) == in_memory.vocabulary
    assert factory([]).identity == in_memory.identity
    again = shared_fallback_text_backbone(sites)  # a second prepare reads the file
    assert again([]).identity == in_memory.identity
    other = _site(tmp_path, "b", tmp_path / "elsewhere.txt")
    with pytest.raises(ValueError, match="different WordPiece vocabularies"):
        shared_fallback_text_backbone([sites[0], other])

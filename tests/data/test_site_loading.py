"""Loading a prepared site: bit-identical to a plain row-by-row reading of the shards.

The loader gathers rows with one index per shard, parses each shard's records once per
process and hashes shards on threads; the reference here reads every entry on its own with
the ``safetensors`` library and scales the EHR as the loader always did (present rows only,
one ``EHRNormalizer.transform``), so any change of a single bit is caught.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import Tensor, nn

from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.data.ehr.normalizer import EHRNormalizer
from omnifuse_model.data.features import cache as cache_module
from omnifuse_model.data.features.backbones import TextBackbone
from omnifuse_model.data.features.cache import prepare_site
from omnifuse_model.data.features.episode_cache import EpisodeCache
from omnifuse_model.data.features.mapped_rows import MappedRows
from omnifuse_model.data.features.site_dataset import (
    load_cached_split,
    load_cached_splits,
    mimic_model_modalities,
)
from omnifuse_model.site_config import SiteConfig
from omnifuse_model.site_data import load_site_datasets
from simulation.synthetic_mimic.writer import SyntheticMimicConfig, write_synthetic_mimic

IHM = "in-hospital-mortality"
TEXT_HIDDEN = 16
FIELDS = {"ehr": "ehr", "cxr": "features", "rep": "states"}


class TinyTrunk(nn.Module):
    """A cheap stand-in for the ResNet-34 trunk: [B, 3, 224, 224] -> [B, 512]."""

    identity = "tiny-trunk-loading-v1"

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(512, 3 * 8 * 8, generator=generator) / 14)

    def forward(self, images: Tensor) -> Tensor:
        return nn.functional.adaptive_avg_pool2d(images, 8).flatten(1) @ self.weight.T


def _text_backbone(texts: Sequence[str]) -> TextBackbone:
    return TextBackbone(
        None, fallback_texts=texts, fallback_hidden_size=TEXT_HIDDEN, fallback_layers=1,
        fallback_heads=2, fallback_vocab_size=300,
    )  # fmt: skip


def _site(root: Path, modalities: Sequence[str] = ("ehr", "cxr", "rep")) -> SiteConfig:
    return SiteConfig(
        name="site_a", task=IHM, modalities=list(modalities), cache_dir=root / "cache",
        device="cpu",
        data={"benchmark_dir": root / IHM, "stays_csv": root / "root" / "all_stays.csv",
              "cxr_dir": root / "mimic-cxr-jpg", "reports_dir": root / "mimic-cxr-reports"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared 48-stay site whose entries are spread over many small shards (EHR episodes
    too: 8 a shard instead of 256)."""
    root = tmp_path_factory.mktemp("loading") / "data"
    write_synthetic_mimic(SyntheticMimicConfig(num_stays=48, seed=5, image_size=32), root, False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cache_module, "EpisodeCache", partial(EpisodeCache, shard_size=8))
        try:
            prepare_site(
                _site(root), progress=False, batch_size=4, image_backbone=TinyTrunk(),
                text_backbone=_text_backbone,
            )  # fmt: skip
        finally:
            torch.set_num_threads(threads)
    return root


def _reference_row(cache: Path, modality: str, key: str, field: str) -> Tensor:
    """One entry's row, found by scanning the shards' metadata with the safetensors library."""
    for shard in sorted((cache / "features" / modality).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            metadata = handle.metadata()
            if key in metadata:
                row = json.loads(metadata[key])["row"]
                return handle.get_tensor(field)[row]
    raise AssertionError(f"{modality} entry {key} not in any shard")


def _reference(site: SiteConfig, split: str, scaler: EHRNormalizer) -> dict[str, Tensor | list]:
    """The split as a straightforward loader builds it: a zero row per absent entry, each
    present row read on its own, present EHR rows scaled together, empty stays left out."""
    cache = Path(site.cache_dir)
    manifest = json.loads((cache / "manifest.json").read_text())
    stays = manifest["splits"][split]
    specs = mimic_model_modalities(TEXT_HIDDEN)
    out: dict[str, Tensor | list] = {
        spec.name: torch.zeros(len(stays), *spec.input_shape) for spec in specs
    }
    mask = torch.zeros(len(stays), specs[2].input_shape[0], dtype=torch.bool)
    available = torch.zeros(len(stays), len(specs), dtype=torch.bool)
    for index, stay in enumerate(stays):
        for column, spec in enumerate(specs):
            key = stay.get(spec.name) if spec.name in site.modalities else None
            if key is None:
                continue
            available[index, column] = True
            out[spec.name][index] = _reference_row(cache, spec.name, key, FIELDS[spec.name]).float()
            if spec.name == "rep":
                mask[index] = _reference_row(cache, "rep", key, "mask")
    present = available[:, 0]
    if present.any():
        out["ehr"][present] = torch.from_numpy(scaler.transform(out["ehr"][present].numpy()))
    keep = available.any(dim=1)
    out.update(
        mask=mask[keep], availability=available[keep],
        labels=torch.tensor([s["labels"] for s in stays], dtype=torch.float32)[keep],
        ids=[s["stay"] for s, kept in zip(stays, keep.tolist(), strict=True) if kept],
    )  # fmt: skip
    for spec in specs:
        out[spec.name] = out[spec.name][keep]
    return out


def _assert_identical(data, expected: dict[str, Tensor | list]) -> None:
    assert data.sample_ids == expected["ids"]
    assert torch.equal(data.availability, expected["availability"])
    assert torch.equal(data.labels, expected["labels"])
    for name in ("ehr", "cxr"):
        assert isinstance(data.inputs[name], Tensor) and data.inputs[name].dtype == torch.float32
        assert torch.equal(data.inputs[name], expected[name]), name
    assert isinstance(data.inputs["rep"], MappedRows)  # token states stay in the maps
    assert torch.equal(data.inputs["rep"][:], expected["rep"])
    assert torch.equal(data.masks["rep"], expected["mask"])


@pytest.mark.parametrize(
    "modalities", [("ehr", "cxr", "rep"), ("ehr", "rep"), ("cxr",)], ids=lambda m: "+".join(m)
)
def test_every_split_is_bit_identical_to_the_reference(prepared: Path, modalities) -> None:
    site = _site(prepared, modalities)
    own = EHRNormalizer.load(Path(site.cache_dir) / "ehr_normalizer.json")
    loaded = load_cached_splits(site, ["train", "val", "test"])
    assert sorted(loaded) == ["test", "train", "val"]
    for split, data in loaded.items():
        _assert_identical(data, _reference(site, split, own))
        _assert_identical(load_cached_split(site, split), _reference(site, split, own))


def test_a_given_normaliser_is_applied_exactly(prepared: Path) -> None:
    """The federation's normaliser (here: shifted statistics) scales as in the reference."""
    site = _site(prepared)
    own = EHRNormalizer.load(Path(site.cache_dir) / "ehr_normalizer.json")
    other = EHRNormalizer(
        own.means + np.linspace(0.1, 2.0, own.means.shape[0]),
        own.stds * 1.7, own.columns, own.count,
    )  # fmt: skip
    model = OmniFuseConfig(
        modalities=mimic_model_modalities(TEXT_HIDDEN), task="binary", num_classes=1
    )
    datasets = load_site_datasets(site, model, normalizer=other)
    _assert_identical(datasets.train, _reference(site, "train", other))
    _assert_identical(datasets.val, _reference(site, "val", other))
    assert not torch.equal(datasets.train.inputs["ehr"], _reference(site, "train", own)["ehr"])


def test_stays_without_ehr_keep_zero_rows_and_the_rest_scale_as_before(
    prepared: Path, tmp_path: Path
) -> None:
    """Some stays lack the EHR (null key): their rows stay zero, the others are scaled as in
    the reference, and a stay left with no modality is dropped."""
    shutil.copytree(prepared / "cache", tmp_path / "cache")
    manifest_path = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for stays in manifest["splits"].values():
        for stay in stays[::3]:
            stay["ehr"] = None
    manifest_path.write_text(json.dumps(manifest))
    site = _site(prepared).model_copy(update={"cache_dir": tmp_path / "cache"})
    own = EHRNormalizer.load(tmp_path / "cache" / "ehr_normalizer.json")
    dropped = without_ehr = 0
    for split in ("train", "val", "test"):
        data = load_cached_split(site, split)
        _assert_identical(data, _reference(site, split, own))
        without_ehr += int((~data.availability[:, 0]).sum())
        dropped += len(manifest["splits"][split]) - len(data)
    assert dropped > 0 and without_ehr > 0


def test_the_cache_spreads_over_many_shards(prepared: Path) -> None:
    """The fixture exercises the per-shard gather: every modality spans several shards."""
    for modality in ("ehr", "cxr", "rep"):
        shards = list((prepared / "cache" / "features" / modality).glob("*.safetensors"))
        assert len(shards) >= 2, modality

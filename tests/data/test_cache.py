"""Feature cache: miss then hit, resume, keys, train-only normaliser, the cached dataset."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.data.ehr.normalizer import EHRNormalizer, compute_aggregates
from omnifuse_model.data.features.backbones import (
    REPORT_TOKENS,
    RESNET34_FEATURES,
    TextBackbone,
    vocabulary_sha256,
    wordpiece_vocabulary,
)
from omnifuse_model.data.features.cache import prepare_site
from omnifuse_model.data.features.site_dataset import load_cached_split, mimic_model_modalities
from omnifuse_model.data.features.store import (
    CacheLockedError,
    CorruptShardError,
    FeatureStore,
    entry_key,
)
from omnifuse_model.data.ingest import ingest_site
from omnifuse_model.site_config import SiteConfig
from omnifuse_model.site_data import load_site_datasets, load_site_test_dataset
from omnifuse_model.synthetic import SyntheticFeatureConfig, SyntheticModality
from simulation.preparation import shared_fallback_text_backbone
from simulation.synthetic_mimic.writer import SyntheticMimicConfig, write_synthetic_mimic

IHM = "in-hospital-mortality"
TEXT_HIDDEN = 16


class TinyTrunk(nn.Module):
    """A cheap stand-in for the ResNet-34 trunk: [B, 3, 224, 224] -> [B, 512]."""

    def __init__(self, identity: str = "tiny-trunk-v1", fail_after: int | None = None) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(512, 3 * 8 * 8, generator=generator) / 14)
        self.identity, self.fail_after, self.seen = identity, fail_after, 0

    def forward(self, images: Tensor) -> Tensor:
        if self.fail_after is not None and self.seen + len(images) > self.fail_after:
            raise RuntimeError("simulated crash of the backbone")
        self.seen += len(images)
        pooled = nn.functional.adaptive_avg_pool2d(images, 8).flatten(1)
        return pooled @ self.weight.T


class TextSpy:
    """Builds a small fallback TextBackbone; records the texts it was trained and run on."""

    def __init__(self) -> None:
        self.trained_on: list[str] = []
        self.encoded = 0

    def __call__(self, texts: Sequence[str]) -> TextBackbone:
        self.trained_on = list(texts)
        backbone = TextBackbone(
            None, fallback_texts=texts, fallback_hidden_size=TEXT_HIDDEN, fallback_layers=1,
            fallback_heads=2, fallback_vocab_size=300,
        )  # fmt: skip
        encode = backbone.encode

        def counted(batch: Sequence[str], batch_size: int = 8) -> tuple[Tensor, Tensor]:
            self.encoded += len(batch)
            return encode(batch, batch_size)

        backbone.encode = counted  # type: ignore[method-assign]
        return backbone


def make_site(root: Path, cache: str = "cache", task: str = IHM,
              modalities: Sequence[str] = ("ehr", "cxr", "rep")) -> SiteConfig:  # fmt: skip
    return SiteConfig(
        name="site_a", task=task, modalities=list(modalities), cache_dir=root / cache,
        device="cpu",
        data={"benchmark_dir": root / task, "stays_csv": root / "root" / "all_stays.csv",
              "cxr_dir": root / "mimic-cxr-jpg", "reports_dir": root / "mimic-cxr-reports"},
    )  # fmt: skip


def prepare(site: SiteConfig, trunk: nn.Module | None = None, spy: TextSpy | None = None,
            batch_size: int = 4, num_workers: int = 0):  # fmt: skip
    return prepare_site(
        site, progress=False, batch_size=batch_size, num_workers=num_workers,
        image_backbone=trunk or TinyTrunk(), text_backbone=spy or TextSpy(),
    )  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mimic") / "data"
    write_synthetic_mimic(SyntheticMimicConfig(num_stays=40, seed=11, image_size=32), root, False)
    return root


@pytest.fixture
def root(clean_root: Path, tmp_path: Path) -> Path:
    """A private copy that a test may damage."""
    shutil.copytree(clean_root, tmp_path / "data", ignore=shutil.ignore_patterns("cache*"))
    return tmp_path / "data"


def stats(summary, modality: str) -> tuple[int, int, int]:
    entry = summary.modalities[modality]
    return entry.items, entry.hits, entry.misses


def test_miss_then_hit(root: Path) -> None:
    site = make_site(root)
    first_spy, second_spy = TextSpy(), TextSpy()
    first = prepare(site, spy=first_spy)
    for modality in ("ehr", "cxr", "rep"):
        items, hits, misses = stats(first, modality)
        assert items > 0 and hits == 0 and misses == items, modality
    manifest = (site.cache_dir / "manifest.json").read_text()
    trunk = TinyTrunk()
    second = prepare(site, trunk=trunk, spy=second_spy)
    for modality in ("ehr", "cxr", "rep"):
        items, hits, misses = stats(second, modality)
        assert (items, hits, misses) == (stats(first, modality)[0], items, 0), modality
    assert second.misses == 0 and second.hits == first.misses
    assert trunk.seen == 0 and second_spy.encoded == 0  # nothing computed
    assert (site.cache_dir / "manifest.json").read_text() == manifest
    saved = json.loads((site.cache_dir / "prepare_summary.json").read_text())
    assert saved["misses"] == 0 and saved["hits"] == second.hits
    # The fallback tokenizer saw the train split's reports only.
    result = ingest_site(site)
    train = [s.report_text for s in result.split("train") if s.report_text]
    assert first_spy.trained_on == train and len(train) < len(
        [s for s in result.stays if s.report_text]
    )


def test_resume_after_an_interruption(root: Path) -> None:
    site = make_site(root)
    reference = prepare(make_site(root, cache="reference"))
    total = reference.modalities["cxr"].items
    assert total >= 8
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(site, trunk=TinyTrunk(fail_after=6), batch_size=4)
    done = len(FeatureStore(site.cache_dir).index("cxr"))
    assert done == 4  # the batches whose forward pass finished were kept
    assert not list(site.cache_dir.rglob("*.tmp"))
    resumed = prepare(site, batch_size=4)
    assert stats(resumed, "cxr") == (total, done, total - done)
    assert stats(resumed, "ehr")[2] == 0  # ingest had finished before the crash
    ours, theirs = FeatureStore(site.cache_dir), FeatureStore(site.cache_dir.parent / "reference")
    keys = sorted(theirs.index("cxr"))
    assert sorted(ours.index("cxr")) == keys
    mine, reference_entries = ours.load("cxr", keys), theirs.load("cxr", keys)
    for key in keys:
        a, b = mine[key].tensors.get("features"), reference_entries[key].tensors.get("features")
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    assert (site.cache_dir / "manifest.json").read_text() == (
        site.cache_dir.parent / "reference" / "manifest.json"
    ).read_text()


def test_keys_follow_identity_and_content(root: Path) -> None:
    assert len({entry_key("cxr", "a", "1"), entry_key("cxr", "b", "1"),
                entry_key("cxr", "a", "2"), entry_key("rep", "a", "1")}) == 4  # fmt: skip
    site = make_site(root)
    first = prepare(site)
    images = first.modalities["cxr"].items
    other = prepare(site, trunk=TinyTrunk(identity="tiny-trunk-v2"))
    assert stats(other, "cxr") == (images, 0, images)
    assert other.identities["cxr"] != first.identities["cxr"]
    assert stats(other, "ehr")[2] == stats(other, "rep")[2] == 0

    result = ingest_site(site)
    with_image = next(s for s in result.stays if s.image_path is not None)
    with_image.image_path.write_bytes(with_image.image_path.read_bytes() + b"\0")
    val_report = next(s for s in result.split("val") if s.report_text)
    path = next((root / "mimic-cxr-reports").rglob(f"s{val_report.study_id}.txt"))
    path.write_text(path.read_text().replace("FINDINGS:", "FINDINGS: Changed."))
    episode = root / IHM / ("test" if result.stays[0].split == "test" else "train")
    episode = episode / result.stays[0].stay
    episode.write_text(episode.read_text() + "\n")  # a blank row: same data, other bytes
    changed = prepare(site)
    assert stats(changed, "cxr")[2] == 1
    assert stats(changed, "rep")[2] == 1  # a val text: the fallback tokenizer is unchanged
    assert changed.identities["rep"] == first.identities["rep"]
    assert stats(changed, "ehr")[2] == 1

    train_report = next(s for s in result.split("train") if s.report_text)
    path = next((root / "mimic-cxr-reports").rglob(f"s{train_report.study_id}.txt"))
    path.write_text(path.read_text().replace("FINDINGS:", "FINDINGS: Other."))
    retrained = prepare(site)  # a train text changes the tokenizer, hence every rep key
    assert retrained.identities["rep"] != first.identities["rep"]
    assert stats(retrained, "rep")[1] == 0


def test_normalizer_is_fitted_on_train_only(root: Path) -> None:
    site = make_site(root)
    summary = prepare(site)
    result = ingest_site(site)
    train = [s.ehr for s in result.split("train") if s.ehr is not None]
    everything = [s.ehr for s in result.stays if s.ehr is not None]
    assert len(everything) > len(train) > 0
    normalizer = EHRNormalizer.load(site.cache_dir / "ehr_normalizer.json")
    expected = EHRNormalizer.fit(train)
    assert normalizer.count == summary.normalizer_bins == 24 * len(train)
    np.testing.assert_allclose(normalizer.means, expected.means)
    np.testing.assert_allclose(normalizer.stds, expected.stds)
    assert not np.allclose(normalizer.means, EHRNormalizer.fit(everything).means)
    saved = json.loads((site.cache_dir / "ehr_aggregates.json").read_text())
    aggregates = compute_aggregates(train)
    assert saved["count"] == aggregates.count
    np.testing.assert_allclose(saved["sums"], aggregates.sums)
    np.testing.assert_allclose(saved["sumsq"], aggregates.sumsq)


def test_cached_dataset_layout(root: Path) -> None:
    site = make_site(root)
    prepare(site)
    result = ingest_site(site)
    normalizer = EHRNormalizer.load(site.cache_dir / "ehr_normalizer.json")
    for split in ("train", "val", "test"):
        data = load_cached_split(site, split)
        stays = {s.stay: s for s in result.split(split)}
        assert data.sample_ids == [s.stay for s in result.split(split)]
        assert data.inputs["ehr"].shape == (len(data), 24, 76)
        assert data.inputs["cxr"].shape == (len(data), 512)
        assert data.inputs["rep"].shape == (len(data), 150, TEXT_HIDDEN)
        assert data.inputs["rep"].dtype == torch.float32 and data.masks["rep"].dtype == torch.bool
        assert data.labels.shape == (len(data), 1)
        for row, name in enumerate(data.sample_ids):
            stay = stays[name]
            present = [m in stay.usable_modalities for m in ("ehr", "cxr", "rep")]
            assert data.availability[row].tolist() == present
            assert data.labels[row].tolist() == [float(stay.labels[0])]
            if stay.ehr is not None:
                expected = torch.from_numpy(normalizer.transform(stay.ehr))
                torch.testing.assert_close(data.inputs["ehr"][row], expected)
            if not present[1]:
                assert not data.inputs["cxr"][row].any()
            mask = data.masks["rep"][row]
            assert bool(mask.any()) == present[2] and bool(mask[0]) == present[2]

    # A model modality the site does not hold is zeros + unavailable.
    specs = {spec.name: spec.input_shape for spec in mimic_model_modalities()}
    assert specs == {"ehr": (24, 76), "cxr": (RESNET34_FEATURES,), "rep": (REPORT_TOKENS, 768)}
    no_images = make_site(root, modalities=("ehr", "rep"))
    data = load_cached_split(no_images, "train", modalities=mimic_model_modalities(TEXT_HIDDEN))
    assert not data.availability[:, 1].any() and not data.inputs["cxr"].any()


def test_decode_failures_are_counted_and_remembered(root: Path) -> None:
    site = make_site(root)
    result = ingest_site(site)
    victim = next(s for s in result.stays if s.image_path is not None)
    data = victim.image_path.read_bytes()
    victim.image_path.write_bytes(data[: len(data) // 2])  # the header still parses
    assert ingest_site(site).report().totals()["cxr"].counts["rejected"] == 0
    for run in range(2):
        trunk = TinyTrunk()
        summary = prepare(site, trunk=trunk, num_workers=1)  # decoded in a worker process
        assert summary.modalities["cxr"].failed == 1
        report = json.loads((site.cache_dir / "ingest_report.json").read_text())
        assert report["totals"]["cxr"]["rejected_by_reason"] == {"unreadable_image": 1}
        assert any(p["stay"] == victim.stay for p in report["problems"])
        manifest = json.loads((site.cache_dir / "manifest.json").read_text())
        entry = next(e for e in manifest["splits"][victim.split] if e["stay"] == victim.stay)
        assert entry["cxr"] is None
        if run == 1:
            assert summary.modalities["cxr"].misses == 0 and trunk.seen == 0


def test_a_decompression_bomb_is_one_rejection_not_a_crash(root: Path, jpeg_declaring) -> None:
    site = make_site(root)
    linked = [s for s in ingest_site(site).stays if s.image_path is not None]
    bomb, cut = linked[0], linked[1]
    jpeg_declaring(bomb.image_path, 30000, 30000)
    data = cut.image_path.read_bytes()
    cut.image_path.write_bytes(data[: len(data) // 2])  # header fine, fails when decoded
    summary = prepare(site, num_workers=1)
    report = json.loads((site.cache_dir / "ingest_report.json").read_text())
    assert report["totals"]["cxr"]["rejected_by_reason"] == {
        "oversized_image": 1, "unreadable_image": 1
    }  # fmt: skip
    problems = {p["stay"]: p for p in report["problems"] if p["modality"] == "cxr"}
    assert problems[bomb.stay]["reason"] == "oversized_image"
    assert (
        "DecompressionBomb" in problems[bomb.stay]["detail"]
        or "pixels" in (problems[bomb.stay]["detail"])
    )
    assert problems[cut.stay]["reason"] == "unreadable_image"
    images = summary.modalities["cxr"]
    assert (images.items, images.failed) == (len({s.image_path for s in linked}) - 1, 1)


def test_store_skips_unreadable_shards_and_locks(root: Path, caplog) -> None:
    site = make_site(root, modalities=("ehr",))
    prepare(site)
    (site.cache_dir / "features" / "ehr" / "garbage.safetensors").write_bytes(b"\x00" * 10)
    summary = prepare(site)
    assert summary.modalities["ehr"].misses == 0
    assert "garbage.safetensors: feature shard fails its checksum, moved aside" in caplog.text
    assert summary.corrupt_shards == {
        "ehr": {"garbage.safetensors": "its name is not a SHA-256 (written before shards "
                "carried checksums)"}
    }  # fmt: skip
    store = FeatureStore(site.cache_dir)
    with store.lock(), pytest.raises(CacheLockedError, match="another process"):
        prepare(site)


@pytest.mark.parametrize("modality", ["ehr", "cxr"])
@pytest.mark.parametrize("damage", ["random_bytes", "truncated"])
def test_a_corrupted_shard_is_detected_and_recomputed(root: Path, modality: str, damage: str):
    site = make_site(root, modalities=("ehr", "cxr"))
    first = prepare(site)
    before = {split: load_cached_split(site, split) for split in ("train", "val", "test")}
    shard = sorted((site.cache_dir / "features" / modality).glob("*.safetensors"))[0]
    data = shard.read_bytes()
    if damage == "random_bytes":  # the header still parses: the values would be garbage
        noise = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
        shard.write_bytes(data[:-64] + noise)
    else:
        shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptShardError, match=rf"{shard.name}.*omnifuse prepare"):
        for split in ("train", "val", "test"):  # training-time load: a clear error
            load_cached_split(site, split)

    summary = prepare(site)
    assert list(summary.corrupt_shards) == [modality]
    assert shard.name in summary.corrupt_shards[modality]
    assert shard.with_name(shard.name + ".corrupt").is_file()
    redone = summary.modalities[modality]
    assert redone.items == first.modalities[modality].items and redone.misses > 0  # no hit
    for split in ("train", "val", "test"):
        dataset = load_cached_split(site, split)
        assert torch.equal(dataset.inputs[modality], before[split].inputs[modality])
    assert prepare(site).corrupt_shards == {}


def test_a_different_report_vocabulary_is_a_cache_miss(root: Path) -> None:
    site = make_site(root, modalities=("rep",))
    texts = [s.report_text for s in ingest_site(site).split("train") if s.report_text]
    vocabulary = wordpiece_vocabulary(texts, 300)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    site.backbones.wordpiece_vocab = vocab
    first = prepare_site(site, progress=False, batch_size=8)  # the site config's vocab.txt
    assert vocabulary_sha256(vocabulary)[:16] in first.identities["rep"]
    again = prepare_site(site, progress=False, batch_size=8)
    assert again.modalities["rep"].misses == 0
    extra = "pneumoperitoneum"  # a token the synthetic reports never use
    assert extra not in vocabulary
    vocab.write_text("\n".join([*vocabulary, extra]) + "\n", encoding="utf-8")
    changed = prepare_site(site, progress=False, batch_size=8)
    assert changed.identities["rep"] != first.identities["rep"]
    rep = changed.modalities["rep"]
    assert rep.items > 0 and rep.misses == rep.items


def test_a_simulated_federation_shares_the_configured_vocabulary(root: Path) -> None:
    vocabulary = wordpiece_vocabulary(["no acute findings", "small left effusion"], 300)
    paths = [root / "a.txt", root / "b.txt", root / "c.txt"]
    for path, extra in zip(paths, ([], [], ["cardiomegaly"]), strict=True):
        path.write_text("\n".join([*vocabulary, *extra]) + "\n", encoding="utf-8")
    sites = [make_site(root, cache=f"cache{k}", modalities=("rep",)) for k in range(3)]
    for site, path in zip(sites, (paths[0], paths[1], None), strict=True):
        site.backbones.wordpiece_vocab = path
    factory = shared_fallback_text_backbone(sites)  # same content, one site without a file
    assert factory is not None
    assert vocabulary_sha256(vocabulary)[:16] in factory(["ignored"]).identity
    sites[2].backbones.wordpiece_vocab = paths[2]
    with pytest.raises(ValueError, match="different WordPiece vocabularies"):
        shared_fallback_text_backbone(sites)


def test_round_trip_with_default_backbones(tmp_path: Path) -> None:
    """Synthetic writer -> prepare (random ResNet-34, fallback BERT) -> site datasets."""
    root = tmp_path / "data"
    write_synthetic_mimic(SyntheticMimicConfig(num_stays=16, seed=2, image_size=32), root, False)
    site = make_site(root, task="phenotyping")
    summary = prepare_site(site, progress=False, batch_size=8)
    assert summary.identities["cxr"].startswith("resnet34:random-init-seed-0")
    assert summary.identities["rep"].startswith("bert-fallback:")
    model = OmniFuseConfig(modalities=mimic_model_modalities(), task="multilabel", num_classes=25)
    datasets = load_site_datasets(site, model)
    sample = datasets.train[0]
    assert sample["inputs"]["ehr"].shape == (24, 76)
    assert sample["inputs"]["cxr"].shape == (512,)
    assert sample["inputs"]["rep"].shape == (150, 768)
    assert sample["label"].shape == (25,)
    assert datasets.train.availability[:, 1].any() and datasets.train.availability[:, 2].any()
    test = load_site_test_dataset(site, model)
    assert len(test) == summary.splits["test"]["stays"]
    with pytest.raises(ValueError, match="num_classes=25"):
        load_site_datasets(site, model.model_copy(update={"task": "binary", "num_classes": 1}))


def test_synthetic_feature_sites_get_a_test_split_too() -> None:
    synthetic = SyntheticFeatureConfig(
        modalities=[SyntheticModality(name="ehr", dim=4), SyntheticModality(name="cxr", dim=4)]
    )
    site = SiteConfig(
        name="synthetic",
        modalities=["ehr"],
        data={"source": "synthetic_features", "synthetic": synthetic, "synthetic_sizes": (20, 10)},
    )
    model = OmniFuseConfig(
        modalities=[{"name": n, "kind": "vector", "input_dim": 4} for n in ("ehr", "cxr")],
        task="binary",
    )
    test = load_site_test_dataset(site, model)
    val = load_site_datasets(site, model).val
    assert len(test) <= 10 and not test.availability[:, 1].any()
    assert not torch.equal(test.inputs["ehr"][:5], val.inputs["ehr"][:5])

"""Feature preparation: a site's MIMIC files -> frozen-backbone features in an on-disk cache.

:func:`prepare_site` runs :func:`~omnifuse_model.data.ingest.ingest_site`, then every frozen
backbone once per distinct input, batched, under ``torch.inference_mode()``, and writes
(METHOD.md section 1; store layout in :mod:`~omnifuse_model.data.features.store`)::

    <cache_dir>/features/{ehr,cxr,rep}/*.safetensors   sharded entries, content-addressed
    <cache_dir>/manifest.json          per split and stay: labels and each modality's entry key
    <cache_dir>/ehr_normalizer.json    EHRNormalizer fitted on the train split only
    <cache_dir>/ehr_aggregates.json    its (count, sum, sumsq), for federated normalisation
    <cache_dir>/ingest_report.json     every stay accounted for (decode failures included)
    <cache_dir>/prepare_summary.json   hits/misses/failures per modality, identities, timings

* ``ehr``: discretised ``[24, 76]`` arrays (raw; normalised when loaded), keyed by the
  discretiser settings and the sha256 of the episode CSV's bytes, so a second run does not
  discretise again.
* ``cxr``: ResNet-34 trunk features ``[512]`` keyed by ``ResNet34Trunk.identity`` and the
  sha256 of the image file. Images are hashed and decoded in ``torch.utils.data.DataLoader``
  workers (``num_workers``), overlapping with the forward pass; batch k+1 is launched on the
  device before batch k's features are copied back, and shards are written by a background
  thread. Cached inputs are recognised in the workers and not decoded.
* ``rep``: token states ``[150, H]`` and mask ``[150]`` keyed by ``TextBackbone.identity``
  and the sha256 of the selected report text. States are stored as float16 to halve the
  disk (BERT hidden states lie far inside float16's range; its relative rounding error is at
  most 2^-11; a value that overflows is an error, not an inf) and read back as float32. Without a
  local BERT (``backbones.bert_dir``) the fallback's WordPiece vocabulary is the site's
  ``backbones.wordpiece_vocab`` file or else is built (deterministically) from the train
  split's reports only; its identity (which hashes the vocabulary) is part of the keys.

An interrupted run keeps every shard it finished (atomic renames) and the next run computes
only the rest; a complete second run computes nothing. Every run first checks each shard's
SHA-256 (its file name): a corrupted one is moved aside, listed in the summary's
``corrupt_shards`` and its entries computed again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor

from omnifuse_model.data.ehr.discretizer import NUM_FEATURES, num_bins
from omnifuse_model.data.ehr.normalizer import (
    EHRNormalizer,
    check_plausible_aggregates,
    compute_aggregates,
)
from omnifuse_model.data.features.backbones import TextBackbone, build_resnet34_trunk
from omnifuse_model.data.features.episode_cache import EpisodeCache
from omnifuse_model.data.features.image_features import (
    ImageBackbone,
    image_identity,
    prepare_images,
)
from omnifuse_model.data.features.manifest import (
    AGGREGATES_FILE,
    INGEST_REPORT_FILE,
    MANIFEST_FILE,
    NORMALIZER_FILE,
    SUMMARY_FILE,
    build_manifest,
    write_json_atomic,
)
from omnifuse_model.data.features.store import (
    PREPROCESSING_VERSION,
    FeatureStore,
    ModalityStats,
    entry_key,
    text_sha256,
)
from omnifuse_model.data.ingest import EHR_WINDOW_HOURS, IngestResult, ingest_site
from omnifuse_model.data.ingest_report import SPLITS
from omnifuse_model.site_config import SiteConfig

logger = logging.getLogger(__name__)


class TextEncoder(Protocol):
    """A frozen text backbone like :class:`TextBackbone`."""

    identity: str
    hidden_size: int
    max_tokens: int

    def encode(self, texts: Sequence[str], batch_size: int = 8) -> tuple[Tensor, Tensor]: ...


TextBackboneFactory = Callable[[Sequence[str]], TextEncoder]
"""Builds the text backbone from the train split's report texts."""


@dataclass
class PrepareSummary:
    """What :func:`prepare_site` did; written as ``prepare_summary.json``."""

    site: str
    task: str
    cache_dir: str
    preprocessing_version: str
    identities: dict[str, str] = field(default_factory=dict)
    modalities: dict[str, ModalityStats] = field(default_factory=dict)
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    normalizer_bins: int | None = None
    seconds: float = 0.0
    corrupt_shards: dict[str, dict[str, str]] = field(default_factory=dict)
    """Modality -> {shard name: problem} of shards that failed their checksum and were moved
    aside (``<name>.corrupt``); their entries were computed again."""

    @property
    def hits(self) -> int:
        return sum(s.hits for s in self.modalities.values())

    @property
    def misses(self) -> int:
        return sum(s.misses for s in self.modalities.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self) | {"hits": self.hits, "misses": self.misses}


# --------------------------------------------------------------------------- reports


def _prepare_reports(
    store: FeatureStore,
    result: IngestResult,
    factory: TextBackboneFactory,
    batch_size: int,
    stats: ModalityStats,
    progress: Progress,
) -> tuple[str, dict[str, str], list[int]]:
    """Token states of every usable report text; returns (identity, text -> key, [T, H])."""
    texts = [s.report_text for s in result.stays if s.report_text is not None]
    if not texts:
        return "", {}, []
    train = [s.report_text for s in result.split("train") if s.report_text is not None]
    try:
        backbone = factory(train)
    except ValueError as error:
        raise ValueError(
            f"site '{result.site}': cannot build the report backbone: {error}"
        ) from error
    unique = list(dict.fromkeys(texts))
    keys = {text: entry_key("rep", backbone.identity, text_sha256(text)) for text in unique}
    misses = [text for text in unique if ("rep", keys[text]) not in store]
    stats.items, stats.hits, stats.misses = len(unique), len(unique) - len(misses), len(misses)
    bar = progress.add_task("rep features", total=len(unique), completed=stats.hits)
    with ThreadPoolExecutor(max_workers=1) as writer:
        writes = []
        for start in range(0, len(misses), batch_size):
            chunk = misses[start : start + batch_size]
            states, mask = backbone.encode(chunk, batch_size=batch_size)
            half = states.to(torch.float16)
            if not torch.isfinite(half).all():
                raise ValueError(
                    f"report backbone {backbone.identity}: token states beyond float16's range "
                    f"(max |x| = {states.abs().max().item():g}); they cannot be cached as float16"
                )
            fields = {"states": half, "mask": mask.to(torch.bool)}
            records = {keys[text]: {"row": row} for row, text in enumerate(chunk)}
            writes.append(writer.submit(store.write, "rep", fields, records))
            progress.advance(bar, len(chunk))
        for write in writes:
            write.result()
    return backbone.identity, keys, [backbone.max_tokens, backbone.hidden_size]


# --------------------------------------------------------------------------- prepare


def default_text_factory(site: SiteConfig, device: str = "cpu") -> TextBackboneFactory:
    """The site's report backbone: its local BERT (``backbones.bert_dir``), else the offline
    fallback over its ``backbones.wordpiece_vocab`` file, else over a vocabulary built from
    the train split's reports."""

    def build(train_texts: Sequence[str]) -> TextEncoder:
        backbones = site.backbones
        if backbones.bert_dir is not None:
            return TextBackbone(backbones.bert_dir, device=device)
        if backbones.wordpiece_vocab is not None:
            return TextBackbone(fallback_vocab=backbones.wordpiece_vocab, device=device)
        return TextBackbone(fallback_texts=train_texts, device=device)

    return build


def _fit_normalizer(result: IngestResult, cache_dir: Path) -> int | None:
    """Fit the EHR normaliser on the train split only; returns the number of bins pooled."""
    arrays = [s.ehr for s in result.split("train") if s.ehr is not None]
    bins = sum(len(a) for a in arrays)
    if bins < 2:
        for name in (NORMALIZER_FILE, AGGREGATES_FILE):  # never leave a stale one behind
            (cache_dir / name).unlink(missing_ok=True)
        if "ehr" in result.modalities:
            logger.warning("site %s: fewer than 2 train EHR bins, no normaliser", result.site)
        return None
    aggregates = compute_aggregates(arrays)
    check_plausible_aggregates(aggregates, f"site '{result.site}', train split")
    normalizer = EHRNormalizer.from_aggregates(aggregates.count, aggregates.sums, aggregates.sumsq)
    write_json_atomic(cache_dir / NORMALIZER_FILE, normalizer.to_dict())
    write_json_atomic(
        cache_dir / AGGREGATES_FILE, {"split": "train", "stays": len(arrays)} | aggregates.to_dict()
    )
    return bins


def _prepare_images(
    site: SiteConfig,
    store: FeatureStore,
    result: IngestResult,
    image_backbone: ImageBackbone | None,
    options: dict[str, Any],
    stats: ModalityStats,
    bars: Progress,
) -> tuple[str, dict[str, str]]:
    """The ``cxr`` pass; returns (identity, image path -> key)."""
    clock = time.perf_counter()
    device = options.pop("device")
    trunk = image_backbone or build_resnet34_trunk(site.backbones.resnet34_weights)
    if isinstance(trunk, torch.nn.Module):
        trunk = trunk.to(device).eval()
    options |= {"pin_memory": device.type == "cuda"}
    options["prefetch_factor"] = 4 if options["num_workers"] else None
    keys = prepare_images(store, result, trunk, device, options, stats, bars)
    stats.seconds = time.perf_counter() - clock
    return image_identity(trunk), keys


def _split_counts(result: IngestResult, modalities: Sequence[str]) -> dict[str, dict[str, int]]:
    return {
        split: {"stays": len(result.split(split))}
        | {
            f"with_{m}": sum(m in s.usable_modalities for s in result.split(split))
            for m in modalities
        }
        for split in SPLITS
    }


def _verify_and_ingest(
    site: SiteConfig,
    store: FeatureStore,
    summary: PrepareSummary,
    stats: dict[str, ModalityStats],
    timestep: float,
    bars: Progress,
) -> tuple[IngestResult, EpisodeCache]:
    """Move corrupted shards aside, ingest (episodes through the cache), fit the normaliser."""
    for modality in stats:
        bad = store.verify(modality)
        if bad:
            summary.corrupt_shards[modality] = bad
    clock = time.perf_counter()
    episodes = EpisodeCache(store, timestep, stats.get("ehr", ModalityStats()))
    try:
        result = ingest_site(site, timestep, episode_store=episodes, progress=bars)
    finally:
        episodes.flush()
    if "ehr" in stats:
        stats["ehr"].seconds = time.perf_counter() - clock
        summary.identities["ehr"] = episodes.identity
    summary.normalizer_bins = _fit_normalizer(result, store.root)
    return result, episodes


def prepare_site(
    site: SiteConfig,
    progress: bool = True,
    batch_size: int = 32,
    num_workers: int = 0,
    *,
    timestep: float = 2.0,
    image_backbone: ImageBackbone | None = None,
    text_backbone: TextBackboneFactory | None = None,
) -> PrepareSummary:
    """Ingest ``site`` and fill its feature cache (see the module docstring).

    ``image_backbone`` defaults to the ResNet-34 trunk of ``site.backbones.resnet34_weights``;
    ``text_backbone`` is a factory called with the train split's report texts, defaulting to
    :func:`default_text_factory` for the site. Shards that fail their
    checksum are moved aside first (listed in ``corrupt_shards``) and their entries computed
    again. Raises
    :class:`~omnifuse_model.data.features.store.CacheLockedError` when another process is
    preparing the same cache, ``ValueError`` for an unusable configuration.
    """
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size {batch_size} must be >= 1, num_workers {num_workers} >= 0")
    started = time.perf_counter()
    cache_dir = Path(site.cache_dir)
    store = FeatureStore(cache_dir)
    device = torch.device(site.resolved_device())
    summary = PrepareSummary(site.name, site.task, str(cache_dir), PREPROCESSING_VERSION)
    stats = {name: ModalityStats() for name in site.modalities}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with store.lock(), Progress(*columns, disable=not progress) as bars:
        result, episodes = _verify_and_ingest(site, store, summary, stats, timestep, bars)
        image_keys: dict[str, str] = {}
        if "cxr" in stats:
            options = {"batch_size": batch_size, "num_workers": num_workers, "device": device}
            summary.identities["cxr"], image_keys = _prepare_images(
                site, store, result, image_backbone, options, stats["cxr"], bars
            )
        text_keys: dict[str, str] = {}
        shapes = {"ehr": [num_bins(EHR_WINDOW_HOURS, timestep), NUM_FEATURES]}
        if "rep" in stats:
            clock = time.perf_counter()
            factory = text_backbone or default_text_factory(site, str(device))
            summary.identities["rep"], text_keys, shapes["rep"] = _prepare_reports(
                store, result, factory, batch_size, stats["rep"], bars
            )
            stats["rep"].seconds = time.perf_counter() - clock
        result.report().write_json(cache_dir / INGEST_REPORT_FILE)
        manifest = build_manifest(
            result, summary.identities, episodes, image_keys, text_keys, shapes
        )
        write_json_atomic(cache_dir / MANIFEST_FILE, manifest)
    summary.modalities = stats
    summary.splits = _split_counts(result, list(stats))
    summary.seconds = time.perf_counter() - started
    _write_summary(summary)
    return summary


def _write_summary(summary: PrepareSummary) -> None:
    write_json_atomic(Path(summary.cache_dir) / SUMMARY_FILE, summary.to_dict())
    logger.info(
        "site %s: feature cache ready (%d reused, %d computed: %s) in %s",
        summary.site,
        summary.hits,
        summary.misses,
        ", ".join(f"{k} {v.misses}/{v.items}" for k, v in summary.modalities.items()),
        summary.cache_dir,
    )


__all__ = [
    "ImageBackbone",
    "ModalityStats",
    "PrepareSummary",
    "TextBackboneFactory",
    "TextEncoder",
    "default_text_factory",
    "prepare_site",
]

"""The feature-cache and data checks of the site preflight (`simulation.site_check`).

The cache's manifest (`omnifuse_model.data.features.manifest`) names the site, task,
modalities and each modality's producer identity, which hashes the backbone weights or the
report vocabulary; the checks compare them with what this site config would produce, check
that every listed entry is in the store, and count stays and positives per split from the
manifest's labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omnifuse_model.data.features.manifest import (
    AGGREGATES_FILE,
    MANIFEST_FILE,
    NORMALIZER_FILE,
    SUMMARY_FILE,
    read_manifest,
)
from omnifuse_model.data.features.store import FeatureStore
from omnifuse_model.data.ingest_report import SPLITS
from omnifuse_model.site_config import SiteConfig
from simulation.site_check import Check, Level, expected_identities


def _manifest_matches(site: SiteConfig, manifest: dict[str, Any], where: Path) -> list[Check]:
    """The manifest was written for this site, task and these modalities."""
    checks = []
    for dotted, ours, theirs in (
        ("name", site.name, manifest.get("site")),
        ("task", site.task, manifest.get("task")),
        ("modalities", sorted(site.modalities), sorted(manifest.get("modalities", []))),
    ):
        if ours != theirs:
            checks.append(
                Check(
                    "feature cache",
                    dotted,
                    "fail",
                    f"{where} was prepared for {theirs!r}, "
                    f"this config says {ours!r}: run `omnifuse prepare` again",
                )
            )
    return checks


def _identities_match(site: SiteConfig, manifest: dict[str, Any], where: Path) -> list[Check]:
    """Each cached modality was computed by the backbone this config names."""
    from omnifuse_model.data.features.episode_cache import EpisodeCache
    from omnifuse_model.data.features.store import ModalityStats

    cached = manifest.get("identities", {})
    fields = {"ehr": "data", "cxr": "backbones.resnet34_weights", "rep": "backbones"}
    expected: dict[str, str | None] = dict(expected_identities(site))
    if "ehr" in site.modalities:  # the discretiser settings `prepare` uses
        expected["ehr"] = EpisodeCache(FeatureStore(site.cache_dir), 2.0, ModalityStats()).identity
    checks = []
    for modality, identity in expected.items():
        if modality not in cached:
            continue  # no stay had it: the modality check reports that
        dotted = fields.get(modality, modality)
        if identity is None:
            checks.append(
                Check(
                    "feature cache",
                    dotted,
                    "warn",
                    f"{modality}: built by {cached[modality]} (not checkable from the config)",
                )
            )
        elif cached[modality] != identity:
            checks.append(
                Check(
                    "feature cache",
                    dotted,
                    "fail",
                    f"{where}: {modality} features built by "
                    f"{cached[modality]}, this config gives {identity}: run `omnifuse "
                    "prepare` again",
                )
            )
        else:
            checks.append(Check("feature cache", dotted, "ok", f"{modality}: {identity}"))
    return checks


def _entries_present(site: SiteConfig, manifest: dict[str, Any]) -> list[Check]:
    """Every entry the manifest lists is in the store (no shard lost or moved aside)."""
    store = FeatureStore(site.cache_dir)
    checks = []
    for modality in manifest.get("modalities", []):
        keys = {
            stay[modality]
            for split in SPLITS
            for stay in manifest["splits"].get(split, [])
            if stay.get(modality)
        }
        missing = keys - set(store.index(modality))
        if missing:
            checks.append(
                Check(
                    "feature cache",
                    "cache_dir",
                    "fail",
                    f"{modality}: {len(missing)} of "
                    f"{len(keys)} entries missing from {store.folder(modality)}: run "
                    "`omnifuse prepare` again",
                )
            )
        else:
            checks.append(
                Check("feature cache", "cache_dir", "ok", f"{modality}: {len(keys)} entries")
            )
    return checks


def _normaliser(site: SiteConfig) -> list[Check]:
    if "ehr" not in site.modalities:
        return []
    if site.data.ehr_normalizer is not None:
        return []  # a path: checked with the others
    cache = Path(site.cache_dir)
    lacking = [n for n in (NORMALIZER_FILE, AGGREGATES_FILE) if not (cache / n).is_file()]
    if lacking:
        return [
            Check(
                "feature cache",
                "cache_dir",
                "fail",
                f"{cache}: no {', '.join(lacking)} (fewer than 2 train EHR bins?)",
            )
        ]
    return [Check("feature cache", "cache_dir", "ok", "EHR normaliser fitted on train")]


def check_cache(site: SiteConfig) -> tuple[list[Check], dict[str, Any] | None]:
    """The feature cache is complete and was built from this config; also its manifest."""
    if site.data.source != "feature_cache":
        return [Check("feature cache", "data.source", "ok", "synthetic features: no cache")], None
    cache = Path(site.cache_dir)
    try:
        manifest = read_manifest(cache)
    except (FileNotFoundError, ValueError) as error:
        return [Check("feature cache", "cache_dir", "fail", str(error))], None
    where = cache / MANIFEST_FILE
    checks = _manifest_matches(site, manifest, where)
    if not (cache / SUMMARY_FILE).is_file():
        checks.append(
            Check(
                "feature cache",
                "cache_dir",
                "fail",
                f"{cache}: no {SUMMARY_FILE} (an interrupted `omnifuse prepare`?)",
            )
        )
    checks += _identities_match(site, manifest, where)
    checks += _entries_present(site, manifest)
    checks += _normaliser(site)
    return checks, manifest


# --------------------------------------------------------------------------- data


MIN_STAYS = {"train": 1, "val": 1}
"""Stays a split needs to train (train) or to be scored (val); each also needs a positive
and a negative (AUROC is undefined over one class). The test split is not needed."""


def _positives(stays: Sequence[dict[str, Any]]) -> tuple[int, int, bool]:
    """(stays with any positive label, stays with none, whether some label has both classes)."""
    labels = [[bool(v) for v in stay["labels"]] for stay in stays]
    positive = sum(any(row) for row in labels)
    both = (
        any(0 < sum(row[k] for row in labels) < len(labels) for k in range(len(labels[0])))
        if labels
        else False
    )
    return positive, len(labels) - positive, both


def check_data(site: SiteConfig, manifest: dict[str, Any] | None) -> list[Check]:
    """Each listed modality has data; stays and positives per split, too small = error."""
    if site.data.source == "synthetic_features":
        train, val = site.data.synthetic_sizes
        return [
            Check(
                "split",
                f"data.synthetic_sizes[{i}]",
                "ok" if n >= MIN_STAYS[s] else "fail",
                f"{s}: {n} stays (synthetic)",
            )
            for i, (s, n) in enumerate((("train", train), ("val", val)))
        ]
    if manifest is None:
        return []
    splits = manifest["splits"]
    checks = []
    for modality in site.modalities:
        held = {s: sum(bool(stay.get(modality)) for stay in splits.get(s, [])) for s in SPLITS}
        found = ", ".join(f"{s} {n}" for s, n in held.items())
        level: Level = "ok" if held["train"] else "fail"
        checks.append(
            Check("modality", "modalities", level, f"{modality}: stays with data: {found}")
        )
    for split in SPLITS:
        stays = splits.get(split, [])
        positive, negative, both = _positives(stays)
        found = f"{split}: {len(stays)} stays, {positive} positive, {negative} negative"
        needed = MIN_STAYS.get(split)
        if needed is None:
            checks.append(Check("split", "data.benchmark_dir", "ok", found))
        elif len(stays) < needed or not both:
            checks.append(
                Check(
                    "split",
                    "data.benchmark_dir",
                    "fail",
                    f"{found}: too small to train and score (needs a positive and a negative)",
                )
            )
        else:
            checks.append(Check("split", "data.benchmark_dir", "ok", found))
    return checks

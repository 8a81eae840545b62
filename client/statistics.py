"""A site's answer to the statistics phase before round 1 (``server.statistics_phase``).

The site sends the count, sum and sum of squares per column of its training EHR (summed
over every bin of every training stay when its feature cache was prepared: the cache's
``ehr_aggregates.json``; never a per-patient value), withheld when fewer training stays than
the audit threshold hold EHR, and the SHA-256 fingerprint of each backbone identity its
feature cache was built with (``manifest.json`` ``identities``). Sites over feature-level
synthetic data have neither.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from omnifuse_model.data.ehr.normalizer import EHRAggregates
from omnifuse_model.data.features.manifest import AGGREGATES_FILE, read_manifest
from omnifuse_model.federation_replies import SiteStatistics
from omnifuse_model.site_config import SiteConfig

log = logging.getLogger(__name__)


def fingerprint(identity: str) -> str:
    """The SHA-256 hex digest of a backbone's producer identity."""
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()


def cache_fingerprints(site: SiteConfig, modalities: list[str]) -> dict[str, str]:
    """Fingerprint per model modality the site holds, from its feature cache's identities."""
    identities = read_manifest(Path(site.cache_dir)).get("identities", {})
    return {
        name: fingerprint(str(identities[name]))
        for name in modalities
        if name in site.modalities and name in identities
    }


def train_ehr_aggregates(site: SiteConfig) -> tuple[int, EHRAggregates | None]:
    """(training stays with EHR, their aggregates) from the feature cache; (0, None) when
    the train split had no usable EHR."""
    path = Path(site.cache_dir) / AGGREGATES_FILE
    if "ehr" not in site.modalities or not path.is_file():
        return 0, None
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("split") != "train":
        raise ValueError(f"{AGGREGATES_FILE}: split {data.get('split')!r}, expected 'train'")
    return int(data["stays"]), EHRAggregates.from_dict(data)


def site_statistics(site: SiteConfig, modalities: list[str], min_count: int) -> SiteStatistics:
    """What this site sends in the statistics phase (see the module docstring)."""
    if site.data.source == "synthetic_features":
        return SiteStatistics()
    fingerprints = cache_fingerprints(site, modalities)
    stays, aggregates = train_ehr_aggregates(site) if "ehr" in modalities else (0, None)
    if aggregates is None or stays < min_count:
        if aggregates is not None:
            log.info(
                "site %s: EHR statistics withheld (%d < %d stays)", site.name, stays, min_count
            )
        return SiteStatistics(fingerprints=fingerprints)
    return SiteStatistics(
        ehr_stays=stays,
        ehr_count=aggregates.count,
        ehr_sums=aggregates.sums.tolist(),
        ehr_sumsq=aggregates.sumsq.tolist(),
        fingerprints=fingerprints,
    )

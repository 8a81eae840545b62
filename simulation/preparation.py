"""`omnifuse prepare`: feature caches for one site, or for every site of a scenario.

For a scenario the EHR normaliser is the federation's: each site's train-split aggregates
(count, sum, sum of squares per column; never a record) are combined into one normaliser,
exactly what a federated statistics round would compute, and written next to scenario.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from omnifuse_model.data.ehr.normalizer import (
    EHRAggregates,
    EHRNormalizer,
    check_plausible_aggregates,
    combine_aggregates,
)
from omnifuse_model.data.features.cache import PrepareSummary, prepare_site
from omnifuse_model.data.features.manifest import AGGREGATES_FILE
from omnifuse_model.scenario import Scenario
from omnifuse_model.site_config import SiteConfig, load_site_config

NORMALIZER = "ehr_normalizer.json"


def _site_paths(scenario_dir: Path) -> tuple[list[Path], Path | None]:
    scenario = Scenario.load(scenario_dir)
    return list(scenario.site_configs), scenario.server_test_site


def federated_normalizer(sites: list[SiteConfig]) -> EHRNormalizer:
    """Combine the sites' train-split EHR aggregates into one normaliser.

    Each site's aggregates must be possible from plausible values only
    (:func:`~omnifuse_model.data.ehr.normalizer.check_plausible_aggregates`); otherwise a
    ``ValueError`` names the site, the variable and the expected range.
    """
    parts = []
    for site in sites:
        path = Path(site.cache_dir) / AGGREGATES_FILE
        if path.is_file():
            part = EHRAggregates.from_dict(json.loads(path.read_text()))
            check_plausible_aggregates(part, f"site '{site.name}' ({path})")
            parts.append(part)
    if not parts:
        raise ValueError("no site has EHR aggregates (prepare the sites first)")
    total = combine_aggregates(parts)
    return EHRNormalizer.from_aggregates(total.count, total.sums, total.sumsq)


def shared_fallback_text_backbone(sites: list[SiteConfig]):
    """One offline text backbone for the whole simulated federation, or None when every site
    names a local BERT.

    The fallback's WordPiece vocabulary defines what token ids (and so features) mean; with a
    different vocabulary per site the shared report encoder could not be averaged. So the
    sites without a local BERT share one fallback: over their ``backbones.wordpiece_vocab``
    file when they name one (every site naming one must name the same vocabulary, else
    ``ValueError``; sites naming none get it too), else over a vocabulary built from the
    union of the sites' train-split reports. A real deployment configures the same local BERT
    directory (or vocab.txt) at every hospital instead (docs/DEPLOY.md).
    """
    from omnifuse_model.data.features.backbones import TextBackbone, read_wordpiece_vocabulary
    from omnifuse_model.data.ingest import ingest_site

    fallback_sites = [s for s in sites if "rep" in s.modalities and not s.backbones.bert_dir]
    if not fallback_sites:
        return None
    files = [
        (site.name, site.backbones.wordpiece_vocab)
        for site in fallback_sites
        if site.backbones.wordpiece_vocab is not None
    ]
    if files:
        distinct = {tuple(read_wordpiece_vocabulary(path)) for _, path in files}
        if len(distinct) > 1:
            named = ", ".join(f"{name}: {path}" for name, path in files)
            raise ValueError(
                f"sites name different WordPiece vocabularies (backbones.wordpiece_vocab of "
                f"{named}); a federation's report encoder needs one vocabulary at every site"
            )
        backbone = TextBackbone(None, fallback_vocab=files[0][1])
        return lambda _site_texts: backbone
    texts = sorted(
        {
            stay.report_text
            for site in fallback_sites
            for stay in ingest_site(site).split("train")
            if stay.report_text
        }
    )
    if not texts:
        return None
    backbone = TextBackbone(None, fallback_texts=texts)
    return lambda _site_texts: backbone


def prepare_scenario(
    scenario_dir: Path, console: Console | None = None, num_workers: int = 0
) -> dict[str, PrepareSummary]:
    """Prepare every site, write the federated normaliser, then the server's test site."""
    console = console or Console()
    scenario_dir = Path(scenario_dir)
    site_paths, test_path = _site_paths(scenario_dir)
    summaries: dict[str, PrepareSummary] = {}
    sites = [load_site_config(path) for path in site_paths]
    text_factory = shared_fallback_text_backbone(sites)
    for path, site in zip(site_paths, sites, strict=True):
        console.print(f"[bold]{site.name}[/bold]: {path}")
        summaries[site.name] = prepare_site(
            site, num_workers=num_workers, text_backbone=text_factory
        )
    normalizer = federated_normalizer(sites)
    normalizer.save(scenario_dir / NORMALIZER)
    console.print(f"federated EHR normaliser from {len(sites)} sites: {scenario_dir / NORMALIZER}")
    if test_path is not None:
        site = load_site_config(test_path)
        console.print(f"[bold]{site.name}[/bold] (server test): {test_path}")
        summaries[site.name] = prepare_site(
            site, num_workers=num_workers, text_backbone=text_factory
        )
    return summaries

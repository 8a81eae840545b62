"""`omnifuse prepare`: feature caches for one site, or for every site of a scenario.

Each site's cache keeps its own train-split EHR aggregates (count, sum, sum of squares per
column; never a record). The federation's EHR normaliser is not built here: the ServerApp's
statistics phase combines the sites' aggregates before round 1 (``server.statistics_phase``),
in simulation exactly as in a deployment. What a simulated scenario does share on one machine
is the offline report fallback (:func:`shared_fallback_text_backbone`).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from omnifuse_model.data.features.cache import PrepareSummary, prepare_site
from omnifuse_model.scenario import Scenario
from omnifuse_model.site_config import SiteConfig, load_site_config


def _site_paths(scenario_dir: Path) -> tuple[list[Path], Path | None]:
    scenario = Scenario.load(scenario_dir)
    return list(scenario.site_configs), scenario.server_test_site


def shared_fallback_text_backbone(sites: list[SiteConfig]):
    """One offline text backbone for the whole simulated federation, or None when every site
    names a local BERT.

    The fallback's WordPiece vocabulary defines what token ids (and so features) mean; with a
    different vocabulary per site the shared report encoder could not be averaged. So the
    sites without a local BERT share one fallback over their ``backbones.wordpiece_vocab``
    file (every site naming one must name the same vocabulary, else ``ValueError``; sites
    naming none get it too). When that file does not exist yet (a scenario written by
    `omnifuse partition` names ``wordpiece_vocab.txt`` next to scenario.json), the simulation
    builds the vocabulary from the union of the sites' train-split reports and writes it
    there: it then is the consortium's vocabulary file, which a deployed site must name (a
    deployed site never learns one from its own reports, ``client.app``).
    """
    from omnifuse_model.data.features.backbones import (
        TextBackbone,
        read_wordpiece_vocabulary,
        wordpiece_vocabulary,
        write_wordpiece_vocabulary,
    )

    fallback_sites = [s for s in sites if "rep" in s.modalities and not s.backbones.bert_dir]
    if not fallback_sites:
        return None
    files = [
        (site.name, Path(site.backbones.wordpiece_vocab))
        for site in fallback_sites
        if site.backbones.wordpiece_vocab is not None
    ]
    to_write = sorted({path.resolve() for _, path in files if not path.is_file()})
    if len(to_write) > 1 or (to_write and len({p.resolve() for _, p in files}) > 1):
        named = ", ".join(f"{name}: {path}" for name, path in files)
        raise ValueError(
            f"sites name different WordPiece vocabularies, some missing (backbones."
            f"wordpiece_vocab of {named}); a federation's report encoder needs one vocabulary"
        )
    if files and not to_write:
        distinct = {tuple(read_wordpiece_vocabulary(path)) for _, path in files}
        if len(distinct) > 1:
            named = ", ".join(f"{name}: {path}" for name, path in files)
            raise ValueError(
                f"sites name different WordPiece vocabularies (backbones.wordpiece_vocab of "
                f"{named}); a federation's report encoder needs one vocabulary at every site"
            )
        backbone = TextBackbone(None, fallback_vocab=files[0][1])
        return lambda _site_texts: backbone
    texts = _train_report_texts(fallback_sites)
    if not texts:
        return None
    if to_write:
        write_wordpiece_vocabulary(
            wordpiece_vocabulary([t for t in texts if t.strip()]), to_write[0]
        )
        backbone = TextBackbone(None, fallback_vocab=to_write[0])
    else:
        backbone = TextBackbone(None, fallback_texts=texts)
    return lambda _site_texts: backbone


def _train_report_texts(sites: list[SiteConfig]) -> list[str]:
    """The distinct report texts of the sites' train splits, sorted."""
    from omnifuse_model.data.ingest import ingest_site

    return sorted(
        {
            stay.report_text
            for site in sites
            for stay in ingest_site(site).split("train")
            if stay.report_text
        }
    )


def prepare_scenario(
    scenario_dir: Path, console: Console | None = None, num_workers: int = 0
) -> dict[str, PrepareSummary]:
    """Prepare every site, then the server's test site."""
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
    if test_path is not None:
        site = load_site_config(test_path)
        console.print(f"[bold]{site.name}[/bold] (server test): {test_path}")
        summaries[site.name] = prepare_site(
            site, num_workers=num_workers, text_backbone=text_factory
        )
    return summaries

"""Feature-level federated scenarios: site configs over synthetic features, no MIMIC files.

Used by tests and benchmarks that need many sites quickly. Each site draws its own samples
from one shared planted structure (so the federation has one task to learn) with its own
missingness and, optionally, modalities it does not hold at all.
"""

from __future__ import annotations

from pathlib import Path

from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.scenario import Scenario
from omnifuse_model.site_config import SiteConfig, SiteDataConfig
from omnifuse_model.synthetic import SyntheticFeatureConfig


def _site_config(
    name: str, modalities: list[str], data: SyntheticFeatureConfig, sizes: tuple[int, int]
) -> SiteConfig:
    return SiteConfig(
        name=name,
        modalities=modalities,
        device="cpu",
        data=SiteDataConfig(source="synthetic_features", synthetic=data, synthetic_sizes=sizes),
    )


def write_feature_scenario(
    out_dir: Path,
    data: SyntheticFeatureConfig,
    model: OmniFuseConfig,
    site_modalities: list[list[str]],
    site_sizes: list[tuple[int, int]],
    test_size: int = 1000,
) -> Path:
    """Write ``site_*.toml``, a held-out test site and ``scenario.json`` into ``out_dir``."""
    if len(site_modalities) != len(site_sizes):
        raise ValueError("site_modalities and site_sizes must have one entry per site")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = model.modality_names
    paths = []
    for index, (modalities, sizes) in enumerate(zip(site_modalities, site_sizes, strict=True)):
        site_data = data.model_copy(update={"seed": data.seed + 101 * (index + 1)})
        path = out_dir / f"site_{index}.toml"
        site = _site_config(f"site_{index}", modalities, site_data, sizes)
        path.write_text(site.to_toml(), encoding="utf-8")
        paths.append(Path(path.name))
    test_data = data.model_copy(update={"seed": data.seed + 99_991})
    test_site = _site_config("server_test", names, test_data, (1, test_size))
    (out_dir / "server_test.toml").write_text(test_site.to_toml(), encoding="utf-8")
    scenario = Scenario(
        kind="synthetic_features",
        site_configs=paths,
        server_test_site=Path("server_test.toml"),
        model_config=model,
    )
    return scenario.write(out_dir)

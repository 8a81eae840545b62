"""Feature-level federated scenarios: site configs over synthetic features, no MIMIC files.

Used by tests and benchmarks that need many sites quickly. Each site draws its own samples
from one shared planted structure (so the federation has one task to learn) with its own
missingness and, optionally, modalities it does not hold at all.
"""

from __future__ import annotations

import json
from pathlib import Path

from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.synthetic import SyntheticFeatureConfig


def _site_toml(
    name: str, modalities: list[str], data: SyntheticFeatureConfig, sizes: tuple[int, int]
) -> str:
    lines = [
        f'name = "{name}"',
        "modalities = [" + ", ".join(f'"{m}"' for m in modalities) + "]",
        'device = "cpu"',
        "",
        "[data]",
        'source = "synthetic_features"',
        f"synthetic_sizes = [{sizes[0]}, {sizes[1]}]",
        "",
        "[data.synthetic]",
        f'task = "{data.task}"',
        f"num_classes = {data.num_classes}",
        f"latent_dim = {data.latent_dim}",
        f"label_noise = {data.label_noise}",
        f"seed = {data.seed}",
    ]
    for modality in data.modalities:
        lines += [
            "",
            "[[data.synthetic.modalities]]",
            f'name = "{modality.name}"',
            f"dim = {modality.dim}",
            f"signal = {modality.signal}",
            f"noise = {modality.noise}",
            f"latent_fraction = {modality.latent_fraction}",
            f"missing_rate = {modality.missing_rate}",
        ]
    return "\n".join(lines) + "\n"


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
        path.write_text(_site_toml(f"site_{index}", modalities, site_data, sizes))
        paths.append(path.name)
    test_data = data.model_copy(update={"seed": data.seed + 99_991})
    (out_dir / "server_test.toml").write_text(
        _site_toml("server_test", names, test_data, (1, test_size))
    )
    scenario = {
        "kind": "synthetic_features",
        "site_configs": paths,
        "server_test_site": "server_test.toml",
        "model_config": model.model_dump(mode="json"),
    }
    (out_dir / "scenario.json").write_text(json.dumps(scenario, indent=2))
    return out_dir / "scenario.json"

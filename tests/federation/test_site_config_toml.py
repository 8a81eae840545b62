"""`SiteConfig.to_toml`, the one site-config writer: what it writes reads back equal."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from omnifuse_model.site_config import SiteConfig, SiteDataConfig, load_site_config

AWKWARD = "a \"quoted\" dir\\with back\\\\slashes, spaces, ünïcödé ✓ # and 'single' quotes"


def _every_field_set(folder: Path) -> SiteConfig:
    """A site with every field away from its default; awkward relative and absolute paths."""
    return SiteConfig(
        name="hospital_x-1_2",
        task="phenotyping",
        modalities=["ehr", 'c x"r'],  # a synthetic site holds modalities of data.synthetic
        data={
            "source": "synthetic_features",
            "benchmark_dir": Path(AWKWARD) / "phenotyping",
            "stays_csv": folder / AWKWARD / "all_stays.csv",
            "cxr_dir": folder / 'MIMIC CXR "jpg"',
            "cxr_metadata": Path("..") / "meta data\\v2.csv.gz",
            "reports_dir": Path("réports\ttab"),
            "ehr_normalizer": folder / "norm'\"alizer.json",
            "synthetic": {
                "modalities": [
                    {
                        "name": "ehr",
                        "dim": 7,
                        "signal": 0.1 + 0.2,  # not representable in few digits
                        "noise": 1e-300,
                        "latent_fraction": 0.3,
                        "missing_rate": 0.25,
                    },
                    {
                        "name": 'c x"r',
                        "dim": 3,
                        "signal": 2.5,
                        "noise": 0.0,
                        "latent_fraction": 0.5,
                        "missing_rate": 1.0,
                    },
                ],
                "task": "multilabel",
                "num_classes": 25,
                "latent_dim": 5,
                "label_noise": 1 / 3,
                "seed": 2**40,
            },
            "synthetic_sizes": (17, 4),
        },
        backbones={
            "resnet34_weights": folder / "w e\\ights.pt",
            "bert_dir": Path("bért"),
            "wordpiece_vocab": Path("vo'cab\\s.txt"),
        },
        cache_dir=Path('../cache dir/"x"'),
        device="cuda:1",
        training={"batch_size": 7, "lr": 3e-4, "local_epochs": 3},
        privacy={
            "dp_sgd": True,
            "target_epsilon": 0.7,
            "target_delta": 1e-7,
            "max_grad_norm": 0.35,
            "accountant": "prv",
        },
        deployment={
            "superlink": "[::1]:9092",
            "root_certificates": Path("c a.pem"),
            "auth_private_key": folder / "kéy",
            "runtime_host": "::1",
            "runtime_port": 19094,
            "health_port": 19095,
            "flwr_home": Path("flwr home"),
            "approved_apps": Path("approved apps.toml"),
            "max_retries": 0,
            "min_free_disk_gb": 0.5,
        },
    )


def _defaults_left(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted names of fields (recursively) that still hold their default value."""
    left = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if not field.is_required() and value == field.get_default(call_default_factory=True):
            left.append(prefix + name)
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for index, item in items:
            if isinstance(item, BaseModel):
                where = name if index is None else f"{name}.{index}"
                left += _defaults_left(item, f"{prefix}{where}.")
    return left


def test_every_field_is_set_in_the_round_trip_config(tmp_path):
    # a field added to SiteConfig without a value here would escape the round-trip test
    assert _defaults_left(_every_field_set(tmp_path)) == []


def test_to_toml_round_trips_awkward_paths_and_every_field(tmp_path):
    folder = tmp_path / 'site folder "ü"'
    folder.mkdir()
    site = _every_field_set(folder)
    path = folder / "site.toml"
    path.write_text(site.to_toml(), encoding="utf-8")
    loaded = load_site_config(path)
    assert loaded == site.resolve_paths(folder.resolve())
    assert loaded.data.benchmark_dir == folder.resolve() / AWKWARD / "phenotyping"
    assert loaded.data.stays_csv == folder / AWKWARD / "all_stays.csv"  # absolute: as written
    assert loaded.data.synthetic.modalities[0].signal == 0.1 + 0.2


def test_defaults_stay_out_of_the_file(tmp_path):
    site = SiteConfig(name="s", modalities=["ehr"], data={"benchmark_dir": "in-hospital-mortality"})
    text = site.to_toml()
    assert text == (
        'name = "s"\nmodalities = [\n    "ehr",\n]\n\n'
        '[data]\nbenchmark_dir = "in-hospital-mortality"\n'
    )
    (tmp_path / "s.toml").write_text(text)
    assert load_site_config(tmp_path / "s.toml") == site.resolve_paths(tmp_path.resolve())


def test_a_value_toml_cannot_hold_is_an_error_naming_the_field():
    # None where the default is not None (built without validation): TOML has no null
    site = SiteConfig.model_construct(
        name="s", modalities=["ehr"], data=SiteDataConfig(benchmark_dir="x"), device=None
    )
    with pytest.raises(ValueError, match=r"site 's': TOML cannot hold .*'device'"):
        site.to_toml()

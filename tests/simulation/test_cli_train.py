"""`omnifuse train` end to end on a tiny config, and its error path."""

from __future__ import annotations

import json

import pytest

from simulation.cli import main
from tests.simulation.prepared_fixtures import TINY_TRAIN

TINY = "train_size = 200\nval_size = 100\ntest_size = 100\n" + TINY_TRAIN


def test_train_writes_config_metrics_and_checkpoint(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(TINY)
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["test"]["auroc"] <= 1.0
    assert json.loads((out / "config.json").read_text())["model"]["d"] == 8
    assert (out / "checkpoint" / "model.safetensors").is_file()


def test_bad_config_names_file_and_field(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(TINY.replace("d = 8", "d = -1"))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "bad.toml" in err and "d" in err


@pytest.mark.slow
def test_default_centralised_run_learns_and_finds_the_planted_lazy_modality(tmp_path):
    """The built-in run: 3 modalities, 'rep' planted as the noisy one."""
    out = tmp_path / "default"
    assert main(["train", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["test"]
    assert metrics["test"]["auroc"] > 0.85
    assert metrics["lazy_combination"] == ["rep"]


# -- prepared MIMIC-format sites ----------------------------------------------------------

IHM = "in-hospital-mortality"


@pytest.fixture(scope="module")
def ehr_sites(tmp_path_factory):
    """Two EHR-only sites over synthetic MIMIC files, their feature caches prepared."""
    from omnifuse_model.data.features.cache import prepare_site
    from omnifuse_model.site_config import SiteConfig
    from simulation.synthetic_mimic.writer import SyntheticMimicConfig, write_synthetic_mimic

    base = tmp_path_factory.mktemp("ehr_sites")
    paths = []
    for k, seed in enumerate((4, 9)):
        write_synthetic_mimic(
            SyntheticMimicConfig(num_stays=30, seed=seed, image_size=32), base / f"d{k}"
        )
        site = SiteConfig(
            name=f"site_{k}", task=IHM, modalities=["ehr"], cache_dir=base / f"cache{k}",
            device="cpu", data={"benchmark_dir": base / f"d{k}" / IHM},
        )  # fmt: skip
        prepare_site(site, progress=False)
        path = base / f"site_{k}.toml"
        path.write_text(site.to_toml())
        paths.append(path)
    return paths


def test_training_on_prepared_sites_pools_them_with_the_federation_normaliser(
    ehr_sites, tmp_path, capsys
):
    import numpy as np

    from omnifuse_model.data.ehr.normalizer import (
        EHRAggregates,
        EHRNormalizer,
        combine_aggregates,
    )
    from omnifuse_model.site_config import load_site_config

    config = tmp_path / "run.toml"
    config.write_text(TINY.split("[model]", 1)[1].join(["[model]", ""]))
    out = tmp_path / "run"
    sites = [arg for path in ehr_sites for arg in ("--site", str(path))]
    assert main(["train", *sites, "--config", str(config), "--out", str(out)]) == 0
    meta = json.loads((out / "checkpoint" / "config.json").read_text())
    preprocessing = meta["extra"]["preprocessing"]
    assert preprocessing["contributors"] == ["site_0", "site_1"]
    parts = []
    for path in ehr_sites:
        cache = load_site_config(path).cache_dir
        parts.append(
            EHRAggregates.from_dict(json.loads((cache / "ehr_aggregates.json").read_text()))
        )
    total = combine_aggregates(parts)
    pooled = EHRNormalizer.from_aggregates(total.count, total.sums, total.sumsq)
    assert np.allclose(preprocessing["normalizer"]["means"], pooled.means)
    assert set(preprocessing["expected_fingerprints"]) == {"ehr"}
    summary = json.loads((out / "metrics.json").read_text())["test"]
    assert summary["sites"] == ["site_0", "site_1"] and summary["sizes"]["test"] > 0

    preds = tmp_path / "preds.csv"
    assert main(["predict", str(out), str(ehr_sites[0]), "--out", str(preds)]) == 0
    rows = preds.read_text().splitlines()
    assert (
        rows[0]
        == "stay,risk,present_ehr,imputed_ehr,present_cxr,imputed_cxr,present_rep,imputed_rep"
    )
    assert all(r.split(",")[0].endswith("_timeseries.csv") for r in rows[1:])  # local stay ids

    # a cache from another EHR pipeline than the checkpoint's is refused, naming both
    real = meta["extra"]["preprocessing"]["expected_fingerprints"]["ehr"]
    meta["extra"]["preprocessing"]["expected_fingerprints"]["ehr"] = "0" * 64
    (out / "checkpoint" / "config.json").write_text(json.dumps(meta))
    capsys.readouterr()
    code = main(["evaluate", str(out), str(ehr_sites[0]), "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 1
    assert "0" * 16 in err and real[:16] in err and "site_0" in err

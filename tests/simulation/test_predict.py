"""`omnifuse predict`: one row per test stay, presence flags equal to the availability."""

from __future__ import annotations

import csv

import torch

from omnifuse_model.model import OmniFuse
from omnifuse_model.site_config import load_site_config
from omnifuse_model.site_data import load_site_test_dataset
from simulation.cli import main
from tests.simulation.prepared_fixtures import feature_scenario, federated_run


def test_rows_are_the_test_stays_and_flags_are_the_availability(tmp_path):
    scenario = feature_scenario(tmp_path / "scenario")
    run_dir = federated_run(tmp_path / "fed", scenario)
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run_dir), str(scenario / "site_0.toml"), "--out", str(out)]) == 0
    with out.open() as stream:
        rows = list(csv.DictReader(stream))
    model = OmniFuse.from_checkpoint(run_dir / "checkpoints" / "round_0003").eval()
    site = load_site_config(scenario / "site_0.toml")
    test = load_site_test_dataset(site, model.config)
    assert list(rows[0]) == [
        "stay", "risk", "present_ehr", "imputed_ehr", "present_cxr", "imputed_cxr",
    ]  # fmt: skip
    assert [r["stay"] for r in rows] == test.sample_ids
    for row, available in zip(rows, test.availability.tolist(), strict=True):
        for name, held in zip(["ehr", "cxr"], available, strict=True):
            assert row[f"present_{name}"] == str(held)
            assert row[f"imputed_{name}"] == str(not held)
    assert not all(r["present_cxr"] == "True" for r in rows)  # the flags vary
    with torch.no_grad():
        expected = model.predict_proba(model(test.inputs, test.availability, test.masks).logits)
    risks = torch.tensor([float(r["risk"]) for r in rows])
    assert torch.allclose(risks, expected.reshape(-1), atol=1e-5)


def test_a_site_holding_one_modality_gets_the_other_imputed_everywhere(tmp_path):
    scenario = feature_scenario(tmp_path / "scenario")
    run_dir = federated_run(tmp_path / "fed", scenario)
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run_dir), str(scenario / "site_1.toml"), "--out", str(out)]) == 0
    with out.open() as stream:
        rows = list(csv.DictReader(stream))
    assert rows and all(r["imputed_cxr"] == "True" and r["present_ehr"] == "True" for r in rows)


def test_out_in_a_missing_folder_is_one_clear_line(tmp_path, capsys):
    scenario = feature_scenario(tmp_path / "scenario")
    out = tmp_path / "nowhere" / "preds.csv"
    code = main(["predict", str(tmp_path), str(scenario / "site_0.toml"), "--out", str(out)])
    assert code == 1
    assert "nowhere" in capsys.readouterr().err

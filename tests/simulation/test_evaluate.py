"""Calibration metrics against hand-computed values, and `omnifuse evaluate` on centralised
and federated checkpoints."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import numpy as np
import pytest

from omnifuse_model.metrics import expected_calibration_error, mean_interval, reliability_bins
from simulation.cli import main
from tests.simulation.prepared_fixtures import TINY_TRAIN, feature_scenario, federated_run


def test_ece_equals_the_hand_computed_value():
    labels = np.array([0, 1, 1, 0, 1])
    probabilities = np.array([0.1, 0.3, 0.35, 0.8, 0.9])
    # 2 bins: [0, .5) holds .1 .3 .35 (confidence .25, frequency 2/3);
    #         [.5, 1] holds .8 .9 (confidence .85, frequency 1/2)
    expected = 3 / 5 * abs(2 / 3 - 0.25) + 2 / 5 * abs(0.5 - 0.85)
    assert expected_calibration_error(labels, probabilities, "binary", bins=2) == pytest.approx(
        expected
    )
    bins = reliability_bins(labels, probabilities, "binary", bins=2)
    assert [b["count"] for b in bins] == [3, 2]
    assert bins[1]["confidence"] == pytest.approx(0.85)


def test_ece_of_a_perfectly_calibrated_predictor_is_zero_and_empty_bins_are_nan():
    labels = np.array([1, 0, 1, 0])
    probabilities = np.array([0.5, 0.5, 0.5, 0.5])
    assert expected_calibration_error(labels, probabilities, "binary", bins=4) == 0.0
    counts = [b["count"] for b in reliability_bins(labels, probabilities, "binary", bins=4)]
    assert counts == [0, 0, 4, 0]
    assert math.isnan(reliability_bins(labels, probabilities, "binary", bins=4)[0]["frequency"])


def test_multiclass_ece_uses_the_top_class():
    labels = np.array([0, 1])
    probabilities = np.array([[0.9, 0.1], [0.7, 0.3]])  # right at .9, wrong at .7
    # one bin: confidence .8, accuracy .5
    assert expected_calibration_error(labels, probabilities, "multiclass", 1) == pytest.approx(0.3)


def test_mean_interval_covers_the_mean_and_needs_two_values():
    low, high = mean_interval(np.array([0.1, 0.2, 0.3, 0.4]), samples=500, seed=0)
    assert low <= 0.25 <= high
    assert all(math.isnan(v) for v in mean_interval(np.array([0.5])))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    scenario = feature_scenario(root / "scenario")
    config = root / "run.toml"
    config.write_text(TINY_TRAIN)
    run = root / "run"
    assert (
        main(["train", "--scenario", str(scenario), "--config", str(config), "--out", str(run)])
        == 0
    )
    return scenario, run


def test_evaluate_writes_metrics_calibration_and_breakdown(trained, tmp_path):
    scenario, run = trained
    out = tmp_path / "eval"
    args = ["evaluate", str(run / "checkpoint"), str(scenario / "site_0.toml"), "--out", str(out)]
    assert main([*args, "--bootstrap", "50", "--bins", "5", "--min-combination", "20"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    weights = (run / "checkpoint" / "model.safetensors").read_bytes()
    assert report["checkpoint"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert report["checkpoint"]["kind"] == "centralised"
    assert report["site_config"]["name"] == "site_0"
    assert report["auroc_low"] <= report["auroc"] <= report["auroc_high"]
    assert report["bootstrap"] == {"resamples": 50, "seed": 0, "level": 0.95}
    assert len(report["calibration"]["bins"]) == 5
    assert sum(b["count"] for b in report["calibration"]["bins"]) == report["n"]
    combos = report["by_combination"]
    assert sum(row["n"] for row in combos) == report["n"]
    assert {row["combination"] for row in combos} <= {"ehr", "cxr", "ehr+cxr"}
    for row in combos:
        assert row["suppressed"] == (row["n"] < 20)
        assert ("auroc" in row) != row["suppressed"]
    assert (out / "reliability.png").stat().st_size > 1000


def test_evaluate_on_a_federated_round_checkpoint_resolves_latest(trained, tmp_path):
    scenario, _ = trained
    run_dir = federated_run(tmp_path / "fed", scenario, round_number=3)
    out = tmp_path / "eval"
    assert main(["evaluate", str(run_dir), str(scenario / "site_1.toml"), "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["checkpoint"]["kind"] == "federated"
    assert report["checkpoint"]["round"] == 3
    assert report["checkpoint"]["path"].endswith("round_0003")
    assert [row["combination"] for row in report["by_combination"]] == ["ehr"]  # site_1: ehr only


def test_a_site_with_modalities_the_checkpoint_lacks_is_refused_naming_both(
    trained, tmp_path, capsys
):
    scenario, run = trained
    site = tmp_path / "site.toml"
    text = (scenario / "site_0.toml").read_text()
    site.write_text(
        text.replace('modalities = [\n    "ehr",', 'modalities = [\n    "ehr",\n    "rep",', 1)
    )
    assert '"rep"' in site.read_text()
    code = main(["evaluate", str(run), str(site), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 1
    assert "rep" in err and "['ehr', 'cxr']" in err


def test_a_path_without_a_checkpoint_is_one_clear_line(tmp_path, capsys):
    code = main(["evaluate", str(tmp_path), str(tmp_path / "site.toml"), "--out", str(tmp_path)])
    assert code == 1
    assert "model.safetensors" in capsys.readouterr().err


def test_multilabel_report_has_macro_and_per_label_metrics_and_pooled_calibration():
    from argparse import Namespace

    from omnifuse_model.config import ModalitySpec, OmniFuseConfig
    from simulation.evaluate_command import evaluation_report

    rng = np.random.default_rng(0)
    labels = (rng.random((80, 3)) < 0.4).astype(float)
    probabilities = np.clip(labels * 0.6 + rng.random((80, 3)) * 0.4, 0, 1)
    probabilities[:, 2] = rng.random(80)  # label 2: no signal
    availability = np.ones((80, 2), dtype=bool)
    availability[:50, 1] = False
    config = OmniFuseConfig(
        modalities=[ModalitySpec(name=n, kind="vector", input_dim=2) for n in ("a", "b")],
        task="multilabel",
        num_classes=3,
    )
    args = Namespace(bootstrap=20, seed=0, bins=4, min_combination=40)
    report = evaluation_report(labels, probabilities, availability, config, args)
    per_label = [row["auroc"] for row in report["per_label"]]
    assert per_label[0] == 1.0 and per_label[1] == 1.0 and per_label[2] < 0.8
    assert report["auroc"] == pytest.approx(np.mean(per_label))
    assert sum(b["count"] for b in report["calibration"]["bins"]) == 80 * 3
    combos = {row["combination"]: row for row in report["by_combination"]}
    assert combos["a"]["n"] == 50 and not combos["a"]["suppressed"]
    assert combos["a+b"]["n"] == 30 and combos["a+b"]["suppressed"]
    assert "auroc" not in combos["a+b"]


@pytest.mark.parametrize("change", ["d", "modality"])
def test_a_checkpoint_whose_config_disagrees_with_its_weights_is_one_named_line(
    trained, tmp_path, capsys, change
):
    scenario, run = trained
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(run / "checkpoint", checkpoint)
    meta = json.loads((checkpoint / "config.json").read_text())
    if change == "d":
        meta["config"]["d"] = 16
    else:  # a modality renamed: its encoder's tensors are missing from the weights
        meta["config"]["modalities"][1]["name"] = "rep"
    (checkpoint / "config.json").write_text(json.dumps(meta))
    code = main(
        ["evaluate", str(checkpoint), str(scenario / "site_1.toml"), "--out", str(tmp_path / "e")]
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, err
    assert f"checkpoint {checkpoint / 'model.safetensors'}: weights do not match" in lines[0]
    assert "tensors wrong: " in lines[0]  # each wrong tensor named with both shapes

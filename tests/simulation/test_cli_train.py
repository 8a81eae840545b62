"""`omnifuse train` end to end on a tiny config, and its error path."""

from __future__ import annotations

import json

import pytest

from simulation.cli import main

TINY = """
train_size = 200
val_size = 100
test_size = 100
[model]
d = 8
num_blocks = 1
cra_hidden = [16, 8]
[train]
epochs = 2
batch_size = 64
bootstrap_samples = 10
progress = false
"""


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

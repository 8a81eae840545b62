"""Shared builders for the train / evaluate / predict / experiment tests: a tiny
feature-level scenario, a centralised checkpoint on it and a federated round checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.model import OmniFuse
from omnifuse_model.synthetic import SyntheticFeatureConfig, SyntheticModality
from server.checkpoint import ServerState, save_round
from simulation.scenarios import write_feature_scenario

TINY_MODEL = {"d": 8, "num_blocks": 1, "cra_hidden": [16, 8]}
TINY_TRAIN = """
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


def tiny_data() -> SyntheticFeatureConfig:
    return SyntheticFeatureConfig(
        modalities=[
            SyntheticModality(name="ehr", dim=6, signal=1.5, noise=0.5, missing_rate=0.2),
            SyntheticModality(name="cxr", dim=5, signal=1.0, noise=0.8, missing_rate=0.4),
        ],
        task="binary",
    )


def feature_scenario(directory: Path) -> Path:
    """site_0 (ehr+cxr), site_1 (ehr only) and a server test site; returns the folder."""
    data = tiny_data()
    model = OmniFuseConfig.model_validate(
        {"modalities": data.modality_specs(), "task": "binary", **TINY_MODEL}
    )
    write_feature_scenario(
        directory, data, model, [["ehr", "cxr"], ["ehr"]], [(120, 60), (80, 60)], 150
    )
    return directory


def federated_run(run_dir: Path, scenario: Path, round_number: int = 3) -> Path:
    """A federated run folder with one round checkpoint written by the server's own writer."""
    from omnifuse_model.scenario import Scenario

    config = Scenario.load(scenario).model
    torch.manual_seed(0)
    weights = {k: v.numpy().copy() for k, v in OmniFuse(config).state_dict().items()}
    state = ServerState(
        round=round_number, model_config=config.model_dump(mode="json"), preprocessing={}
    )
    save_round(run_dir, {k: np.asarray(v) for k, v in weights.items()}, state)
    return run_dir

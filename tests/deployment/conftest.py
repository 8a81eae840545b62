"""Fixtures for the deployment tests: a small two-site feature scenario."""

from __future__ import annotations

import pytest


@pytest.fixture
def two_site_scenario(tmp_path):
    """site_0 (ehr + cxr) and site_1 (ehr only), tiny synthetic features; the directory."""
    from omnifuse_model.config import OmniFuseConfig
    from omnifuse_model.synthetic import SyntheticFeatureConfig, SyntheticModality
    from simulation.scenarios import write_feature_scenario

    data = SyntheticFeatureConfig(
        modalities=[
            SyntheticModality(name="ehr", dim=8, signal=1.5, noise=0.5, missing_rate=0.1),
            SyntheticModality(name="cxr", dim=8, signal=1.0, noise=1.0, missing_rate=0.3),
        ]
    )
    model = OmniFuseConfig(
        modalities=data.modality_specs(), task="binary", d=8, cra_hidden=(16, 8), num_blocks=1
    )
    directory = tmp_path / "scenario"
    write_feature_scenario(
        directory,
        data,
        model,
        site_modalities=[["ehr", "cxr"], ["ehr"]],
        site_sizes=[(80, 40), (60, 40)],
        test_size=100,
    )
    return directory

"""Central DP (Flower's fixed-clipping wrappers) composed with our strategy."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from server.app import with_central_dp
from server.run_config import FederationRunConfig
from server.strategy import OmniFuseStrategy


def _clipped_uniform_mean(global_state, results, clip):
    keys = list(global_state)
    base = {k: global_state[k].numpy().astype(np.float64) for k in keys}
    clipped = []
    for result in results:
        delta = {k: result.state[k].numpy().astype(np.float64) - base[k] for k in keys}
        norm = np.sqrt(sum(float((d**2).sum()) for d in delta.values()))
        scale = min(1.0, clip / norm)
        clipped.append({k: base[k] + delta[k] * scale for k in keys})
    return {k: np.mean([c[k] for c in clipped], axis=0) for k in keys}


@pytest.mark.parametrize("noise", [0.0, 2.0])
def test_server_side_clipping_then_uniform_average_then_noise(
    site_round, site_registry, model_config, tmp_path, noise
):
    global_state, results, replies = site_round
    clip = 0.05  # far below the real update norms: every update is clipped
    run = FederationRunConfig(
        scenario_dir=tmp_path,
        run_dir=tmp_path,
        central_dp="server",
        dp_noise_multiplier=noise,
        dp_clipping_norm=clip,
        min_train_nodes=2,
    )
    strategy = OmniFuseStrategy(run, model_config, registry=site_registry)
    strategy.previous = {k: v.numpy() for k, v in global_state.items()}
    wrapper = with_central_dp(strategy, run, sites=2)
    assert isinstance(wrapper, DifferentialPrivacyServerSideFixedClipping)
    wrapper.current_arrays = ArrayRecord({k: v.clone() for k, v in global_state.items()})
    arrays, _ = wrapper.aggregate_train(1, replies)
    result = {k: v.numpy().astype(np.float64) for k, v in arrays.items()}
    expected = _clipped_uniform_mean(global_state, results, clip)
    residual = np.concatenate([(result[k] - expected[k]).ravel() for k in expected])
    if noise == 0.0:
        np.testing.assert_allclose(residual, 0.0, atol=1e-6)
        step = np.sqrt(
            sum(float(((result[k] - global_state[k].numpy()) ** 2).sum()) for k in expected)
        )
        assert step <= clip + 1e-6  # the mean of clipped updates is within the clip norm
    else:
        # Flower's std: noise_multiplier * clipping_norm / sampled sites
        assert residual.std() == pytest.approx(noise * clip / 2, rel=0.05)


def test_central_dp_off_returns_the_strategy_itself(model_config, tmp_path):
    run = FederationRunConfig(scenario_dir=tmp_path, run_dir=tmp_path)
    strategy = OmniFuseStrategy(run, model_config)
    assert with_central_dp(strategy, run, sites=3) is strategy

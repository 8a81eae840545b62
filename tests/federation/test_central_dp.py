"""Central DP (Flower's fixed-clipping wrappers) composed with our strategy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from omnifuse_model import federation_schema as wire
from server.app import with_central_dp
from server.central_dp import NOISE_STD, NOISE_UPDATES
from server.run_config import FederationRunConfig
from server.strategy import OmniFuseStrategy
from tests.federation.conftest import ROUND_SITES, request_to


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


# -- a hostile or broken site under central DP -------------------------------------------
# Flower's wrappers read replies before the strategy does; ours screen them first.


def _dp_run(tmp_path, mode: str, noise: float = 0.0, clip: float = 0.05, min_train: int = 1):
    return FederationRunConfig(
        scenario_dir=tmp_path,
        run_dir=tmp_path,
        central_dp=mode,
        dp_noise_multiplier=noise,
        dp_clipping_norm=clip,
        min_train_nodes=min_train,
    )


def _wrapped(run, model_config, site_registry, global_state):
    strategy = OmniFuseStrategy(run, model_config, registry=site_registry)
    strategy.previous = {k: v.numpy() for k, v in global_state.items()}
    wrapper = with_central_dp(strategy, run, sites=2)
    wrapper.current_arrays = ArrayRecord({k: v.clone() for k, v in global_state.items()})
    return strategy, wrapper


def _result_of(arrays):
    return {k: v.numpy().astype(np.float64) for k, v in arrays.items()}


def _site_of(results, replies, name):
    index = list(reversed(ROUND_SITES)).index(name)  # site_round's replies: reverse order
    return results[index], replies[index]


def _without_key(reply: Message, key: str) -> Message:
    content = RecordDict(dict(reply.content.items()))
    arrays = dict(content[wire.ARRAYS].items())
    del arrays[key]
    content[wire.ARRAYS] = ArrayRecord(arrays)
    return Message(content=content, reply_to=_request_of(reply))


def _request_of(reply: Message) -> Message:
    return request_to(int(reply.metadata.src_node_id))


@pytest.mark.parametrize("mode", ["server", "client"])
def test_a_reply_missing_a_key_is_rejected_not_a_crash(
    site_round, site_registry, model_config, tmp_path, mode
):
    global_state, results, replies = site_round
    run = _dp_run(tmp_path, mode, clip=1e6)  # no clipping: the average is plain
    strategy, wrapper = _wrapped(run, model_config, site_registry, global_state)
    key = next(iter(global_state))
    good, good_reply = _site_of(results, replies, "a_full")
    _, bad_reply = _site_of(results, replies, "b_no_cxr")
    arrays, metrics = wrapper.aggregate_train(1, [_without_key(bad_reply, key), good_reply])
    result = _result_of(arrays)
    for k in global_state:
        np.testing.assert_allclose(result[k], good.state[k].numpy(), atol=1e-6)
    (problem,) = strategy.records[1].problems
    assert problem["site"] == "b_no_cxr" and problem["status"] == "rejected"
    assert key in problem["reason"]
    assert strategy.records[1].accepted_sites == ["a_full"]
    assert metrics[NOISE_UPDATES] == 1.0


def test_reordered_keys_are_clipped_against_the_right_tensors(
    site_round, site_registry, model_config, tmp_path
):
    global_state, results, replies = site_round
    clip = 0.05
    run = _dp_run(tmp_path, "server", clip=clip, min_train=2)
    _, wrapper = _wrapped(run, model_config, site_registry, global_state)
    shuffled = []
    for reply in replies:
        content = RecordDict(dict(reply.content.items()))
        items = list(content[wire.ARRAYS].items())
        content[wire.ARRAYS] = ArrayRecord(dict(reversed(items)))
        shuffled.append(Message(content=content, reply_to=_request_of(reply)))
    arrays, _ = wrapper.aggregate_train(1, shuffled)
    result = _result_of(arrays)
    expected = _clipped_uniform_mean(global_state, results, clip)
    for k in expected:
        np.testing.assert_allclose(result[k], expected[k], atol=1e-6)


@pytest.mark.parametrize("mode", ["server", "client"])
def test_an_error_reply_does_not_skip_the_round_and_noise_follows_the_accepted_count(
    site_round, site_registry, model_config, tmp_path, mode
):
    """Flower alone skips aggregation when any reply is an error; here the failing site is
    recorded and the other averaged, with noise calibrated to one update, not two."""
    global_state, results, replies = site_round
    noise, clip = 2.0, 0.05
    run = _dp_run(tmp_path, mode, noise=noise, clip=clip)
    strategy, wrapper = _wrapped(run, model_config, site_registry, global_state)
    good, good_reply = _site_of(results, replies, "a_full")
    _, bad_reply = _site_of(results, replies, "b_no_cxr")
    failed = Message(error=Error(code=0, reason="site crashed"), reply_to=_request_of(bad_reply))
    if mode == "client":  # the site clipped its own update (fixedclipping_mod)
        good = _clipped(global_state, good, clip)
        good_reply = _with_state(good_reply, good)
    arrays, metrics = wrapper.aggregate_train(1, [failed, good_reply])
    assert arrays is not None
    result = _result_of(arrays)
    expected = _clipped_uniform_mean(global_state, [good], clip)
    residual = np.concatenate([(result[k] - expected[k]).ravel() for k in expected])
    assert residual.std() == pytest.approx(noise * clip / 1, rel=0.05)
    assert metrics[NOISE_STD] == pytest.approx(noise * clip)
    (problem,) = strategy.records[1].problems
    assert problem["status"] == "failed" and problem["site"] == "b_no_cxr"


def _clipped(global_state, result, clip):
    """``result`` with its update clipped to ``clip`` (what fixedclipping_mod sends)."""
    delta = {
        k: result.state[k].numpy().astype(np.float64) - global_state[k].numpy()
        for k in global_state
    }
    norm = np.sqrt(sum(float((d**2).sum()) for d in delta.values()))
    scale = min(1.0, clip / norm)
    state = {
        k: torch.from_numpy((global_state[k].numpy() + delta[k] * scale).astype(np.float32))
        for k in global_state
    }
    return dataclasses.replace(result, state=state)


def _with_state(reply: Message, result) -> Message:
    content = RecordDict(dict(reply.content.items()))
    content[wire.ARRAYS] = ArrayRecord(result.state)
    return Message(content=content, reply_to=_request_of(reply))


def test_client_side_clipping_rejects_an_unclipped_update(
    site_round, site_registry, model_config, tmp_path
):
    global_state, results, replies = site_round
    clip = 0.05
    run = _dp_run(tmp_path, "client", clip=clip)
    strategy, wrapper = _wrapped(run, model_config, site_registry, global_state)
    honest = _clipped(global_state, _site_of(results, replies, "a_full")[0], clip)
    honest_reply = _with_state(_site_of(results, replies, "a_full")[1], honest)
    _, unclipped_reply = _site_of(results, replies, "b_no_cxr")  # the raw update, norm >> clip
    arrays, _ = wrapper.aggregate_train(1, [unclipped_reply, honest_reply])
    result = _result_of(arrays)
    for k in global_state:
        np.testing.assert_allclose(result[k], honest.state[k].numpy(), atol=1e-6)
    (problem,) = strategy.records[1].problems
    assert problem["site"] == "b_no_cxr"
    assert problem["reason"].startswith("not_clipped:")
    rows = {row.site: row.update_status for row in strategy.records[1].audit}
    assert rows["b_no_cxr"].startswith("rejected:not_clipped:")


def test_every_reply_rejected_keeps_the_model_and_records_why(
    site_round, site_registry, model_config, tmp_path
):
    global_state, _, replies = site_round
    run = _dp_run(tmp_path, "server", noise=1.0)
    strategy, wrapper = _wrapped(run, model_config, site_registry, global_state)
    key = next(iter(global_state))
    arrays, metrics = wrapper.aggregate_train(1, [_without_key(r, key) for r in replies])
    assert arrays is None and metrics is None
    problems = strategy.records[1].problems
    assert sorted(p["site"] for p in problems[:-1]) == ["a_full", "b_no_cxr"]
    assert problems[-1]["reason"] == "too_few_accepted:0<1"


@pytest.mark.parametrize("mode", ["server", "client"])
@pytest.mark.parametrize("tiny", [0.0, 1e-23])
def test_an_update_of_norm_zero_or_below_float32_squares_is_averaged(
    site_round, site_registry, model_config, tmp_path, mode, tiny
):
    """A site echoing the weights it was sent (norm 0, or a norm whose float32 squares
    underflow) made Flower's server-side clipping divide by zero; it is a valid update."""
    global_state, results, replies = site_round
    global_state = {k: v.clone() for k, v in global_state.items()}
    first = next(iter(global_state))
    global_state[first].view(-1)[0] = 0.0  # a weight at 0: the site can move it by 1e-23
    clip = 0.05
    run = _dp_run(tmp_path, mode, clip=clip, min_train=2)
    strategy, wrapper = _wrapped(run, model_config, site_registry, global_state)
    honest = _clipped(global_state, _site_of(results, replies, "a_full")[0], clip)
    honest_reply = _with_state(_site_of(results, replies, "a_full")[1], honest)
    echo = {k: v.clone() for k, v in global_state.items()}
    echo[first].view(-1)[0] = tiny
    _, echo_reply = _site_of(results, replies, "b_no_cxr")
    echo_reply = _with_state(echo_reply, dataclasses.replace(honest, state=echo))
    arrays, metrics = wrapper.aggregate_train(1, [echo_reply, honest_reply])
    result = _result_of(arrays)
    for k in global_state:
        expected = (honest.state[k].numpy().astype(np.float64) + echo[k].numpy()) / 2
        np.testing.assert_allclose(result[k], expected, atol=1e-6)
    assert strategy.records[1].problems == []
    assert metrics[NOISE_UPDATES] == 2.0


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean"])
@pytest.mark.parametrize("mode", ["server", "client"])
def test_central_dp_with_a_robust_rule_is_refused_by_name(tmp_path, aggregation, mode):
    """Noise of std sigma * C / n covers a uniform mean only: with 3 sites u, -u, 0 the median
    moves by the whole u when the third becomes u."""
    config = {
        "scenario-dir": str(tmp_path),
        "run-dir": str(tmp_path),
        "central-dp": mode,
        "aggregation": aggregation,
    }
    with pytest.raises(ValueError, match=f"central-dp = '{mode}' needs aggregation = 'fedavg'"):
        FederationRunConfig.from_flower(config)
    config["central-dp"] = "off"
    assert FederationRunConfig.from_flower(config).aggregation == aggregation

"""Update validation: bad site updates are rejected by name, logged, audited; the round goes on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from omnifuse_model import federation_schema as wire
from server.run_config import FederationRunConfig
from server.strategy import OmniFuseStrategy
from server.update_validation import update_rejection

NAMES = ["ehr"]
REFERENCE = {"w": np.zeros((2, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
METRICS = {"num-examples": 10, "num-present.ehr": 10}


@pytest.mark.parametrize(
    ("state", "metrics", "reason"),
    [
        ({"w": np.zeros((2, 2))}, METRICS, "missing_keys:b"),
        ({**REFERENCE, "x": np.zeros(1)}, METRICS, "unexpected_keys:x"),
        ({"w": np.zeros((2, 3)), "b": np.zeros(2)}, METRICS, "shape_mismatch:w"),
        ({"w": np.full((2, 2), np.nan), "b": np.zeros(2)}, METRICS, "non_finite:w"),
        ({"w": np.zeros((2, 2)), "b": np.array([np.inf, 0])}, METRICS, "non_finite:b"),
        ({"w": np.full((2, 2), 10.0), "b": np.zeros(2)}, METRICS, "norm_exceeded:20>5"),
        (REFERENCE, {"num-examples": 10}, "bad_metric:num-present.ehr"),
        (REFERENCE, {**METRICS, "num-examples": -1}, "bad_metric:num-examples"),
    ],
)
def test_each_kind_of_bad_update_has_a_named_reason(state, metrics, reason):
    assert update_rejection(state, REFERENCE, metrics, NAMES, max_norm=5.0) == reason


def test_a_good_update_passes_and_the_bound_is_optional():
    near = {"w": np.full((2, 2), 1.0), "b": np.zeros(2)}  # distance 2
    assert update_rejection(near, REFERENCE, METRICS, NAMES, max_norm=5.0) is None
    far = {"w": np.full((2, 2), 10.0), "b": np.zeros(2)}
    assert update_rejection(far, REFERENCE, METRICS, NAMES, max_norm=None) is None


def _poisoned(reply: Message, key: str, value: float, reply_from) -> Message:
    state = reply.content[wire.ARRAYS].to_torch_state_dict()
    state[key] = torch.full_like(state[key], value)
    content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord(state),
            wire.METRICS: reply.content[wire.METRICS],
            wire.AUDIT: reply.content[wire.AUDIT],
        }
    )
    return reply_from(content, reply.metadata.src_node_id)


def test_the_round_goes_on_without_the_rejected_site(
    site_round, site_registry, reply_from, model_config, tmp_path
):
    global_state, results, replies = site_round
    run = FederationRunConfig(
        transport="float32", scenario_dir=tmp_path, run_dir=tmp_path, min_train_nodes=1
    )
    strategy = OmniFuseStrategy(run, model_config, registry=site_registry)
    strategy.previous = {k: v.numpy() for k, v in global_state.items()}
    key = "forward_cra.blocks.0.encoder.0.weight"
    bad = _poisoned(replies[0], key, float("nan"), reply_from)  # site b_no_cxr
    arrays, metrics = strategy.aggregate_train(1, [bad, replies[1]])
    good = next(r for r in results if r.audit.site == "a_full")
    assert torch.equal(arrays.to_torch_state_dict()[key], good.state[key])
    statuses = {row.site: row.update_status for row in strategy.records[1].audit}
    assert statuses == {"a_full": "accepted", "b_no_cxr": f"rejected:non_finite:{key}"}
    assert strategy.records[1].problems == [
        {
            "node": bad.metadata.src_node_id,
            "status": "rejected",
            "site": "b_no_cxr",
            "reason": f"non_finite:{key}",
        }
    ]
    assert metrics["num-examples"] == good.metrics["num-examples"]


def test_too_few_accepted_updates_keep_the_global_model(
    site_round, site_registry, reply_from, model_config, tmp_path
):
    global_state, _, replies = site_round
    run = FederationRunConfig(
        transport="float32",
        scenario_dir=tmp_path,
        run_dir=tmp_path,
        min_train_nodes=2,
        max_update_norm=1e-9,
    )  # every real update moves further
    strategy = OmniFuseStrategy(run, model_config, registry=site_registry)
    strategy.previous = {k: v.numpy() for k, v in global_state.items()}
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert all(
        r.update_status.startswith("rejected:norm_exceeded") for r in strategy.records[1].audit
    )


def test_an_unreadable_audit_is_a_rejection_not_a_crash(
    site_round, site_registry, reply_from, model_config, tmp_path
):
    global_state, _, replies = site_round
    strategy = OmniFuseStrategy(
        FederationRunConfig(
            transport="float32", scenario_dir=tmp_path, run_dir=tmp_path, min_train_nodes=1
        ),
        model_config,
        registry=site_registry,
    )
    strategy.previous = {k: v.numpy() for k, v in global_state.items()}
    broken = RecordDict(
        {
            wire.ARRAYS: replies[0].content[wire.ARRAYS],
            wire.METRICS: replies[0].content[wire.METRICS],
            wire.AUDIT: ConfigRecord({"row": "{not json"}),
        }
    )
    arrays, _ = strategy.aggregate_train(
        1,
        [reply_from(broken, replies[0].metadata.src_node_id), replies[1]],
    )
    assert arrays is not None
    assert strategy.records[1].problems[0]["reason"] == "bad_audit:JSONDecodeError"

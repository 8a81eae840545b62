"""Modality-aware aggregation, the wire format, and the strategy on real Flower records."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

from omnifuse_model import federation_schema as wire
from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.model import OmniFuse
from omnifuse_model.round_plan import RoundPlan
from server.aggregation import aggregate_states as modality_aware_average
from server.round_metrics import merge_tla, weighted_metrics
from server.run_config import FederationRunConfig
from server.strategy import OmniFuseStrategy

NAMES = ["ehr", "cxr"]


def test_a_modality_is_averaged_only_over_sites_that_held_it():
    states = [
        {
            "encoders.encoders.ehr.w": np.array([1.0]),
            "encoders.encoders.cxr.w": np.array([10.0]),
            "forward_cra.w": np.array([2.0]),
        },
        {
            "encoders.encoders.ehr.w": np.array([3.0]),
            "encoders.encoders.cxr.w": np.array([99.0]),
            "forward_cra.w": np.array([4.0]),
        },
    ]
    metrics = [
        {"num-examples": 100, "num-present.ehr": 100, "num-present.cxr": 40},
        {"num-examples": 300, "num-present.ehr": 100, "num-present.cxr": 0},  # no cxr at all
    ]
    result = modality_aware_average(states, metrics, NAMES, previous=None)
    assert result["encoders.encoders.cxr.w"] == pytest.approx([10.0])  # site 2 ignored
    assert result["encoders.encoders.ehr.w"] == pytest.approx([(1 * 100 + 3 * 100) / 200])
    assert result["forward_cra.w"] == pytest.approx([(2 * 100 + 4 * 300) / 400])
    plain = modality_aware_average(states, metrics, NAMES, previous=None, modality_aware=False)
    assert plain["encoders.encoders.cxr.w"] == pytest.approx([(10 * 100 + 99 * 300) / 400])


def test_a_modality_no_site_trained_keeps_its_previous_value():
    states = [{"encoders.encoders.cxr.w": np.array([5.0])}]
    metrics = [{"num-examples": 10, "num-present.ehr": 10, "num-present.cxr": 0}]
    previous = {"encoders.encoders.cxr.w": np.array([7.0])}
    assert modality_aware_average(states, metrics, NAMES, previous)[
        "encoders.encoders.cxr.w"
    ] == pytest.approx([7.0])
    with pytest.raises(ValueError, match="encoders.encoders.cxr.w"):
        modality_aware_average(states, metrics, NAMES, previous=None)


def test_mismatched_keys_are_an_error():
    with pytest.raises(ValueError, match="different parameter keys"):
        modality_aware_average(
            [{"a": np.zeros(1)}, {"b": np.zeros(1)}],
            [{"num-examples": 1}, {"num-examples": 1}],
            NAMES,
            None,
        )


def test_parameter_modality_covers_every_modality_parameter_of_the_model():
    config = OmniFuseConfig(
        modalities=[
            {"name": "ehr", "kind": "timeseries", "input_dim": 4, "seq_len": 3},
            {"name": "cxr", "kind": "image_features", "input_dim": 5},
            {"name": "rep", "kind": "token_states", "input_dim": 6, "seq_len": 2},
        ],
        task="binary",
        d=8,
        cra_hidden=(8, 4),
        num_blocks=1,
    )
    names = config.modality_names
    owners = {key: wire.parameter_modality(key, names) for key in OmniFuse(config).state_dict()}
    for key, owner in owners.items():
        if key.startswith("encoders.encoders."):
            assert owner == key.split(".")[2]
        elif key.startswith("heads.modality_heads."):
            assert owner == names[int(key.split(".")[2])]
        else:
            assert owner is None, key
    assert {o for o in owners.values() if o} == set(names)


def test_weighted_metrics_skip_undefined_values():
    merged = weighted_metrics(
        [
            {"num-examples": 10, "val-auroc": 0.8, "num-present.ehr": 10},
            {"num-examples": 30, "val-auroc": -1.0, "num-present.ehr": 5},
            {"num-examples": 20, "val-auroc": 0.5, "num-present.ehr": 0},
        ]
    )
    assert merged["val-auroc"] == pytest.approx((0.8 * 10 + 0.5 * 20) / 30)
    assert merged["num-examples"] == 60 and merged["num-present.ehr"] == 15


def test_global_tla_merges_sums_weighted_by_counts():
    # site 1: ehr mean 0.2 over 10; site 2: ehr mean 0.9 over 90 -> merged ehr 0.83 > cxr 0.5
    site_1 = {"sum.ehr": 2.0, "count.ehr": 10, "sum.cxr": 9.0, "count.cxr": 10}
    site_2 = {"sum.ehr": 81.0, "count.ehr": 90, "sum.cxr": 40.0, "count.cxr": 90}
    assert merge_tla([site_1, site_2], NAMES, "mean") == ("ehr",)
    assert merge_tla([site_1], NAMES, "mean") == ("cxr",)


def test_audit_suppression_and_round_trip():
    assert wire.suppress(3, 5) is None and wire.suppress(0, 5) == 0 and wire.suppress(5, 5) == 5
    counts = wire.exact_combination_counts([[True, False], [True, True], [False, False]], NAMES)
    assert counts == {"ehr": 1, "cxr": 0, "ehr+cxr": 1}
    row = wire.AuditRow(
        site="a",
        round=2,
        num_examples=None,
        availability_counts={"ehr": None},
        tla_scores={"ehr": 0.5},
        lazy_combination="ehr",
        mean_dwfuse_weight={"ehr": 0.3},
        imputation_error={"ehr": None},
        val_auroc=None,
    )
    assert wire.decode_audit(wire.encode_audit(row)) == row
    with pytest.raises(ValueError, match="row"):
        wire.decode_audit({})


def test_strategy_aggregates_real_site_replies(site_round, site_registry, model_config, tmp_path):
    global_state, results, replies = site_round
    run = FederationRunConfig(transport="float32", scenario_dir=tmp_path, run_dir=tmp_path)
    strategy = OmniFuseStrategy(run, model_config, registry=copy.deepcopy(site_registry))
    strategy.previous = {k: v.numpy() for k, v in global_state.items()}
    aggregated, metrics = strategy.aggregate_train(1, replies)
    state = aggregated.to_torch_state_dict()
    by_site = {r.audit.site: r for r in results}
    assert by_site["b_no_cxr"].metrics["num-present.cxr"] == 0
    # cxr encoder comes from the only site that held cxr
    key = "encoders.encoders.cxr.net.0.weight"
    assert torch.allclose(state[key], by_site["a_full"].state[key].float())
    # the shared CRA is the sample-weighted mean of both sites
    key = "forward_cra.blocks.0.encoder.0.weight"
    n_a, n_b = (by_site[s].metrics["num-examples"] for s in ("a_full", "b_no_cxr"))
    expected = (
        by_site["a_full"].state[key].double() * n_a + by_site["b_no_cxr"].state[key].double() * n_b
    ) / (n_a + n_b)
    assert torch.allclose(state[key].double(), expected, atol=1e-6)
    assert [row.site for row in strategy.records[1].audit] == ["a_full", "b_no_cxr"]
    assert strategy.records[1].bytes["received"] > 0
    assert metrics["num-examples"] == n_a + n_b
    config = RoundPlan.model_validate_json(
        str(strategy.round_config(2, ConfigRecord())[wire.ROUND_PLAN])
    )
    assert config.site_laziness.keys() == {"a_full", "b_no_cxr"}

    # global TLA scope: the server merges the sites' sums and sends one combination back
    global_run = FederationRunConfig(
        transport="float32", scenario_dir=tmp_path, run_dir=tmp_path, tla_scope="global"
    )
    global_strategy = OmniFuseStrategy(global_run, model_config, registry=site_registry)
    global_strategy.previous = strategy.previous
    global_strategy.aggregate_train(1, replies)
    expected = merge_tla(
        [wire.encode_tla_sums(r.laziness, 5) for r in results],
        model_config.modality_names,
        model_config.tla_reduction,
    )
    assert global_strategy.global_laziness == "+".join(expected)
    sent = RoundPlan.model_validate_json(
        str(global_strategy.round_config(2, ConfigRecord())[wire.ROUND_PLAN])
    )
    assert sent.lazy_combination == "+".join(expected)
    assert config.lazy_combination == ""  # site scope sends none globally


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_the_run_configs_robust_rule_is_what_the_strategy_applies(
    rule, site_round, site_registry, model_config, tmp_path
):
    """aggregation = median / trimmed-mean: shared parameters are the unweighted coordinate-
    wise statistic of the sites (with two sites both are their plain mean, not the sample-
    weighted one); a modality's parameters still come only from the sites that held it."""
    global_state, results, replies = site_round
    run = FederationRunConfig(
        transport="float32", scenario_dir=tmp_path, run_dir=tmp_path, aggregation=rule
    )
    strategy = OmniFuseStrategy(run, model_config, registry=copy.deepcopy(site_registry))
    strategy.previous = {k: v.numpy() for k, v in global_state.items()}
    state = strategy.aggregate_train(1, replies)[0].to_torch_state_dict()
    by_site = {r.audit.site: r for r in results}
    key = "forward_cra.blocks.0.encoder.0.weight"
    plain = (by_site["a_full"].state[key].double() + by_site["b_no_cxr"].state[key].double()) / 2
    assert torch.allclose(state[key].double(), plain, atol=1e-6)
    n_a, n_b = (by_site[s].metrics["num-examples"] for s in ("a_full", "b_no_cxr"))
    assert n_a != n_b  # so the weighted mean would differ
    cxr = "encoders.encoders.cxr.net.0.weight"
    assert torch.allclose(state[cxr], by_site["a_full"].state[cxr].float())


def test_an_unknown_aggregation_rule_is_named(tmp_path):
    with pytest.raises(ValueError, match="aggregation"):
        FederationRunConfig.from_flower(
            {"scenario-dir": str(tmp_path), "run-dir": str(tmp_path), "aggregation": "krum"}
        )

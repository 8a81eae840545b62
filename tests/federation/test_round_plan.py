"""The round's instructions: one typed RoundPlan from the strategy to the ClientApp."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord

from client.app import _instructions
from client.privacy import ledger_path
from omnifuse_model import federation_schema as wire
from omnifuse_model.config import OmniFuseConfig, TrainConfig
from omnifuse_model.round_plan import RoundPlan, site_round_seed
from omnifuse_model.site_config import SiteConfig
from server.run_config import FederationRunConfig
from server.strategy import OmniFuseStrategy


@pytest.fixture
def model() -> OmniFuseConfig:
    return OmniFuseConfig(
        modalities=[{"name": n, "kind": "vector", "input_dim": 4} for n in ("ehr", "cxr")],
        task="binary",
        d=8,
    )


def _site(name: str, tmp_path, **training) -> SiteConfig:
    return SiteConfig(
        name=name,
        modalities=["ehr"],
        device="cpu",
        cache_dir=tmp_path / name,
        data={"benchmark_dir": tmp_path},
        training=training,
    )


def test_the_seed_formula_is_unchanged():
    # values of the formula the ClientApp used before the plan was typed (resume depends on them)
    assert site_round_seed(0, 1, "site_0") == 13672
    assert site_round_seed(3, 2, "hospital_a") == 3019548
    assert site_round_seed(3, 7, "hospital_b") == 3062375
    assert site_round_seed(12345, 40, "dp_hospital") == 12345359748


def test_site_train_config_applies_overrides_device_and_round_seed(model, tmp_path):
    federation = TrainConfig(epochs=2, batch_size=64, lr=1e-3, seed=3, patience=0, progress=False)
    plan = RoundPlan(model=model, train=federation, global_round=2)
    plain = plan.site_train_config(_site("hospital_a", tmp_path))
    assert plain == federation.model_copy(update={"seed": 3019548})
    tuned = plan.site_train_config(_site("hospital_a", tmp_path, batch_size=8, local_epochs=5))
    assert (tuned.batch_size, tuned.epochs, tuned.lr, tuned.seed) == (8, 5, 1e-3, 3019548)
    only_lr = _site("hospital_a", tmp_path, lr=0.5).training.apply(federation)
    assert only_lr == federation.model_copy(update={"lr": 0.5})
    other = plan.site_train_config(_site("hospital_b", tmp_path))
    assert other.seed != plain.seed  # every site draws its own stream
    again = RoundPlan.model_validate_json(plan.model_dump_json())  # a replayed round
    assert again.site_train_config(_site("hospital_a", tmp_path)) == plain


def test_lazy_combination_global_first_then_the_sites_own(model):
    plan = RoundPlan(
        model=model,
        train=TrainConfig(),
        global_round=1,
        site_laziness={"a": "ehr+cxr", "b": "cxr"},
    )
    assert plan.lazy_combination_for("a") == ("ehr", "cxr")
    assert plan.lazy_combination_for("c") is None
    glob = plan.model_copy(update={"lazy_combination": "ehr"})
    assert glob.lazy_combination_for("a") == ("ehr",) and glob.lazy_combination_for("c") == ("ehr",)


def test_strategy_plan_arrives_as_the_sites_instructions(model, tmp_path):
    run = FederationRunConfig(
        scenario_dir=tmp_path,
        run_dir=tmp_path / "run",
        num_server_rounds=6,
        local_epochs=2,
        batch_size=32,
        lr=0.004,
        seed=3,
        strategy="fedprox",
        proximal_mu=0.2,
        audit_min_count=7,
    )
    strategy = OmniFuseStrategy(run, model, round_offset=1, site_laziness={"hospital_a": "cxr"})
    config = strategy.round_config(1, ConfigRecord())
    assert list(config) == [wire.ROUND_PLAN]
    site = _site("hospital_a", tmp_path, lr=0.01)
    instructions = _instructions(config, site)
    assert instructions.model_config == model
    assert instructions.global_round == 2 and instructions.planned_rounds == 6
    assert instructions.train_config == TrainConfig(
        epochs=2,
        batch_size=32,
        lr=0.01,
        seed=3019548,
        patience=0,
        progress=False,
        bootstrap_samples=0,
        device="cpu",
    )
    assert instructions.proximal_mu == 0.2 and instructions.audit_min_count == 7
    assert instructions.lazy_combination == ("cxr",)
    assert instructions.privacy == site.privacy
    plan = RoundPlan.model_validate_json(str(config[wire.ROUND_PLAN]))
    assert instructions.privacy_ledger == ledger_path(site.cache_dir, plan.privacy_ledger)
    fedavg = OmniFuseStrategy(run.model_copy(update={"strategy": "fedavg"}), model)
    assert _instructions(fedavg.round_config(1, ConfigRecord()), site).proximal_mu == 0.0


def test_a_plan_missing_or_malformed_is_named(model, tmp_path):
    site = _site("hospital_a", tmp_path)
    with pytest.raises(ValueError, match="no 'round-plan' key"):
        _instructions(ConfigRecord({"server-round": 1}), site)
    plan = RoundPlan(model=model, train=TrainConfig(), global_round=1).model_dump(mode="json")
    plan["train"]["epoch"] = 3  # a misspelt key is an error, not a silent default
    with pytest.raises(ValueError, match=r"train\.epoch"):
        _instructions(ConfigRecord({wire.ROUND_PLAN: json.dumps(plan)}), site)

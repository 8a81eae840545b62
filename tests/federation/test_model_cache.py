"""A ClientApp process reuses one model (client.model_cache): every round and evaluation
must come out bit for bit as with a freshly built model, across different sites, weights,
lazy combinations and FedProx, and nothing may leak from one message into the next."""

from __future__ import annotations

import threading

import torch

from client import model_cache
from client.local_training import RoundInstructions, evaluate_global, train_round
from omnifuse_model import federation_schema as wire
from omnifuse_model.config import TrainConfig
from omnifuse_model.laziness import LazinessReport
from omnifuse_model.model import OmniFuse
from omnifuse_model.site_data import load_site_datasets
from tests.federation.conftest import make_site


def _states(model_config) -> tuple[dict, dict]:
    torch.manual_seed(0)
    first = OmniFuse(model_config).state_dict()
    generator = torch.Generator().manual_seed(1)
    second = {
        k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in first.items()
    }
    return first, second


def _sequence(model_config, fresh_each_step: bool) -> list:
    """Site a (two epochs, a lazy combination) from weights 1, site b (FedProx, no lazy
    combination) from weights 2, then site a's evaluation of weights 2."""
    first, second = _states(model_config)
    train = TrainConfig(epochs=2, batch_size=32, progress=False, bootstrap_samples=0, seed=3)
    a = make_site("a_full", ["ehr", "cxr"], 1)
    b = make_site("b_no_cxr", ["ehr"], 2)
    steps = [
        lambda: train_round(
            a.name,
            load_site_datasets(a, model_config),
            RoundInstructions(model_config, train, 1, lazy_combination=("ehr",)),
            first,
        ),
        lambda: train_round(
            b.name,
            load_site_datasets(b, model_config),
            RoundInstructions(model_config, train, 2, proximal_mu=0.1),
            second,
        ),
        lambda: evaluate_global(load_site_datasets(a, model_config), model_config, second, train),
    ]
    model_cache.clear()
    outputs, models = [], []
    for step in steps:
        if fresh_each_step:
            model_cache.clear()
        torch.manual_seed(1234)  # the same global generator state before each step
        outputs.append(step())
        models.append(next(iter(model_cache._cached.values())))
    model_cache.clear()
    return outputs, models


def _round_view(result) -> tuple:
    metrics = {k: v for k, v in result.metrics.items() if k != wire.TRAIN_SECONDS}
    laziness = result.laziness.to_dict() if result.laziness is not None else None
    return metrics, result.audit, laziness


def test_reused_model_is_bit_identical_to_fresh_ones_for_two_sites_in_sequence(model_config):
    fresh, fresh_models = _sequence(model_config, fresh_each_step=True)
    reused, reused_models = _sequence(model_config, fresh_each_step=False)
    assert len({id(m) for m in reused_models}) == 1  # one model served all three messages
    assert len({id(m) for m in fresh_models}) == 3
    for fresh_result, reused_result in zip(fresh[:2], reused[:2], strict=True):
        assert fresh_result.state.keys() == reused_result.state.keys()
        for key, value in fresh_result.state.items():
            assert torch.equal(value, reused_result.state[key]), key
        assert _round_view(fresh_result) == _round_view(reused_result)
    assert fresh[2] == reused[2]
    # the two rounds really differ (the comparison above is not of two identical rounds)
    assert not torch.equal(fresh[0].state["encoders.encoders.ehr.net.0.weight"],
                           fresh[1].state["encoders.encoders.ehr.net.0.weight"])  # fmt: skip
    assert fresh[0].laziness is not None and fresh[0].laziness.lazy_combination


def test_a_reused_model_is_reset_to_a_fresh_models_state(model_config):
    first, second = _states(model_config)
    model_cache.clear()
    with model_cache.loaded_model(model_config, first) as loaded:
        model = loaded.model
        model.eval()
        model.requires_grad_(False)
        for parameter in model.parameters():
            parameter.grad = torch.ones_like(parameter)
        model.set_laziness(LazinessReport(lazy_combination=("ehr",)))
    with model_cache.loaded_model(model_config, second) as loaded:
        assert loaded.reused and loaded.model is model
        assert model.training and model.laziness is None
        assert all(p.grad is None and p.requires_grad for p in model.parameters())
        for key, value in model.state_dict().items():
            assert torch.equal(value, second[key]), key
    model_cache.clear()


def test_dp_models_and_a_held_model_are_not_shared(model_config):
    first, _ = _states(model_config)
    model_cache.clear()
    dp_config = model_config.model_copy(update={"dp_compatible": True})
    with model_cache.loaded_model(dp_config, OmniFuse(dp_config).state_dict()) as loaded:
        assert not loaded.reused
    with model_cache.loaded_model(model_config, first) as held:
        seen = []
        thread = threading.Thread(
            target=lambda: seen.append(
                model_cache.loaded_model(model_config, first).__enter__().reused
            )
        )
        thread.start()
        thread.join()
        assert held.reused and seen == [False]
    model_cache.clear()

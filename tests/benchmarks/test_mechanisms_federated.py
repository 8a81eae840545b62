"""The mechanism suite's in-process federation: it is the deployed site and server functions,
wired the way the apps wire them, and its scenarios pair their methods on the same data."""

from __future__ import annotations

import numpy as np
import pytest

from omnifuse_model import federation_schema as wire
from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.site_data import SiteDatasets
from omnifuse_model.synthetic import (
    SyntheticFeatureConfig,
    SyntheticModality,
    make_synthetic_features,
)
from simulation.benchmarks.mechanisms_federated_harness import (
    FederatedSite,
    LocalTraining,
    federate,
    global_auroc,
    held_only,
    initial_state,
    site_round,
)

TINY = {"d": 8, "num_blocks": 1, "cra_hidden": [8]}


@pytest.fixture(scope="module")
def setting():
    data = SyntheticFeatureConfig(
        modalities=[SyntheticModality(name="a", dim=6), SyntheticModality(name="b", dim=6)]
    )
    config = OmniFuseConfig.model_validate(
        {"modalities": data.modality_specs(), "task": "binary", **TINY}
    )
    names = config.modality_names

    def site(name: str, held: tuple[str, ...], seed: int, n: int) -> FederatedSite:
        train = make_synthetic_features(data.model_copy(update={"seed": seed}), n)
        val = make_synthetic_features(data.model_copy(update={"seed": seed + 50}), 20)
        return FederatedSite(
            name, held, SiteDatasets(held_only(train, names, held), held_only(val, names, held))
        )

    sites = [site("full", ("a", "b"), 1, 60), site("no_b", ("a",), 2, 90)]
    training = LocalTraining(rounds=1, local_epochs=1, batch_size=16, lr=1e-2)
    return config, sites, training, initial_state(config, 0)


@pytest.fixture(scope="module")
def round_one(setting):
    """Each site's round-1 reply, and one federated round aggregated plain and modality-aware."""
    config, sites, training, initial = setting
    replies = [site_round(s, config, training, initial, seed=3, global_round=1) for s in sites]
    plain = federate(sites, config, training, initial, seed=3, modality_aware=False)
    aware = federate(sites, config, training, initial, seed=3, modality_aware=True)
    return replies, plain, aware


def _is_b_encoder(key: str) -> bool:
    return key.startswith("encoders.encoders.b.")


def test_one_round_is_the_hand_made_fedavg_of_the_two_site_updates(setting, round_one):
    config, _, _, initial = setting
    replies, plain, aware = round_one
    examples = np.array([r.counts[wire.NUM_EXAMPLES] for r in replies], dtype=np.float64)
    present_b = np.array([r.counts[wire.present_key("b")] for r in replies], dtype=np.float64)
    assert examples.tolist() == [60, 90] and present_b[1] == 0  # published counts (k = 5)
    for key in initial:
        stacked = np.stack([r.state[key].astype(np.float64) for r in replies])
        by_examples = np.tensordot(examples / examples.sum(), stacked, axes=1)
        np.testing.assert_allclose(plain[key], by_examples, rtol=1e-5, atol=1e-6, err_msg=key)
        modality = wire.parameter_modality(key, config.modality_names)
        weights = (
            examples
            if modality is None
            else np.array([r.counts[wire.present_key(modality)] for r in replies], dtype=np.float64)
        )
        by_presence = np.tensordot(weights / weights.sum(), stacked, axes=1)
        np.testing.assert_allclose(aware[key], by_presence, rtol=1e-5, atol=1e-6, err_msg=key)


def test_a_site_lacking_b_gives_no_weight_to_the_b_encoder_in_the_modality_aware_average(
    setting, round_one
):
    initial = setting[3]
    replies, plain, aware = round_one
    b_keys = [k for k in initial if _is_b_encoder(k)]
    assert b_keys
    moved = [k for k in b_keys if not np.allclose(replies[1].state[k], replies[0].state[k])]
    assert moved  # the site without b sends b-encoder values that differ from the b site's
    for key in b_keys:
        np.testing.assert_array_equal(aware[key], replies[0].state[key].astype(np.float32))
    assert any(not np.allclose(plain[k], replies[0].state[k]) for k in moved)


def test_federation_is_deterministic_under_its_seed_and_scores_through_evaluate(setting):
    config, sites, training, initial = setting
    two_rounds = training.model_copy(update={"rounds": 2})
    first = federate(sites, config, two_rounds, initial, seed=5)
    again = federate(sites, config, two_rounds, initial, seed=5)
    other = federate(sites, config, two_rounds, initial, seed=6)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert any(not np.array_equal(first[k], other[k]) for k in first)
    test = make_synthetic_features(
        SyntheticFeatureConfig(
            modalities=[SyntheticModality(name="a", dim=6), SyntheticModality(name="b", dim=6)],
            seed=99,
        ),
        80,
    )
    assert 0.0 <= global_auroc(config, first, test) <= 1.0


def test_paired_initial_state_shares_every_parameter_of_the_same_name_and_shape(setting):
    config, _, _, initial = setting
    without = config.model_copy(
        update={"use_forward_imputation": False, "use_backward_imputation": False}
    )
    paired = initial_state(without, seed=123, reference=initial)
    shared = [k for k in paired if k in initial and initial[k].shape == paired[k].shape]
    assert any(_is_b_encoder(k) for k in shared)
    assert all(np.array_equal(paired[k], initial[k]) for k in shared)
    assert set(paired) != set(initial)  # the cascades exist in one configuration only


def test_held_only_zeroes_what_a_site_lacks_and_drops_samples_left_empty(setting):
    config, _, _, _ = setting
    data = make_synthetic_features(
        SyntheticFeatureConfig(
            modalities=[
                SyntheticModality(name="a", dim=6, missing_rate=0.5),
                SyntheticModality(name="b", dim=6),
            ],
        ),
        200,
    )
    only_a = held_only(data, config.modality_names, ("a",))
    assert len(only_a) == int(data.availability[:, 0].sum()) < len(data)
    assert not only_a.availability[:, 1].any() and float(only_a.inputs["b"].abs().sum()) == 0.0
    with pytest.raises(ValueError, match=r"\['c'\]"):
        held_only(data, config.modality_names, ("a", "c"))

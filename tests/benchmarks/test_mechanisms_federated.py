"""The mechanism suite's in-process federation: it is the deployed site and server functions,
wired the way the apps wire them, and its scenarios pair their methods on the same data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rich.progress import Progress

from omnifuse_model import federation_schema as wire
from omnifuse_model.batch import InMemoryMultimodalDataset
from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.site_data import SiteDatasets
from omnifuse_model.synthetic import (
    SyntheticFeatureConfig,
    SyntheticModality,
    make_synthetic_features,
)
from simulation.benchmarks import mechanisms_federated, mechanisms_federated_data
from simulation.benchmarks.mechanisms_federated import (
    CELLS_PER_SEED,
    STATEMENTS,
    FederatedScenarioConfig,
    aggregation_data,
    aggregation_layouts,
    aggregation_seed,
    cell_counter,
    run_scenarios,
    transfer_data,
    transfer_layouts,
    transfer_seed,
)
from simulation.benchmarks.mechanisms_federated_data import (
    HeldOutTest,
    build_sites,
    with_prevalence,
)
from simulation.benchmarks.mechanisms_federated_harness import (
    FederatedSite,
    LocalTraining,
    federate,
    global_auroc,
    held_only,
    initial_state,
    one_thread,
    site_round,
)

TINY = {"d": 8, "num_blocks": 1, "cra_hidden": [8]}
THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """As the scenarios run: tiny models, one intra-op thread (fast on a loaded machine)."""
    with one_thread():
        yield


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


# -- the scenarios ------------------------------------------------------------------------------
TOY = FederatedScenarioConfig(
    model=TINY,
    training=LocalTraining(rounds=1, batch_size=32),
    helpers=2,
    helper_train=40,
    target_train=20,
    aggregation_train=[60, 40, 20, 20],
    test_size=120,
)


def _same(a: InMemoryMultimodalDataset, b: InMemoryMultimodalDataset) -> bool:
    return (
        torch.equal(a.availability, b.availability)
        and torch.equal(a.labels, b.labels)
        and all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs)
    )


def test_a_seed_fixes_every_site_and_test_set_and_another_seed_changes_them():
    data, layouts = transfer_data("linear"), transfer_layouts(TOY)
    first, again, other = (build_sites(data, layouts, s) for s in (4, 4, 5))
    for a, b, c in zip(first, again, other, strict=True):
        assert _same(a.data.train, b.data.train) and _same(a.data.val, b.data.val)
        assert not _same(a.data.train, c.data.train)
    assert first[-1].modalities == ("a",) and not first[-1].data.train.availability[:, 1].any()
    assert _same(HeldOutTest(data, 50, 4, ["a"]).dataset, HeldOutTest(data, 50, 4, ["a"]).dataset)


def test_label_skew_keeps_the_stated_prior_and_names_an_impossible_one(monkeypatch):
    data = aggregation_data()
    skewed = with_prevalence(data, 40, 0.3, seed=1, split="train", site="s")
    assert len(skewed) == 40 and int(skewed.labels.sum()) == 12
    monkeypatch.setattr(mechanisms_federated_data, "POOL_FACTOR", 1)  # too few draws
    with pytest.raises(ValueError, match="site 's': prevalence 0.9 of 40 samples needs 36"):
        with_prevalence(data, 40, 0.9, seed=1, split="train", site="s")
    layouts = aggregation_layouts(TOY, all_hold_b=False)
    assert [s.modalities for s in layouts] == [["a"], ["a"], ["a", "b"], ["a", "b"]]
    assert all(s.modalities == ["a", "b"] for s in aggregation_layouts(TOY, all_hold_b=True))


def test_paired_methods_train_on_the_same_sites_from_the_same_initial_weights(monkeypatch):
    calls = []

    def recording_federate(sites, model_config, training, initial, seed, modality_aware=True):
        calls.append((sites, model_config, initial, modality_aware))
        return dict(initial)

    monkeypatch.setattr(mechanisms_federated, "federate", recording_federate)
    transfer_seed(TOY, 2, "linear", alone=True, advance=lambda label: None)
    (fed_f, config_f, start_f, _), (fed_c, config_c, start_c, _) = calls[:2]
    assert fed_f is fed_c and [s.name for s in fed_f] == ["helper_0", "helper_1", "target"]
    assert config_f.use_forward_imputation and not config_c.use_forward_imputation
    shared = [k for k in start_c if k in start_f and start_c[k].shape == start_f[k].shape]
    assert shared and all(np.array_equal(start_c[k], start_f[k]) for k in shared)
    assert [s.name for s in calls[2][0]] == ["target"] and calls[2][0][0] is fed_f[-1]
    calls.clear()
    aggregation_seed(TOY, 2, all_hold_b=False, advance=lambda label: None)
    (aware_sites, _, aware_start, aware), (plain_sites, _, plain_start, plain) = calls
    assert aware_sites is plain_sites and aware_start is plain_start and aware and not plain


def test_toy_run_states_its_signs_and_the_all_hold_all_control_is_exactly_zero():
    torch.set_num_threads(THREADS)  # as the suite's runner leaves it
    with Progress(disable=True) as progress:
        results = run_scenarios(TOY, [0], progress, quick=True)
        [task] = progress.tasks
        assert task.completed == task.total == CELLS_PER_SEED
    assert [r.name for r in results] == list(STATEMENTS)
    for result in results:
        statement = STATEMENTS[result.name]
        assert (result.expected_sign, result.control) == (
            statement.expected_sign,
            statement.control,
        )
        assert 0.5 < result.details["oracle_auroc"] <= 1.0 and result.n_seeds == 1
    linear, noise, information = results[0], results[2], results[3]
    assert information.method_values == pytest.approx(
        [m - r for m, r in zip(linear.method_values, linear.reference_values, strict=True)]
    )
    assert information.reference_values == pytest.approx(
        [m - r for m, r in zip(noise.method_values, noise.reference_values, strict=True)]
    )
    control = results[-1]
    assert control.paired_diff == 0.0 and control.holds
    assert control.details["max_parameter_difference_per_seed"] == [0.0]
    assert torch.get_num_threads() == THREADS  # restored after the one-thread block


class _Cells:
    """The suite runner's CellProgress, as a recorder."""

    def __init__(self) -> None:
        self.planned, self.done = 0, []

    def plan(self, cells: int) -> None:
        self.planned += cells

    def advance(self, label: str) -> None:
        self.done.append(label)


def test_progress_counts_one_cell_per_federation_on_either_kind_of_handle():
    cells = _Cells()
    advance = cell_counter(cells, 3)
    advance("x seed 0 (fed_f)")
    assert cells.planned == 3 and cells.done == ["x seed 0 (fed_f)"]
    with pytest.raises(TypeError, match="got int"):
        cell_counter(7, 3)
    cell_counter(None, 3)("nothing happens")

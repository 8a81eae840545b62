"""server.aggregation: float32 FedAvg equals the float64 reference; median and trimmed mean
by hand, their invariants, and their per-modality participation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.model import OmniFuse
from server.aggregation import aggregate_states
from simulation.benchmarks.robust_aggregation import float64_reference as modality_aware_average

NAMES = ["ehr", "cxr"]
EHR, CXR, CRA = "encoders.encoders.ehr.w", "encoders.encoders.cxr.w", "forward_cra.w"


def _state(ehr, cxr, cra) -> dict[str, np.ndarray]:
    return {
        EHR: np.asarray(ehr, dtype=np.float32),
        CXR: np.asarray(cxr, dtype=np.float32),
        CRA: np.asarray(cra, dtype=np.float32),
    }


def _counts(n, ehr, cxr) -> dict[str, float]:
    return {"num-examples": n, "num-present.ehr": ehr, "num-present.cxr": cxr}


@pytest.fixture(scope="module")
def model_states():
    """Five perturbed copies of a small OmniFuse state, counts with one site lacking cxr."""
    config = OmniFuseConfig(
        modalities=[
            {"name": "ehr", "kind": "vector", "input_dim": 8},
            {"name": "cxr", "kind": "vector", "input_dim": 8},
        ],
        task="binary",
        d=8,
        cra_hidden=(16, 8),
        num_blocks=2,
    )
    torch.manual_seed(0)
    base = {k: v.numpy() for k, v in OmniFuse(config).state_dict().items()}
    rng = np.random.default_rng(0)
    states = [
        {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in base.items()}
        for _ in range(5)
    ]
    counts = [_counts(100, 90, 40), _counts(300, 300, 0), _counts(7, 7, 5), _counts(50, 20, 50)]
    counts.append(_counts(1000, 999, 1))
    return base, states, counts


@pytest.mark.parametrize(
    ("modality_aware", "uniform"), [(True, False), (False, False), (True, True)]
)
def test_fedavg_equals_the_float64_reference(model_states, modality_aware, uniform):
    base, states, counts = model_states
    expected = modality_aware_average(states, counts, NAMES, base, modality_aware, uniform)
    result = aggregate_states(
        states, counts, NAMES, base, modality_aware=modality_aware, uniform=uniform
    )
    assert list(result) == list(expected)
    for key, value in result.items():
        assert value.dtype == np.float32 and value.shape == expected[key].shape
        np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_fedavg_by_hand_and_a_modality_no_site_held_keeps_its_previous_value():
    states = [_state([1.0], [10.0], [2.0]), _state([3.0], [99.0], [4.0])]
    counts = [_counts(100, 100, 0), _counts(300, 100, 0)]
    previous = _state([0.0], [7.0], [0.0])
    result = aggregate_states(states, counts, NAMES, previous)
    assert result[EHR] == pytest.approx([2.0])
    assert result[CXR] == pytest.approx([7.0])  # no site held cxr
    assert result[CRA] == pytest.approx([(2 * 100 + 4 * 300) / 400])
    with pytest.raises(ValueError, match=CXR):
        aggregate_states(states, counts, NAMES, previous=None)


def test_median_and_trimmed_mean_by_hand():
    # 5 sites; site 3 lacks cxr. ehr column sorted: 1 2 3 4 50; cra: -5 0 1 2 100
    states = [
        _state([1.0, 10.0], [1.0], [0.0]),
        _state([50.0, 20.0], [2.0], [100.0]),
        _state([3.0, 30.0], [4.0], [1.0]),
        _state([2.0, 40.0], [999.0], [-5.0]),
        _state([4.0, 50.0], [8.0], [2.0]),
    ]
    counts = [_counts(10, 10, 10), _counts(10, 10, 10), _counts(10, 10, 10)]
    counts += [_counts(10, 10, 0), _counts(10, 10, 10)]
    median = aggregate_states(states, counts, NAMES, None, rule="median")
    assert median[EHR].tolist() == [3.0, 30.0]
    assert median[CXR].tolist() == [3.0]  # sites 0,1,2,4: 1 2 4 8 -> (2 + 4) / 2
    assert median[CRA].tolist() == [1.0]
    # trim 0.2 of 5 = 1 per end; cxr over 4 sites: floor(0.8) = 0, the plain mean
    trimmed = aggregate_states(states, counts, NAMES, None, rule="trimmed-mean", trim_fraction=0.2)
    assert trimmed[EHR] == pytest.approx([(2 + 3 + 4) / 3, 30.0])
    assert trimmed[CXR] == pytest.approx([(1 + 2 + 4 + 8) / 4])
    assert trimmed[CRA] == pytest.approx([(0 + 1 + 2) / 3])
    # trimming 0.25 of 4 cxr sites drops 1 and 8
    quarter = aggregate_states(states, counts, NAMES, None, rule="trimmed-mean", trim_fraction=0.25)
    assert quarter[CXR] == pytest.approx([3.0])
    # modality_aware=False: the cxr site without cxr takes part: 1 2 4 8 999 -> 4
    plain = aggregate_states(states, counts, NAMES, None, rule="median", modality_aware=False)
    assert plain[CXR].tolist() == [4.0]


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_robust_rules_are_permutation_invariant_and_ignore_claimed_counts(model_states, rule):
    base, states, counts = model_states
    reference = aggregate_states(states, counts, NAMES, base, rule=rule, trim_fraction=0.2)
    for order in itertools.islice(itertools.permutations(range(5)), 1, 120, 17):
        shuffled = aggregate_states(
            [states[i] for i in order],
            [counts[i] for i in order],
            NAMES,
            base,
            rule=rule,
            trim_fraction=0.2,
        )
        for key, value in reference.items():
            np.testing.assert_array_equal(shuffled[key], value, err_msg=f"{key} {order}")
    inflated = [dict(c) for c in counts]
    inflated[2] = {k: v * 1e6 for k, v in inflated[2].items()}  # a site claims a huge count
    claimed = aggregate_states(states, inflated, NAMES, base, rule=rule, trim_fraction=0.2)
    for key, value in reference.items():
        np.testing.assert_array_equal(claimed[key], value, err_msg=key)


@pytest.mark.parametrize("rule", ["fedavg", "median", "trimmed-mean"])
def test_a_single_site_gets_its_own_state_back(model_states, rule):
    base, states, counts = model_states
    result = aggregate_states(states[:1], counts[:1], NAMES, base, rule=rule)
    for key, value in states[0].items():
        np.testing.assert_array_equal(result[key], value, err_msg=key)


def test_median_ignores_one_outlier_site_fedavg_does_not():
    honest = [_state([1.0, -2.0], [0.5], [3.0]) for _ in range(4)]
    outlier = _state([1e6, 1e6], [1e6], [-1e6])
    states = [*honest[:2], outlier, *honest[2:]]
    counts = [_counts(10, 10, 10)] * 5
    median = aggregate_states(states, counts, NAMES, None, rule="median")
    trimmed = aggregate_states(states, counts, NAMES, None, rule="trimmed-mean", trim_fraction=0.2)
    for key, value in honest[0].items():
        np.testing.assert_array_equal(median[key], value, err_msg=key)
        np.testing.assert_allclose(trimmed[key], value, err_msg=key)
    fedavg = aggregate_states(states, counts, NAMES, None)
    assert fedavg[EHR][0] > 1e5


def test_bad_arguments_are_named():
    states = [_state([1.0], [1.0], [1.0])]
    with pytest.raises(ValueError, match="'krum'"):
        aggregate_states(states, [_counts(1, 1, 1)], NAMES, None, rule="krum")
    with pytest.raises(ValueError, match="trim_fraction 0.5"):
        aggregate_states(states, [_counts(1, 1, 1)], NAMES, None, trim_fraction=0.5)
    with pytest.raises(ValueError, match="num-present.cxr"):
        aggregate_states(states, [{"num-examples": 1, "num-present.ehr": 1}], NAMES, None)
    with pytest.raises(ValueError, match="different parameter keys"):
        aggregate_states([*states, {"x": np.zeros(1)}], [_counts(1, 1, 1)] * 2, NAMES, None)
    with pytest.raises(ValueError, match="no site states"):
        aggregate_states([], [], NAMES, None)


@pytest.mark.parametrize("rule", ["fedavg", "median", "trimmed-mean"])
def test_blocks_do_not_change_the_result(model_states, rule, monkeypatch):
    """Keys laid out over many small blocks give the same values as one block per group."""
    base, states, counts = model_states
    whole = aggregate_states(states, counts, NAMES, base, rule=rule)
    monkeypatch.setattr("server.aggregation.BLOCK_COORDINATES", 7)
    split = aggregate_states(states, counts, NAMES, base, rule=rule)
    for key, value in whole.items():
        np.testing.assert_allclose(split[key], value, rtol=1e-6, atol=1e-7, err_msg=key)

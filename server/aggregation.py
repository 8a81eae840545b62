"""Aggregation rules for site states: modality-aware FedAvg and two robust rules, in float32.

Parameters fall into groups: each modality's encoder and DWFuse head (``wire.parameter_modality``)
and the shared rest (CRA cascade, joint head). A group is aggregated only over the sites that
took part in it:

- modality m's group: sites with ``num-present.m > 0``; when none did, the previous global
  value is kept (``modality_aware=False`` puts every parameter in the shared group);
- the shared group: sites with ``num-examples > 0`` (a DP-SGD site whose budget is spent sends
  the global weights back with zero counts and takes no part);
- ``uniform=True`` (central DP): every site takes part in every parameter with equal weight,
  because the Gaussian noise is calibrated to each site's influence being clip_norm / n.

Rules, per group, coordinate-wise over the participating sites:

- ``fedavg``: the mean weighted by ``num-present.m`` (modality groups) or ``num-examples``
  (shared group): exactly the former float64 ``modality_aware_average`` up to float32 rounding.
  The counts are the ones sites publish, rounded up to a multiple of audit-min-count k
  (``omnifuse_model.suppression.published_count``): a weight is off by less than k / n
  relative to the true count n, and a modality a site holds never gets weight 0.
- ``median``: the median (the mean of the two middle values for an even count).
- ``trimmed-mean``: the mean after dropping the ``floor(trim_fraction * n)`` largest and
  smallest values.

The robust rules are unweighted on purpose: sample counts are self-reported, and a weighted
median or trimmed mean would let one site buy the majority by claiming a large count; the
point of these rules is that a single site's influence is bounded whatever it sends.

Layout. The robust rules need every site's value of a coordinate side by side: each group's
keys are laid out as one flat float32 vector per site, in blocks of about
``BLOCK_COORDINATES`` coordinates (one ``[sites, coordinates]`` array per block, so memory
stays bounded at 100 sites), and each block is reduced by one vectorised sort. FedAvg needs no
such copy: it is a float32 multiply-accumulate into each output array, reading every site's
array once. Stacking first (one flat ``[sites, coordinates]`` block per group and one BLAS
call) was measured slower at 10 sites of the paper-size model (47-59 ms against 9-18 ms on
the shared 2-core machine): copying 118 MB into fresh blocks costs more than the sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal, get_args

import numpy as np

from omnifuse_model import federation_schema as wire

AggregationRule = Literal["fedavg", "median", "trimmed-mean"]
RULES: tuple[str, ...] = get_args(AggregationRule)
# 2^18 coordinates x 100 sites x 4 bytes = 100 MB per block (three such arrays while a robust
# rule sorts); the paper-size model's shared group (2.8 M coordinates) is about 11 blocks.
BLOCK_COORDINATES = 1 << 18

Reduction = Callable[[np.ndarray], np.ndarray]  # [sites, coordinates] -> [coordinates]


def aggregate_states(
    states: Sequence[Mapping[str, np.ndarray]],
    counts: Sequence[Mapping[str, float]],
    modality_names: Sequence[str],
    previous: Mapping[str, np.ndarray] | None,
    *,
    rule: AggregationRule = "fedavg",
    modality_aware: bool = True,
    uniform: bool = False,
    trim_fraction: float = 0.1,
) -> dict[str, np.ndarray]:
    """Aggregate site states (same keys and shapes) into float32 arrays with the same keys.

    Args:
        states: one state per site (float arrays).
        counts: per site ``{"num-examples": n, "num-present.<m>": k, ...}``.
        modality_names: the model's modalities (parameter ownership, see module docstring).
        previous: the global weights sent this round; kept for a group no site took part in.
        rule: ``fedavg``, ``median`` or ``trimmed-mean``.
        modality_aware: aggregate each modality's parameters over the sites that held it.
        uniform: every site in every parameter with equal weight (central DP).
        trim_fraction: share of sites dropped at each end per coordinate (trimmed-mean).
    """
    _check_arguments(states, counts, rule, trim_fraction)
    keys = list(states[0])
    names = list(modality_names)
    aware = modality_aware and not uniform
    groups: dict[str | None, list[str]] = {}
    for key in keys:
        groups.setdefault(wire.parameter_modality(key, names) if aware else None, []).append(key)
    result: dict[str, np.ndarray] = {}
    for modality, group_keys in groups.items():
        weights = _group_weights(counts, modality, uniform)
        sites = np.flatnonzero(weights > 0)
        if sites.size == 0:
            result.update(_previous_values(group_keys, previous))
            continue
        participants = [states[i] for i in sites]
        if rule == "fedavg":
            result.update(_weighted_mean(participants, group_keys, weights[sites]))
            continue
        reduction = _robust_reduction(rule, sites.size, trim_fraction)
        result.update(_reduce_group(participants, group_keys, reduction))
    return {key: result[key] for key in keys}


def fedavg_weights(
    counts: Sequence[Mapping[str, float]],
    groups: Mapping[str, str | None],
    *,
    modality_aware: bool = True,
    uniform: bool = False,
) -> dict[str, np.ndarray | None]:
    """Per group, each site's FedAvg weight as :func:`aggregate_states` uses it: float32,
    normalised to sum to 1 over the sites taking part (0 for the others); None when no site
    takes part (the group keeps its previous value).

    ``groups`` maps a group's name to its modality (None: the shared parameters)."""
    aware = modality_aware and not uniform
    result: dict[str, np.ndarray | None] = {}
    for name, modality in groups.items():
        weights = _group_weights(counts, modality if aware else None, uniform)
        sites = np.flatnonzero(weights > 0)
        if sites.size == 0:
            result[name] = None
            continue
        normalised = np.zeros(len(counts), np.float32)
        normalised[sites] = (weights[sites] / weights[sites].sum()).astype(np.float32)
        result[name] = normalised
    return result


def _check_arguments(
    states: Sequence[Mapping[str, np.ndarray]],
    counts: Sequence[Mapping[str, float]],
    rule: str,
    trim_fraction: float,
) -> None:
    if not states:
        raise ValueError("no site states to aggregate")
    if len(counts) != len(states):
        raise ValueError(f"{len(states)} site states but {len(counts)} count records")
    if rule not in RULES:
        raise ValueError(f"aggregation rule {rule!r}: expected one of {', '.join(RULES)}")
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction {trim_fraction}: expected 0 <= trim_fraction < 0.5")
    keys = set(states[0])
    for index, state in enumerate(states[1:], start=1):
        if set(state) != keys:
            raise ValueError(f"site state {index} has different parameter keys than site 0")


def _group_weights(
    counts: Sequence[Mapping[str, float]], modality: str | None, uniform: bool
) -> np.ndarray:
    """Per-site weight of a group (float64); 0 = the site takes no part in it."""
    if uniform:
        return np.ones(len(counts))
    key = wire.NUM_EXAMPLES if modality is None else wire.present_key(modality)
    weights = []
    for index, record in enumerate(counts):
        if key not in record:
            raise ValueError(f"site {index}: counts lack '{key}' (got {sorted(record)})")
        value = float(record[key])
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"site {index}: count '{key}' = {value}, expected a finite n >= 0")
        weights.append(value)
    return np.asarray(weights, dtype=np.float64)


def _previous_values(
    keys: list[str], previous: Mapping[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    if previous is None:
        raise ValueError(f"parameter '{keys[0]}': no site trained it and no previous value")
    return {key: np.asarray(previous[key], dtype=np.float32) for key in keys}


def _weighted_mean(
    states: list[Mapping[str, np.ndarray]], keys: list[str], weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Per key, sum_i w_i * state_i[key] in float32 with w normalised to sum to 1."""
    normalised = (weights / weights.sum()).astype(np.float32)
    result: dict[str, np.ndarray] = {}
    for key in keys:
        total = np.multiply(states[0][key], normalised[0], dtype=np.float32)
        term = np.empty_like(total)
        for state, weight in zip(states[1:], normalised[1:], strict=True):
            np.multiply(state[key], weight, out=term, dtype=np.float32)
            total += term
        result[key] = total
    return result


def _robust_reduction(rule: str, sites: int, trim_fraction: float) -> Reduction:
    """The coordinate-wise rule over the participating sites' ``[sites, coordinates]`` block."""
    trim = math.floor(trim_fraction * sites) if rule == "trimmed-mean" else 0
    if rule == "median":
        middle = slice((sites - 1) // 2, sites // 2 + 1)  # one value, or the two middle ones
    else:
        middle = slice(trim, sites - trim)
    count = np.float32(middle.stop - middle.start)

    def robust(block: np.ndarray) -> np.ndarray:
        if sites == 1:
            return block[0].copy()
        # numpy's vectorised sort runs along the last, contiguous axis: sort [coords, sites]
        ordered = np.sort(np.ascontiguousarray(block.T), axis=1)
        return ordered[:, middle].sum(axis=1, dtype=np.float32) / count

    return robust


def _reduce_group(
    states: list[Mapping[str, np.ndarray]], keys: list[str], reduction: Reduction
) -> dict[str, np.ndarray]:
    """Apply a robust ``reduction`` block by block to the group's keys as flat vectors."""
    result: dict[str, np.ndarray] = {}
    for block_keys in _blocks(keys, states[0]):
        sizes = [int(np.asarray(states[0][k]).size) for k in block_keys]
        block = np.empty((len(states), sum(sizes)), dtype=np.float32)
        for row, state in enumerate(states):
            np.concatenate([np.asarray(state[k]).reshape(-1) for k in block_keys], out=block[row])
        reduced = reduction(block)
        offset = 0
        for key, size in zip(block_keys, sizes, strict=True):
            shape = np.asarray(states[0][key]).shape
            result[key] = reduced[offset : offset + size].reshape(shape)
            offset += size
    return result


def _blocks(keys: list[str], state: Mapping[str, np.ndarray]) -> Iterator[list[str]]:
    """Consecutive keys with up to BLOCK_COORDINATES coordinates together (a larger key alone)."""
    block: list[str] = []
    size = 0
    for key in keys:
        key_size = int(np.asarray(state[key]).size)
        if block and size + key_size > BLOCK_COORDINATES:
            yield block
            block, size = [], 0
        block.append(key)
        size += key_size
    if block:
        yield block

"""Small-count suppression of a site's audit aggregates that the published counts cannot undo.

A site reports, per round, how many training samples hold exactly each modality combination
(the audit's ``availability_counts``; 2^M - 1 cells). Suppressing only the small cells
(0 < c < threshold) is not enough: a site with 9 samples that reports ehr+cxr = 6 and every
other cell 0 gives the suppressed cell away (9 - 6 = 3). Two measures close that:

- *rounded margins*: every count a site publishes besides the audit cells (``num-examples``
  and ``num-present.m`` of its train and evaluate replies, the sizes it declares at
  registration, the audit's ``num_examples``, the TLA-sum counts) goes out as
  ``published_count(count, threshold)``: 0 for 0, else rounded *up* to a multiple of the
  threshold. Up, so that a held modality never gets weight 0 in modality-aware FedAvg and
  published counts stay ordered as the true ones are (num-present.m <= num-examples, this
  round <= declared). A multiple of the threshold, so that each published margin P > 0
  leaves the open interval (P - threshold, P] for the true one: as wide as a suppressed cell
  can be (1 .. threshold - 1), so no margin pins a small cell down. In the 9-sample example
  (threshold 5) the server sees num-examples 10, num-present.ehr 10, num-present.cxr 10 and
  num-present.rep 0: ehr-only is anything in 1..4.
- *complementary suppression* of the exact cells: further cells, smallest non-zero first
  (ties in combination order), until no suppressed cell is uniquely determined by what the
  server sees.

What the server sees (the attacker model). The published cells; that a suppressed cell is a
positive integer (zero cells are published as 0); and the published margins: the total N =
sum of all cells and, per modality m, the cells whose combination holds m. A rounded margin
P says ``P - threshold < margin <= P`` (exactly 0 when P = 0); ``rounded=False`` models exact
margins (as sent before rounding; kept to show what rounding buys). A cell is *determined*
when every integer table consistent with all of this gives it the same value; this is decided
exactly with two small integer programs per suppressed cell (scipy's HiGHS ``milp``: the
least and the greatest feasible value).

What is protected: every suppressed cell that the published counts do not determine has at
least two feasible values. What is not:

- cells the margins determine on their own ("exposed"): with exact margins and M = 2 that is
  every cell, with M = 3 a margin of 0 or of N pins cells down (the 9-sample example). With
  rounded margins a cell can still be exposed in rare small tables, because suppressed cells
  are known to be >= 1 and zero cells are published (threshold 3: with M = 2 only the table
  1 / 1 / 1, whose total 3 is published as 3; with M = 3 about 2 % of random small tables
  with a small cell; threshold 5: none in the tests' samples). Such cells are still reported
  as suppressed, and the site logs them.
- the width of the feasible range: a suppressed cell may be known to be 1 or 2; uniqueness is
  the guarantee, not a protection interval.
- an attacker who also knows this greedy rule may exclude tables it would not have produced.
- zero cells are published (exactly, and a margin of 0 stays 0): that no sample holds a
  combination, or a modality, is not hidden.
- differencing across rounds: a site's training data, hence its counts, their rounding and
  their suppression pattern, are the same every round; a site whose data changes between
  rounds publishes two tables whose difference is not protected.
- the TLA-sum counts (samples holding every modality of a combination in the mining pass
  over the training set) are rounded the same way and are part of the check when the site
  sends them (a count left out says it is below the threshold); counts that are not the
  training table's superset sums (a mining pass over other samples) are left out of it.

Statistics computed over fewer than ``threshold`` samples (validation AUROC/AUPRC, mean
DWFuse weights, imputation errors, TLA scores, the training loss) are withheld as well
(``statistic_or_none``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp


@dataclass(frozen=True)
class ProtectedCounts:
    """The counts as reported (None = suppressed) and why each suppressed cell is."""

    reported: dict[str, int | None]
    primary: tuple[str, ...]  # 0 < count < threshold
    complementary: tuple[str, ...]  # suppressed so that no primary cell can be derived
    exposed: tuple[str, ...]  # primary cells the published margins determine regardless


def statistic_or_none(value: float | None, samples: int, threshold: int) -> float | None:
    """A statistic computed over ``samples`` samples, or None when they are too few."""
    return None if samples < threshold else value


def published_count(count: int, threshold: int) -> int:
    """The value a site publishes for a count: 0 for 0, else ``count`` rounded up to a
    multiple of ``threshold`` (1 -> threshold, threshold -> threshold, threshold + 1 -> 2 *
    threshold).

    Up, not to the nearest: a modality some samples hold never gets weight 0 in
    modality-aware FedAvg, and the order of counts is kept (a count <= another publishes
    <= the other's publication), so the server's checks num-present.m <= num-examples and
    "at most the declared size" hold for honest sites. A multiple of the threshold: the
    published value P leaves (P - threshold, P] open, as wide as a suppressed cell (1 ..
    threshold - 1) can be, so a margin minus the published cells never isolates one.
    """
    if type(count) is not int or count < 0:
        raise ValueError(f"published_count: count {count!r}: expected an integer >= 0")
    if type(threshold) is not int or threshold < 1:
        raise ValueError(f"published_count: threshold {threshold!r}: expected an integer >= 1")
    return -(-count // threshold) * threshold


def margin_interval(true_value: int, threshold: int, rounded: bool = True) -> tuple[int, int]:
    """What the server knows of a margin from its published value: [low, high] (integers)."""
    if not rounded:
        return true_value, true_value
    published = published_count(true_value, threshold)
    return (0, 0) if published == 0 else (published - threshold + 1, published)


def tla_intervals(
    tla_counts: Mapping[str, int], labels: Sequence[str], threshold: int
) -> dict[str, tuple[int, int]]:
    """What the server knows, from a site's TLA sums, of the samples holding every modality
    of each combination: the published interval where the count is sent (>= threshold,
    rounded), else [0, threshold - 1] (``federation_schema.encode_tla_sums`` leaves it out)."""
    return {
        label: margin_interval(tla_counts[label], threshold)
        if tla_counts.get(label, 0) >= threshold
        else (0, threshold - 1)
        for label in labels
    }


def margin_matrix(labels: Sequence[str], modality_names: Sequence[str]) -> np.ndarray:
    """Rows: the total, then one row per modality (1 where the combination holds it)."""
    members = [set(label.split("+")) for label in labels]
    unknown = set().union(*members) - set(modality_names)
    if unknown:
        raise ValueError(
            f"combination labels name modalities {sorted(unknown)} not in {list(modality_names)}"
        )
    rows = [[1.0] * len(labels)]
    rows += [[1.0 if name in held else 0.0 for held in members] for name in modality_names]
    return np.asarray(rows)


def determined_cells(
    counts: Mapping[str, int],
    suppressed: set[str],
    modality_names: Sequence[str],
    threshold: int,
    public_margins: bool = True,
    rounded: bool = True,
    tla_counts: Mapping[str, int] | None = None,
    certificates: bool = True,
) -> set[str]:
    """The suppressed cells that take one value in every table the server could infer.

    The server knows the published cells, that suppressed cells are integers in [1, N_max],
    the total and, with ``public_margins``, every ``num-present`` margin: each exactly, or
    (``rounded``) only the interval its ``published_count`` leaves (``margin_interval``).
    With ``tla_counts`` (the site's mining counts, sent in its TLA sums: samples holding
    every modality of a combination) it also knows their ``tla_intervals``.

    A cell is not determined when a table next to the true one is feasible with another
    value of it (``_movable_cells``: one cell +-1, or one unit moved between two cells): an
    exact certificate, found without a solver for most cells. The others get the two
    integer programs (``certificates=False``: every cell does, as a check).
    """
    labels = list(counts)
    hidden = [label for label in labels if label in suppressed]
    if not hidden:
        return set()
    matrix = margin_matrix(labels, modality_names)
    if not public_margins:
        matrix = matrix[:1]
    values = np.asarray([counts[label] for label in labels], dtype=float)
    intervals = [margin_interval(int(v), threshold, rounded) for v in matrix @ values]
    if tla_counts is not None:
        members = [set(label.split("+")) for label in labels]
        tla = tla_intervals(tla_counts, labels, threshold)
        rows = [[1.0 if set(key.split("+")) <= held else 0.0 for held in members] for key in tla]
        matrix = np.vstack([matrix, np.asarray(rows)])
        intervals += list(tla.values())
    columns = [labels.index(label) for label in hidden]
    shown = [i for i in range(len(labels)) if labels[i] not in suppressed]
    known = matrix[:, shown] @ values[shown]
    low = np.asarray([lo for lo, _ in intervals], dtype=float) - known
    high = np.asarray([hi for _, hi in intervals], dtype=float) - known
    upper = max(1.0, intervals[0][1])
    movable = (
        _movable_cells(matrix[:, columns], values[columns], low, high, upper)
        if certificates
        else np.zeros(len(hidden), dtype=bool)
    )
    constraint = LinearConstraint(matrix[:, columns], low, high)
    bounds = Bounds(np.ones(len(hidden)), np.full(len(hidden), upper))
    return {
        label
        for position, label in enumerate(hidden)
        if not movable[position]  # else another feasible table gives it another value
        and _single_value(position, label, counts[label], len(hidden), bounds, constraint)
    }


def _single_value(
    position: int,
    label: str,
    value: int,
    size: int,
    bounds: Bounds,
    constraint: LinearConstraint,
) -> bool:
    """Whether hidden cell ``position`` has ``value`` as its least and its greatest feasible
    value (two integer programs; the second only when the first gives ``value``)."""
    for sign in (1.0, -1.0):
        objective = np.zeros(size)
        objective[position] = sign
        solution = milp(objective, integrality=np.ones(size), bounds=bounds, constraints=constraint)
        if not solution.success:
            raise RuntimeError(f"suppression check of '{label}' failed: {solution.message}")
        if round(float(solution.x[position])) != value:
            return False  # another value is feasible
    return True


def _movable_cells(
    matrix: np.ndarray, true: np.ndarray, low: np.ndarray, high: np.ndarray, upper: float
) -> np.ndarray:
    """Per hidden cell: whether a feasible integer table other than the true one (which is
    feasible) gives it another value, among the tables one step away: the cell +-1, or
    one unit moved between it and another hidden cell. A True is a proof (both tables are
    feasible integer tables); a False decides nothing (the integer programs do)."""
    size = len(true)
    eye = np.eye(size)
    steps = [eye, -eye]  # row p: cell p +-1
    for other in range(size):  # row p: cell p +1 and cell `other` -1, and the reverse
        moved = eye.copy()
        moved[:, other] -= 1.0
        moved[other] = 0.0  # no move: row `other` would change nothing
        steps += [moved, -moved]
    step = np.stack(steps)  # [moves, cells, hidden]; a non-zero row p changes cell p
    tables = true[None, None, :] + step
    sums = tables @ matrix.T  # [moves, cells, constraints]
    feasible = (
        step.any(-1)
        & (tables >= 1).all(-1)
        & (tables <= upper).all(-1)
        & (sums >= low).all(-1)
        & (sums <= high).all(-1)
    )
    return feasible.any(axis=0)


def protect_combination_counts(
    counts: Mapping[str, int],
    modality_names: Sequence[str],
    threshold: int,
    public_margins: bool = True,
    rounded: bool = True,
    tla_counts: Mapping[str, int] | None = None,
) -> ProtectedCounts:
    """Suppress small cells and enough further cells that none of them can be derived.

    Args:
        counts: samples per exact modality combination (label -> count, every combination).
        modality_names: the model's modalities (labels are '+'-joined names).
        threshold: cells with 0 < count < threshold are suppressed (primary suppression).
        public_margins: the server also knows every ``num-present`` margin (as deployed).
        rounded: the margins are published as ``published_count`` (as deployed), not exactly.
        tla_counts: the mining counts whose rounded values the site's TLA sums publish
            (None: it sends no TLA sums). Used when they are the table's superset sums (a
            mining pass over the training set), else left out of the check.
    """
    if threshold < 1:
        raise ValueError(f"suppression threshold {threshold}: expected an integer >= 1")
    negative = {k: v for k, v in counts.items() if v < 0}
    if negative:
        raise ValueError(f"combination counts must be >= 0, got {negative}")
    margin_matrix(list(counts), modality_names)  # labels name known modalities, else raise
    primary = [label for label, count in counts.items() if 0 < count < threshold]
    if not primary:  # nothing to hide: no cell is suppressed, none can be exposed
        return ProtectedCounts(reported=dict(counts), primary=(), complementary=(), exposed=())
    if tla_counts is not None and not _mined_from(counts, tla_counts):
        tla_counts = None  # not the training table's margins: they cannot be modelled here
    check = {
        "threshold": threshold,
        "public_margins": public_margins,
        "rounded": rounded,
        "tla_counts": tla_counts,
    }
    everything = {label for label, count in counts.items() if count > 0}
    by_margins = determined_cells(counts, everything, modality_names, **check)
    suppressed = set(primary)
    candidates = sorted(
        (label for label in everything - suppressed - by_margins),
        key=lambda label: (counts[label], list(counts).index(label)),
    )
    complementary: list[str] = []
    while candidates:
        derivable = determined_cells(counts, suppressed, modality_names, **check) - by_margins
        if not derivable:
            break
        complementary.append(candidates.pop(0))
        suppressed.add(complementary[-1])
    return ProtectedCounts(
        reported={k: (None if k in suppressed else v) for k, v in counts.items()},
        primary=tuple(primary),
        complementary=tuple(complementary),
        exposed=tuple(label for label in primary if label in by_margins),
    )


def _mined_from(counts: Mapping[str, int], tla_counts: Mapping[str, int]) -> bool:
    """Whether ``tla_counts`` are this table's superset sums (samples holding every modality
    of each combination), as one mining pass over the training set counts them."""
    members = {label: set(label.split("+")) for label in counts}
    return all(
        tla_counts.get(key, 0)
        == sum(count for label, count in counts.items() if members[key] <= members[label])
        for key in counts
    )

"""Small-count suppression of a site's audit aggregates that the published totals cannot undo.

A site reports, per round, how many training samples hold exactly each modality combination
(the audit's ``availability_counts``; 2^M - 1 cells). Suppressing only the small cells
(0 < c < threshold) is not enough: a site with 9 samples that reports ehr+cxr = 6 and every
other cell 0 gives the suppressed cell away (9 - 6 = 3). This module adds *complementary*
suppression: further cells, smallest non-zero first (ties in combination order), until no
suppressed cell is uniquely determined by what the server sees.

What the server sees (the attacker model). The published cells; that a suppressed cell is a
positive integer (zero cells are published as 0); and, because modality-aware weighting needs
them, the exact margins every site sends unsuppressed in its MetricRecord: ``num-examples``
N = sum of all cells and ``num-present.m`` = sum of the cells whose combination holds m, for
every modality m. A cell is *determined* when every integer table consistent with all of this
gives it the same value; this is decided exactly with two small integer programs per
suppressed cell (scipy's HiGHS ``milp``: the least and the greatest feasible value).

What is protected: every suppressed cell that the margins do not determine has at least two
feasible values, whatever else is published. What is not:

- cells the margins determine on their own ("exposed"). With M modalities there are 2^M - 1
  cells and M + 1 margins, so with M = 2 *every* cell is a function of the margins
  (ehr-only = N - n_cxr, cxr-only = N - n_ehr, ehr+cxr = n_ehr + n_cxr - N), and with M = 3 a
  margin of 0 or of N pins cells down (the 9-sample example: n_cxr = 6 and no rep give
  ehr+cxr = 6 and ehr = 3 whatever the audit hides). Exposed cells are still reported as
  suppressed, and the site logs them; hiding them would need coarsened or secret weighting
  counts (rounded counts, or secure aggregation of the weighted sums), which changes what the
  server averages with and is not done here.
- the width of the feasible range: a suppressed cell may be known to be 1 or 2; uniqueness is
  the guarantee, not a protection interval.
- an attacker who also knows this greedy rule may exclude tables it would not have produced.
- zero cells are published: that no sample holds a combination is not hidden.
- differencing across rounds: a site's training data, hence its counts and their
  suppression pattern, are the same every round; a site whose data changes between rounds
  publishes two tables whose difference is not protected.

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
    public_margins: bool = True,
    total_known: bool = True,
) -> set[str]:
    """The suppressed cells that take one value in every table the server could infer.

    The server knows the published cells, that suppressed cells are integers in [1, N], the
    total N (``total_known``) and, with ``public_margins``, every ``num-present`` margin.
    """
    labels = list(counts)
    hidden = [label for label in labels if label in suppressed]
    if not hidden:
        return set()
    matrix = margin_matrix(labels, modality_names)
    if not public_margins:
        matrix = matrix[:1] if total_known else matrix[:0]
    if matrix.shape[0] == 0:
        return set()
    values = np.asarray([counts[label] for label in labels], dtype=float)
    columns = [labels.index(label) for label in hidden]
    shown = [i for i in range(len(labels)) if labels[i] not in suppressed]
    rhs = matrix @ values - matrix[:, shown] @ values[shown]
    free = _linearly_free(matrix[:, columns])
    constraint = LinearConstraint(matrix[:, columns], rhs, rhs)
    bounds = Bounds(np.ones(len(hidden)), np.full(len(hidden), max(1.0, values.sum())))
    determined = set()
    for position, label in enumerate(hidden):
        if not free[position]:
            determined.add(label)  # the equations alone fix it
            continue
        value = counts[label]
        for sign in (1.0, -1.0):  # the least, then the greatest feasible value
            objective = np.zeros(len(hidden))
            objective[position] = sign
            solution = milp(
                objective, integrality=np.ones(len(hidden)), bounds=bounds, constraints=constraint
            )
            if not solution.success:
                raise RuntimeError(f"suppression check of '{label}' failed: {solution.message}")
            if round(float(solution.x[position])) != value:
                break  # another value is feasible
        else:
            determined.add(label)
    return determined


def _linearly_free(matrix: np.ndarray) -> np.ndarray:
    """Per column: whether some solution of matrix @ z = 0 moves it (the null space touches it)."""
    _, singular, rows = np.linalg.svd(matrix)
    rank = int(np.sum(singular > 1e-9))
    null_space = rows[rank:]
    return (
        np.abs(null_space).sum(axis=0) > 1e-9
        if null_space.size
        else np.zeros(matrix.shape[1], bool)
    )


def protect_combination_counts(
    counts: Mapping[str, int],
    modality_names: Sequence[str],
    threshold: int,
    public_margins: bool = True,
) -> ProtectedCounts:
    """Suppress small cells and enough further cells that none of them can be derived.

    Args:
        counts: samples per exact modality combination (label -> count, every combination).
        modality_names: the model's modalities (labels are '+'-joined names).
        threshold: cells with 0 < count < threshold are suppressed (primary suppression).
        public_margins: the server also knows every ``num-present`` margin (as deployed).
    """
    if threshold < 1:
        raise ValueError(f"suppression threshold {threshold}: expected an integer >= 1")
    negative = {k: v for k, v in counts.items() if v < 0}
    if negative:
        raise ValueError(f"combination counts must be >= 0, got {negative}")
    total = sum(counts.values())
    total_known = not 0 < total < threshold  # the audit suppresses a small total too
    primary = [label for label, count in counts.items() if 0 < count < threshold]
    check = {"public_margins": public_margins, "total_known": total_known}
    everything = {label for label, count in counts.items() if count > 0}
    by_margins = determined_cells(counts, everything, modality_names, **check)
    suppressed = set(primary)
    candidates = sorted(
        (label for label in everything - suppressed - by_margins),
        key=lambda label: (counts[label], list(counts).index(label)),
    )
    complementary: list[str] = []
    while primary and candidates:
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

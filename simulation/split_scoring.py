"""Whether a site's validation or test split can be scored at all: AUROC needs positives and
negatives, and the audit suppresses counts below its threshold, so a split with fewer stays
(or, for in-hospital mortality, fewer of either class) than that threshold yields no number.
`omnifuse partition` warns about such splits, or with ``--strict`` refuses them."""

from __future__ import annotations


class SmallSplitError(ValueError):
    """Splits too small to score (``partition --strict``); one line naming each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(
            "partition --strict: splits too small to score: "
            + "; ".join(problems)
            + ". Use fewer sites, more data, or a smaller --min-count."
        )
        self.problems = problems


def split_problems(
    rows: list[list[str]], header: list[str], task: str, min_count: int
) -> str | None:
    """Why a split cannot be scored: fewer than ``min_count`` stays, or (mortality) fewer
    than ``min_count`` positives or negatives. None when it can."""
    if len(rows) < min_count:
        return f"{len(rows)} stays (fewer than {min_count})"
    if task != "in-hospital-mortality":
        return None
    label = header.index("y_true")
    positives = sum(int(float(r[label])) for r in rows)
    negatives = len(rows) - positives
    if min(positives, negatives) < min_count:
        return (
            f"{positives} positive and {negatives} negative of {len(rows)} stays "
            f"(fewer than {min_count} of a class)"
        )
    return None


def small_splits(
    named_rows: list[tuple[str, str, list[list[str]]]], header: list[str], task: str, min_count: int
) -> list[str]:
    """``(site, split, listfile rows)`` -> one line per split too small to score."""
    found = []
    for site, split, rows in named_rows:
        problem = split_problems(rows, header, task, min_count)
        if problem:
            found.append(f"site '{site}' {split} split: {problem}")
    return found

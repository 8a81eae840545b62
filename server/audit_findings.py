"""What the audit report reads out of the audit rows, beyond copying them.

- ``lazy_call``: the lazy combination of one (site, round) with its margin over the
  runner-up and a near-tie flag (``TIE_MARGIN``, relative to the lazy combination's score).
- ``observed_modalities``: which modalities a site holds, so that every weight and error is
  labelled "observed" or "imputed".
- ``Threshold``: the one suppression threshold the report applies: the sites' own, raised
  (never lowered) by ``--min-count``.
- cross-site views: lazy-combination frequency per site, modality-weight profile next to
  availability.
- ``failures``: every failed or rejected reply per round (metrics.json, else the audit rows).

All of it works on plain values and returns JSON-safe dicts (None = missing or suppressed).
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

from omnifuse_model.federation_schema import AuditRow, finite_or_none

# A lazy combination whose TLA score beats the runner-up's by less than 5% of its own score is
# a near tie. The score is a mean cross-entropy over the samples holding the combination; the
# per-sample spread of a cross-entropy is of the order of its mean, so its standard error is
# about score / sqrt(n): 10% at n = 100, 5% at n = 400. Margins under 5% are within noise at
# every site size this project sees (docs/AUDIT.md). Sites keep sums only (no per-sample
# distances), so a bootstrap at the site is not available.
TIE_MARGIN = 0.05


def lazy_call(row: AuditRow, tie_margin: float = TIE_MARGIN) -> dict:
    """The lazy combination of one row with its runner-up, margin and near-tie flag.

    Only published TLA scores are compared: ``unpublished`` counts scores suppressed at the
    site (one of them may be the true runner-up, so the margin is then an upper bound).
    ``near_tie`` is None when there is nothing to compare with.
    """
    published = {k: v for k, v in row.tla_scores.items() if finite_or_none(v) is not None}
    call = {
        "lazy": row.lazy_combination,
        "score": published.get(row.lazy_combination or ""),
        "runner_up": None,
        "runner_up_score": None,
        "margin": None,
        "relative_margin": None,
        "near_tie": None,
        "unpublished": sum(1 for v in row.tla_scores.values() if v is None),
    }
    others = sorted(
        ((v, k) for k, v in published.items() if k != row.lazy_combination), reverse=True
    )
    if call["score"] is None or not others:
        return call
    runner_score, runner = others[0]
    margin = call["score"] - runner_score
    relative = margin / abs(call["score"]) if call["score"] else None
    call.update(
        runner_up=runner,
        runner_up_score=runner_score,
        margin=margin,
        relative_margin=relative,
        near_tie=relative is None or relative < tie_margin,
    )
    return call


def observed_modalities(row: AuditRow, modalities: list[str]) -> tuple[list[str] | None, str]:
    """(modalities the site holds, where that comes from).

    The site's own list when the row has one; else derived from its availability counts (a
    suppressed cell is 1..k-1 samples, so it counts as held); else unknown (None).
    """
    if row.observed_modalities is not None:
        return [m for m in modalities if m in row.observed_modalities], "site"
    if row.availability_counts:
        held = {
            name
            for label, count in row.availability_counts.items()
            if count != 0
            for name in label.split("+")
        }
        return [m for m in modalities if m in held], "availability counts"
    return None, "unknown"


@dataclass(frozen=True)
class Threshold:
    """The suppression threshold of the report: max(the sites' thresholds, --min-count)."""

    site: int
    requested: int | None

    @property
    def used(self) -> int:
        return max(self.site, self.requested or 0)

    def note(self) -> str | None:
        """Why the requested threshold was not used, if it was not."""
        if self.requested is None or self.requested >= self.site:
            return None
        return (
            f"--min-count {self.requested} is below the threshold the sites applied "
            f"({self.site}): cells suppressed at a site stay suppressed, so {self.site} is used."
        )

    def count(self, value: int | None) -> int | None:
        """A count as the report shows it: None (suppressed) when 0 < value < used."""
        return None if value is not None and 0 < value < self.used else value


def published_counts(row: AuditRow, threshold: Threshold) -> dict:
    """A row's availability as the report shows it: counts below ``threshold.used``
    suppressed; and when that hides a cell the site itself published (a raised threshold),
    the row's total is hidden too (``total_hidden``), or the hidden cell would follow by
    subtracting the shown cells from it."""
    counts = {k: threshold.count(v) for k, v in row.availability_counts.items()}
    newly_hidden = any(
        v is None and row.availability_counts[k] is not None for k, v in counts.items()
    )
    return {
        "round": row.round,
        "num_examples": None if newly_hidden else threshold.count(row.num_examples),
        "total_hidden": newly_hidden,
        "counts": counts,
    }


def site_threshold(rows: list[AuditRow], run_threshold: int) -> int:
    """The largest threshold any site applied (rows say so; older rows: the run's)."""
    return max(row.min_count or run_threshold for row in rows)


def modality_presence(counts: dict[str, int | None], modality: str) -> tuple[int, bool]:
    """(samples holding ``modality`` summed over published cells, whether a suppressed cell
    holding it makes that a lower bound)."""
    cells = [c for label, c in counts.items() if modality in label.split("+")]
    return sum(c for c in cells if c is not None), any(c is None for c in cells)


def lazy_frequency(calls: list[dict | None]) -> dict:
    """One site's lazy combinations over its rounds: counts, the most frequent, its share."""
    reported = [c for c in calls if c is not None and c["lazy"] is not None]
    counts = Counter(c["lazy"] for c in reported)
    mode, mode_count = counts.most_common(1)[0] if counts else (None, 0)
    return {
        "counts": dict(counts),
        "rounds": len(reported),
        "most_frequent": mode,
        "share": mode_count / len(reported) if reported else None,
        "near_ties": sum(1 for c in reported if c["near_tie"]),
    }


def weight_profile(
    rows: dict[int, AuditRow], modalities: list[str], threshold: Threshold
) -> dict[str, dict]:
    """Per modality at one site: mean DWFuse weight over its rounds, observed or imputed,
    and the share of training samples (last round) that hold it."""
    last = rows[max(rows)]
    held, source = observed_modalities(last, modalities)
    published = published_counts(last, threshold)
    total = published["num_examples"]
    profile = {}
    for modality in modalities:
        values = [
            v
            for r in rows.values()
            if (v := finite_or_none(r.mean_dwfuse_weight.get(modality))) is not None
        ]
        present, lower_bound = modality_presence(published["counts"], modality)
        profile[modality] = {
            "mean_weight": statistics.fmean(values) if values else None,
            "observed": None if held is None else modality in held,
            "observed_source": source,
            "present": present if last.availability_counts else None,
            "present_lower_bound": lower_bound,
            "share": present / total if total and last.availability_counts else None,
        }
    return profile


def failures(history: dict[int, dict] | None, rows: list[AuditRow]) -> list[dict]:
    """Every failed or rejected reply: round, stage, participant, status, reason.

    From metrics.json (training and evaluation replies) when present; else the audit rows
    that the server marked rejected (failures leave no audit row).
    """
    found = []
    if history is not None:
        for round_, entry in sorted(history.items()):
            for stage, key in (
                ("train", "failed_or_rejected"),
                ("evaluate", "evaluate_failed_or_rejected"),
            ):
                for problem in entry.get(key) or []:
                    if not isinstance(problem, dict):
                        continue
                    found.append(
                        {
                            "round": round_,
                            "stage": stage,
                            "participant": problem.get("site") or f"node {problem.get('node')}",
                            "status": str(problem.get("status", "?")),
                            "reason": str(problem.get("reason", "")),
                        }
                    )
        return found
    for row in sorted(rows, key=lambda r: (r.round, r.site)):
        if row.update_status != "accepted":
            status, _, reason = row.update_status.partition(":")
            found.append(
                {"round": row.round, "stage": "train", "participant": row.site,
                 "status": status, "reason": reason}
            )  # fmt: skip
    return found

"""What ingest made of every listed stay: per-stay outcomes and the site's ingest report.

Every row of every listfile ends in exactly one place, so nothing is dropped silently:

* a row the listfile reader rejected (bad row, duplicate stay) is a rejected stay, reason
  ``listfile_<reason>``;
* every other stay gets one :class:`ModalityOutcome` per modality the site holds: ``used``,
  ``repaired`` (used after named repairs), ``missing`` (nothing to link, e.g. no image in the
  window) or ``rejected`` (there was data, but it was unusable), each with a named reason;
* a stay left with no used or repaired modality is a rejected stay, reason
  ``no_usable_modality``; all others are accepted.

:class:`IngestReport` tallies these per split and modality (JSON and a rich table), and
:meth:`IngestReport.check` verifies that the counts add up.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console
from rich.table import Table

from omnifuse_model.data.ehr.discretizer import plausible_range_text

ModalityStatus = Literal["used", "repaired", "missing", "rejected"]
MODALITY_STATUSES: tuple[str, ...] = ("used", "repaired", "missing", "rejected")
USABLE_STATUSES: tuple[str, ...] = ("used", "repaired")
NO_USABLE_MODALITY = "no_usable_modality"
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass
class ModalityOutcome:
    """Ingest outcome of one modality of one stay; ``reason`` names why it is not ``used``."""

    status: ModalityStatus
    reason: str = ""
    detail: str = ""
    repairs: dict[str, int] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        """True for ``used`` and ``repaired``."""
        return self.status in USABLE_STATUSES


@dataclass
class IngestedStay:
    """One listed stay after ingest: identifiers, labels and each held modality's input.

    ``ehr`` is the discretised ``[bins, 76]`` float32 array (raw, not normalised),
    ``ehr_digest`` the sha256 of the episode CSV's bytes, ``image_path`` the absolute path of
    the linked chest X-ray, ``report_text`` the selected report section; each is None when the
    modality is not held or not usable (see ``outcomes``).
    """

    split: str
    stay: str
    subject_id: int
    episode: int
    stay_id: int | None
    labels: tuple[int, ...]
    outcomes: dict[str, ModalityOutcome] = field(default_factory=dict)
    ehr: np.ndarray | None = None
    ehr_digest: str | None = None
    image_path: Path | None = None
    study_id: int | None = None
    report_text: str | None = None
    report_section: str | None = None
    implausible: dict[str, int] = field(default_factory=dict)
    """EHR channel -> values read as not charted because they were implausible."""

    @property
    def usable_modalities(self) -> tuple[str, ...]:
        """Held modalities that are used or repaired, in ``outcomes`` order."""
        return tuple(name for name, outcome in self.outcomes.items() if outcome.usable)

    @property
    def accepted(self) -> bool:
        """True when at least one modality is usable."""
        return bool(self.usable_modalities)


@dataclass(frozen=True)
class ListfileRejection:
    """A listfile row that did not become a stay (unparseable row, duplicate stay)."""

    split: str
    stay: str
    reason: str
    detail: str


@dataclass
class ModalityTally:
    """Counts of one modality's outcomes over a set of stays, with reasons."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MODALITY_STATUSES, 0))
    reasons: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, outcome: ModalityOutcome) -> None:
        """Count one outcome (repairs are counted per kind, once per stay)."""
        self.counts[outcome.status] += 1
        if outcome.status == "repaired":
            names = outcome.repairs or {outcome.reason or "unspecified": 1}
            for name in names:
                bucket = self.reasons.setdefault("repaired", {})
                bucket[name] = bucket.get(name, 0) + 1
        elif outcome.status in ("missing", "rejected"):
            bucket = self.reasons.setdefault(outcome.status, {})
            bucket[outcome.reason] = bucket.get(outcome.reason, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        """``{used, repaired, missing, rejected, <status>_by_reason: {...}}``."""
        data: dict[str, Any] = dict(self.counts)
        for status in ("repaired", "missing", "rejected"):
            data[f"{status}_by_reason"] = dict(sorted(self.reasons.get(status, {}).items()))
        return data


@dataclass
class SplitTally:
    """Stays of one split: listed = accepted + rejected."""

    listed: int = 0
    accepted: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    modalities: dict[str, ModalityTally] = field(default_factory=dict)
    combinations: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "listed": self.listed,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
            "modalities": {name: tally.to_dict() for name, tally in self.modalities.items()},
            "combinations": dict(sorted(self.combinations.items())),
        }


@dataclass
class IngestReport:
    """Site-level accounting of ingest (see the module docstring), JSON-ready."""

    site: str
    task: str
    timestep: float
    window_hours: float
    modalities: tuple[str, ...]
    splits: dict[str, SplitTally]
    linking: dict[str, Any] = field(default_factory=dict)
    problems: list[dict[str, str]] = field(default_factory=list)
    """One entry per rejected stay and per rejected modality: split, stay, modality, reason,
    detail (missing modalities are counted, not listed: they are the normal case)."""
    implausible_values: dict[str, dict[str, Any]] = field(default_factory=dict)
    """EHR channel -> ``{"values": n, "stays": k, "expected": "[low, high] unit"}``: values
    outside the channel's plausible range, read as not charted (all splits)."""

    def totals(self) -> dict[str, ModalityTally]:
        """Per-modality tallies summed over the splits."""
        totals = {name: ModalityTally() for name in self.modalities}
        for split in self.splits.values():
            for name, tally in split.modalities.items():
                total = totals[name]
                for status, count in tally.counts.items():
                    total.counts[status] += count
                for status, reasons in tally.reasons.items():
                    bucket = total.reasons.setdefault(status, {})
                    for reason, count in reasons.items():
                        bucket[reason] = bucket.get(reason, 0) + count
        return totals

    def check(self) -> None:
        """Raise ``ValueError`` unless every listed stay and modality is accounted for once."""
        for split_name, split in self.splits.items():
            if split.listed != split.accepted + split.rejected:
                raise ValueError(
                    f"split {split_name}: listed {split.listed} != accepted {split.accepted} "
                    f"+ rejected {split.rejected}"
                )
            if sum(split.rejected_by_reason.values()) != split.rejected:
                raise ValueError(f"split {split_name}: rejection reasons do not sum up")
            parsed = split.listed - sum(
                n for r, n in split.rejected_by_reason.items() if r.startswith("listfile_")
            )
            for name, tally in split.modalities.items():
                if sum(tally.counts.values()) != parsed:
                    raise ValueError(
                        f"split {split_name}, modality {name}: {sum(tally.counts.values())} "
                        f"outcomes for {parsed} stays"
                    )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "site": self.site,
            "task": self.task,
            "timestep": self.timestep,
            "window_hours": self.window_hours,
            "modalities": list(self.modalities),
            "splits": {name: split.to_dict() for name, split in self.splits.items()},
            "totals": {name: tally.to_dict() for name, tally in self.totals().items()},
            "linking": self.linking,
            "problems": self.problems,
            "implausible_values": self.implausible_values,
        }

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as indented JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def build_ingest_report(
    site: str,
    task: str,
    timestep: float,
    window_hours: float,
    modalities: tuple[str, ...],
    stays: list[IngestedStay],
    listfile_rejections: list[ListfileRejection],
    linking: dict[str, Any],
) -> IngestReport:
    """Tally stays and listfile rejections into an :class:`IngestReport`."""
    splits = {name: SplitTally() for name in SPLITS}
    for split in splits.values():
        split.modalities = {name: ModalityTally() for name in modalities}
    problems: list[dict[str, str]] = []
    for rejection in listfile_rejections:
        split = splits[rejection.split]
        split.listed += 1
        split.rejected += 1
        reason = f"listfile_{rejection.reason}"
        split.rejected_by_reason[reason] = split.rejected_by_reason.get(reason, 0) + 1
        problems.append(
            {"split": rejection.split, "stay": rejection.stay, "modality": "", "reason": reason,
             "detail": rejection.detail}
        )  # fmt: skip
    for stay in stays:
        split = splits[stay.split]
        split.listed += 1
        for name in modalities:
            outcome = stay.outcomes[name]
            split.modalities[name].add(outcome)
            if outcome.status == "rejected":
                problems.append(
                    {"split": stay.split, "stay": stay.stay, "modality": name,
                     "reason": outcome.reason, "detail": outcome.detail}
                )  # fmt: skip
        if stay.accepted:
            split.accepted += 1
            combination = "+".join(stay.usable_modalities)
            split.combinations[combination] = split.combinations.get(combination, 0) + 1
        else:
            split.rejected += 1
            reasons = Counter(o.reason for o in stay.outcomes.values())
            split.rejected_by_reason[NO_USABLE_MODALITY] = (
                split.rejected_by_reason.get(NO_USABLE_MODALITY, 0) + 1
            )
            problems.append(
                {"split": stay.split, "stay": stay.stay, "modality": "",
                 "reason": NO_USABLE_MODALITY,
                 "detail": ", ".join(f"{r} x{n}" for r, n in sorted(reasons.items()))}
            )  # fmt: skip
    report = IngestReport(
        site, task, timestep, window_hours, modalities, splits, dict(linking), problems
    )
    report.implausible_values = _tally_implausible(stays)
    report.check()
    return report


def _tally_implausible(stays: list[IngestedStay]) -> dict[str, dict[str, Any]]:
    """Implausible EHR values per channel over ``stays``, with the range that was expected."""
    values: Counter[str] = Counter()
    with_any: Counter[str] = Counter()
    for stay in stays:
        values.update(stay.implausible)
        with_any.update(stay.implausible.keys())
    return {
        channel: {
            "values": values[channel],
            "stays": with_any[channel],
            "expected": plausible_range_text(channel),
        }
        for channel in sorted(values)
    }


def print_ingest_report(report: IngestReport | dict[str, Any], console: Console) -> None:
    """Render an ingest report (object or its JSON dict) as rich tables on ``console``."""
    data = report.to_dict() if isinstance(report, IngestReport) else report
    title = f"Ingest of site {data['site']} ({data['task']}, {data['window_hours']:g} h window)"
    stays = Table(title=title)
    stays.add_column("split")
    for column in ("listed", "accepted", "rejected"):
        stays.add_column(column, justify="right")
    stays.add_column("rejected by reason")
    for name, split in data["splits"].items():
        reasons = ", ".join(f"{r}: {n}" for r, n in split["rejected_by_reason"].items())
        stays.add_row(
            name, str(split["listed"]), str(split["accepted"]), str(split["rejected"]), reasons
        )
    console.print(stays)

    modalities = Table(title="Modalities (all splits)")
    modalities.add_column("modality")
    for status in MODALITY_STATUSES:
        modalities.add_column(status, justify="right")
    modalities.add_column("reasons")
    for name, tally in data["totals"].items():
        reasons = "; ".join(
            f"{status}: " + ", ".join(f"{r} {n}" for r, n in tally[f"{status}_by_reason"].items())
            for status in ("repaired", "missing", "rejected")
            if tally[f"{status}_by_reason"]
        )
        modalities.add_row(name, *(str(tally[s]) for s in MODALITY_STATUSES), reasons)
    console.print(modalities)

    if data.get("implausible_values"):
        implausible = Table(title="Implausible EHR values (read as not charted)")
        for column in ("variable", "values", "stays", "expected"):
            justify = "left" if column in ("variable", "expected") else "right"
            implausible.add_column(column, justify=justify)
        for channel, row in data["implausible_values"].items():
            implausible.add_row(channel, str(row["values"]), str(row["stays"]), row["expected"])
        console.print(implausible)

    combos = Table(title="Usable modality combinations of accepted stays")
    combos.add_column("combination")
    for name in data["splits"]:
        combos.add_column(name, justify="right")
    names = sorted({c for split in data["splits"].values() for c in split["combinations"]})
    for combo in names:
        combos.add_row(
            combo, *(str(s["combinations"].get(combo, 0)) for s in data["splits"].values())
        )
    console.print(combos)

"""Radiological findings planted per CXR study: what the image draws and the report says.

Four findings, each absent (grade 0) or present with a grade (1 mild, 2 moderate, 3 severe)
and, for the lateralised ones, a side (``left``, ``right`` or ``bilateral``). They are drawn
once per study from the stay's CXR view ``v = (severity, respiratory, cardiac, metabolic)``:

* ``opacity``:      ``1.6 (resp + 0.5 sev) - 1.0``; bilateral when ``sev > 1``;
* ``effusion``:     ``1.4 card + 0.4 met - 1.3``; bilateral when the noisy score exceeds 1.5;
* ``cardiomegaly``: ``1.6 card - 0.6``;
* ``edema``:        ``1.2 card + 0.8 sev - 1.6`` (always bilateral, no side recorded).

A finding is present when its score plus N(0, 0.5) noise is above 0; its grade is 1 + the
number of thresholds (1, 2) that the noisy score passes. Hard thresholds make the link from
the latent state to both image and report non-linear. The image (:mod:`.cxr`) and the report
(:mod:`.text`) render the same :class:`Findings`, so either can be imputed from the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import numpy as np

FindingName = Literal["opacity", "effusion", "cardiomegaly", "edema"]
FINDING_NAMES: tuple[FindingName, ...] = ("opacity", "effusion", "cardiomegaly", "edema")
LATERAL_FINDINGS: frozenset[str] = frozenset({"opacity", "effusion"})
SIDES: tuple[str, ...] = ("left", "right", "bilateral")
GRADES: Mapping[int, str] = MappingProxyType({1: "mild", 2: "moderate", 3: "severe"})
SCORE_NOISE = 0.5
_GRADE_STEPS = (1.0, 2.0)


@dataclass(frozen=True)
class Finding:
    """One present finding: its grade (1..3) and side ('' for non-lateralised findings)."""

    grade: int
    side: str = ""


Findings = Mapping[str, Finding]
"""Present findings by name; an absent finding is not a key."""


def finding_scores(view: np.ndarray) -> dict[str, float]:
    """The noiseless score of each finding for a CXR view (see module docstring)."""
    sev, resp, card, met = (float(v) for v in view[:4])
    return {
        "opacity": 1.6 * (resp + 0.5 * sev) - 1.0,
        "effusion": 1.4 * card + 0.4 * met - 1.3,
        "cardiomegaly": 1.6 * card - 0.6,
        "edema": 1.2 * card + 0.8 * sev - 1.6,
    }


def plant_findings(view: np.ndarray, rng: np.random.Generator) -> dict[str, Finding]:
    """Draw the findings of one study (always the same number of draws from ``rng``)."""
    scores = finding_scores(view)
    noise = rng.normal(0.0, SCORE_NOISE, size=len(FINDING_NAMES))
    coin = rng.random(len(FINDING_NAMES))
    severity = float(view[0])
    found: dict[str, Finding] = {}
    for i, name in enumerate(FINDING_NAMES):
        score = scores[name] + float(noise[i])
        if score <= 0.0:
            continue
        grade = 1 + sum(score > step for step in _GRADE_STEPS)
        side = ""
        if name == "opacity":
            side = "bilateral" if severity > 1.0 else ("left" if coin[i] < 0.5 else "right")
        elif name == "effusion":
            side = "bilateral" if score > 1.5 else ("left" if coin[i] < 0.5 else "right")
        found[name] = Finding(grade=grade, side=side)
    return found


def findings_columns(findings: Findings | None) -> list[str]:
    """``{name}_grade, {name}_side`` cells for each finding ('' everywhere without a study)."""
    cells: list[str] = []
    for name in FINDING_NAMES:
        if findings is None:
            cells += ["", ""]
        elif name in findings:
            cells += [str(findings[name].grade), findings[name].side]
        else:
            cells += ["0", ""]
    return cells


FINDINGS_HEADER: tuple[str, ...] = tuple(
    f"{name}_{part}" for name in FINDING_NAMES for part in ("grade", "side")
)
"""Column names matching :func:`findings_columns`."""

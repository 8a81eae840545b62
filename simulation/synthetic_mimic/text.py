"""Synthetic radiology reports in the MIMIC-CXR ``files/pXX/pSUBJECT/sSTUDY.txt`` style.

Style (design/MIMIC_FORMATS.md section 3): lines of at most 79 characters, each starting with
a space, blank lines written as ``" "``, the first line ``FINAL REPORT`` indented by 33
spaces, sections ``EXAMINATION:``, ``INDICATION:``, ``TECHNIQUE:``, ``COMPARISON:``,
``FINDINGS:``, ``IMPRESSION:``, and PHI masked as ``___``.

Signal: each finding belongs to a latent factor; its sentence appears with probability
``sigmoid(2.5 (v_k - threshold))`` where ``v_k`` is the stay's report view of factor k, so
'consolidation', 'effusion', 'edema' become more frequent with risk. Normal statements never
name a finding, so the presence of a finding word is the signal. Noise: besides the noise in
the view itself (random flips of findings), a Poisson(noise) number of irrelevant incidental
sentences is added.
"""

from __future__ import annotations

import math
import textwrap

import numpy as np

from simulation.synthetic_mimic.cohort import StudyPlan
from simulation.synthetic_mimic.cxr import study_description

REPORT_TITLE = " " * 33 + "FINAL REPORT"
LINE_WIDTH = 79

# (factor: 0 severity, 1 respiratory, 2 cardiac; threshold, findings sentence, impression)
_FINDINGS: tuple[tuple[int, float, str, str], ...] = (
    (
        1,
        0.5,
        "There is a focal consolidation in the {side} lower lobe.",
        "{Side} lower lobe consolidation, concerning for pneumonia.",
    ),
    (
        1,
        1.0,
        "Patchy opacity at the {side} lung base likely reflects atelectasis.",
        "{Side} basilar atelectasis.",
    ),
    (
        2,
        0.6,
        "There is mild pulmonary edema with pulmonary vascular congestion.",
        "Mild pulmonary edema.",
    ),
    (2, 0.9, "There is a small {side} pleural effusion.", "Small {side} pleural effusion."),
    (2, 0.3, "The heart is moderately enlarged.", "Cardiomegaly."),
    (
        0,
        0.9,
        "Diffuse bilateral airspace opacities are present.",
        "Diffuse bilateral opacities, which may reflect ARDS.",
    ),
    (
        0,
        1.1,
        "An endotracheal tube terminates 4 cm above the carina.",
        "Endotracheal tube in standard position.",
    ),
)
_NORMAL_LUNGS = ("The lungs are clear.", "The lungs are well expanded and clear.")
_NORMAL_HEART = (
    "Heart size is normal.",
    "The cardiomediastinal silhouette is within normal limits.",
)
_BOILERPLATE = ("No pneumothorax is seen.", "There is no pneumothorax.")
_INCIDENTAL = (
    "Degenerative changes are noted in the thoracic spine.",
    "Surgical clips project over the right upper quadrant.",
    "Old healed left rib fractures are noted.",
    "The aortic knob is calcified.",
    "Median sternotomy wires are intact.",
    "The bones are diffusely demineralized.",
)
_REASONS = (
    ("shortness of breath", "?pneumonia"),
    ("hypoxia", "eval for infiltrate"),
    ("fever", "eval for pneumonia"),
    ("chest pain", "eval for acute process"),
    ("line placement", "confirm position"),
    ("altered mental status", "r/o aspiration"),
    ("intubation", "ETT position"),
)
_COMPARISONS = ("___", "Chest radiograph from ___.", "None.", "___ chest radiograph.")


def _wrap(text: str) -> list[str]:
    return [" " + line for line in textwrap.wrap(text, width=LINE_WIDTH - 1)]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _pick(options: tuple[str, ...], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def render_report(
    study: StudyPlan, view: np.ndarray, noise: float, gender: str, rng: np.random.Generator
) -> str:
    """The report text of ``study`` given the stay's report view (trailing newline included)."""
    side = _pick(("right", "left"), rng)
    found, impressions, factors = [], [], set()
    for factor, threshold, sentence, impression in _FINDINGS:
        if rng.random() < _sigmoid(2.5 * (float(view[factor]) - threshold)):
            found.append(sentence.format(side=side))
            impressions.append(impression.format(side=side, Side=side.capitalize()))
            factors.add(factor)
    findings = list(found)
    if not factors & {0, 1}:
        findings.insert(0, _pick(_NORMAL_LUNGS, rng))
    if 2 not in factors:
        findings.append(_pick(_NORMAL_HEART, rng))
    findings.append(_pick(_BOILERPLATE, rng))
    for _ in range(min(int(rng.poisson(noise)), 3)):
        findings.append(_pick(_INCIDENTAL, rng))

    reason, question = _REASONS[int(rng.integers(len(_REASONS)))]
    person = "woman" if gender == "F" else "man"
    portable = study_description(study) == "CHEST (PORTABLE AP)"
    technique = "Portable AP chest radiograph." if portable else "Chest PA and lateral views."
    if len(impressions) > 1:
        impression_lines = [f"{i}. {text}" for i, text in enumerate(impressions, 1)]
    else:
        impression_lines = impressions or ["No acute cardiopulmonary process."]

    lines = [
        REPORT_TITLE,
        *_wrap(f"EXAMINATION:  {study_description(study)}"),
        " ",
        *_wrap(f"INDICATION:  ___ year old {person} with {reason}  // {question}"),
        " ",
        *_wrap(f"TECHNIQUE:  {technique}"),
        " ",
        *_wrap(f"COMPARISON:  {_pick(_COMPARISONS, rng)}"),
        " ",
        " FINDINGS:",
        " ",
        *_wrap("  ".join(findings)),
        " ",
        " IMPRESSION:",
        " ",
    ]
    for text in impression_lines:
        lines += _wrap(text)
    return "\n".join(lines) + "\n"


def without_leading_spaces(report: str) -> str:
    """The messy variant: the one-space indent of every line removed."""
    return "".join(line[1:] if line.startswith(" ") else line for line in report.splitlines(True))

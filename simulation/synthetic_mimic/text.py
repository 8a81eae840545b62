"""Synthetic radiology reports in the MIMIC-CXR ``files/pXX/pSUBJECT/sSTUDY.txt`` style.

Style (design/MIMIC_FORMATS.md section 3): lines of at most 79 characters, each starting with
a space, blank lines written as ``" "``, the first line ``FINAL REPORT`` indented by 33
spaces, sections ``EXAMINATION:``, ``INDICATION:``, ``TECHNIQUE:``, ``COMPARISON:``,
``FINDINGS:``, ``IMPRESSION:``, and PHI masked as ``___``.

Content: the FINDINGS and IMPRESSION sentences describe exactly the study's planted findings
(:mod:`.findings`, the same ones its image shows): a positive sentence with grade and side for
each present finding, a negation for each absent one, phrasing drawn per report from
:mod:`.report_phrases`. The stay's report view adds what the image does not show: support
devices and an indication that follow its severity. Noise: a Poisson(noise) number of
incidental sentences. Length: the hospital's ``report_length`` scales the expected number of
optional sentences (boilerplate, incidental, and above 1 routine remarks); below 0.75 the
report is terse: findings in the short impression wording and the negations merged into one
sentence ("No pleural effusion, pulmonary edema or ...").
:func:`read_findings` reads the findings back from a report.
"""

from __future__ import annotations

import math
import re
import textwrap

import numpy as np

from simulation.synthetic_mimic import report_phrases as phrases
from simulation.synthetic_mimic.cohort import StudyPlan
from simulation.synthetic_mimic.cxr import study_description
from simulation.synthetic_mimic.findings import FINDING_NAMES, SIDES, Finding, Findings

REPORT_TITLE = " " * 33 + "FINAL REPORT"
LINE_WIDTH = 79

TERSE_BELOW = 0.75
"""Reports of hospitals with ``report_length`` below this are terse."""
_SENTENCE_END = re.compile(r"(?<=\.)\s+")


def _wrap(text: str) -> list[str]:
    return [" " + line for line in textwrap.wrap(text, width=LINE_WIDTH - 1)]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _pick(options: tuple, rng: np.random.Generator):
    return options[int(rng.integers(len(options)))]


def _fill(template: str, name: str, finding: Finding) -> str:
    grade = phrases.GRADE_WORDS[name][finding.grade - 1]
    words = {
        "grade": grade,
        "gradely": grade + "ly",
        "side": finding.side,
        "where": phrases.LOBES.get(finding.side, ""),
        "effusions": "pleural effusions" if finding.side == "bilateral" else "pleural effusion",
    }
    words |= {key.capitalize(): value.capitalize() for key, value in words.items()}
    return template.format(**words)


def _findings_sentences(
    findings: Findings, length: float, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """(FINDINGS sentences about the four findings, IMPRESSION items)."""
    terse = length < TERSE_BELOW
    positive, impressions, absent = [], [], []
    for name in FINDING_NAMES:
        if name in findings:
            finding = findings[name]
            sentences = phrases.IMPRESSIONS if terse else phrases.FINDING_SENTENCES
            positive.append(_fill(_pick(sentences[name], rng), name, finding))
            impressions.append(_fill(_pick(phrases.IMPRESSIONS[name], rng), name, finding))
        else:
            absent.append(name)
    if not absent:
        return positive, impressions
    if terse:
        nouns = [phrases.NEGATION_NOUNS[name] for name in absent]
        listed = nouns[0] if len(nouns) == 1 else ", ".join(nouns[:-1]) + " or " + nouns[-1]
        negations = [f"No {listed}."]
    else:
        negations = [_pick(phrases.NEGATIONS[name], rng) for name in absent]
    return positive + negations, impressions


def _extra_sentences(
    view: np.ndarray, noise: float, length: float, rng: np.random.Generator
) -> list[str]:
    """Devices (from the report view), then the optional sentences, their expected number
    scaled by ``length``: boilerplate (kept with probability ``min(length, 1)``), incidental
    (Poisson(noise * length)) and, above 1, routine (Poisson(2 (length - 1)))."""
    severity = float(view[0])
    extra = [
        sentence
        for threshold, sentence in phrases.DEVICES
        if rng.random() < _sigmoid(2.5 * (severity - threshold))
    ]
    if rng.random() < min(length, 1.0):
        extra.append(_pick(phrases.BOILERPLATE, rng))
    incidental = int(rng.poisson(noise * length))
    routine = int(rng.poisson(2.0 * max(length - 1.0, 0.0)))
    extra += _distinct(phrases.INCIDENTAL, min(incidental, 3), rng)
    extra += _distinct(phrases.ROUTINE, min(routine, 6), rng)
    return extra


def _distinct(options: tuple[str, ...], count: int, rng: np.random.Generator) -> list[str]:
    """``count`` different sentences of ``options`` in random order."""
    return [options[int(i)] for i in rng.choice(len(options), size=count, replace=False)]


def render_report(
    study: StudyPlan,
    view: np.ndarray,
    noise: float,
    gender: str,
    rng: np.random.Generator,
    length: float = 1.0,
) -> str:
    """The report of ``study`` (its planted findings, the stay's report ``view``, the
    hospital's report ``length``), trailing newline included."""
    findings, impressions = _findings_sentences(study.findings, length, rng)
    findings += _extra_sentences(view, noise, length, rng)
    sick = rng.random() < _sigmoid(2.0 * float(view[0]))
    reason, question = _pick(phrases.SICK_REASONS if sick else phrases.ROUTINE_REASONS, rng)
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
        *_wrap(f"COMPARISON:  {_pick(phrases.COMPARISONS, rng)}"),
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


def _section(report: str, title: str, next_title: str | None) -> str:
    text = " ".join(line.strip() for line in report.splitlines())
    start = text.find(title)
    if start < 0:
        raise ValueError(f"report has no {title!r} section")
    body = text[start + len(title) :]
    return body.split(next_title)[0] if next_title else body


def _read_sentence(sentence: str, found: dict[str, Finding]) -> None:
    lower = f" {sentence.lower()} "
    names = [n for n in FINDING_NAMES if any(k in lower for k in phrases.KEYWORDS[n])]
    if not names or any(f" {marker}" in lower for marker in phrases.NEGATION_MARKERS):
        return
    for name in names:
        grades = [i + 1 for i, word in enumerate(phrases.GRADE_WORDS[name]) if word in lower]
        side = next((s for s in SIDES if f" {s} " in lower), "")
        found[name] = Finding(grade=grades[0] if grades else 0, side=side)


def read_findings(report: str) -> tuple[dict[str, Finding], dict[str, Finding]]:
    """The findings a report states, from its FINDINGS and from its IMPRESSION section.

    A sentence naming a finding without a negation word states it present, with the grade
    word and side it contains (grade 0 when it has none). Works on the messy variant too.
    """
    sections = (_section(report, "FINDINGS:", "IMPRESSION:"), _section(report, "IMPRESSION:", None))
    result: list[dict[str, Finding]] = []
    for body in sections:
        found: dict[str, Finding] = {}
        for sentence in _SENTENCE_END.split(body.strip()):
            _read_sentence(sentence, found)
        result.append(found)
    return result[0], result[1]


def without_leading_spaces(report: str) -> str:
    """The messy variant: the one-space indent of every line removed."""
    return "".join(line[1:] if line.startswith(" ") else line for line in report.splitlines(True))

"""MIMIC-CXR free-text radiology reports: where they live and which text the model reads.

Facts (design/MIMIC_FORMATS.md section 3): a report belongs to a study and lives at
``files/p{first 2 digits of subject}/p{subject}/s{study}.txt``; lines start with a space, the
first line is a centred ``FINAL REPORT``, sections are introduced by upper-case headers such as
``EXAMINATION:``, ``INDICATION:``, ``TECHNIQUE:``, ``COMPARISON:``, ``FINDINGS:``,
``IMPRESSION:``; PHI is ``___``; addenda are set apart by lines of underscores.

Section rules, as in MIT-LCP/mimic-cxr ``txt/section_parser.py`` but tolerant:

* a header is a line that starts with an optional space, then a run of ``[A-Z ()/,-]``
  holding at least one letter, then ``:`` and whitespace or the end of the line. The original
  requires the leading space; reports stripped of it parse the same here;
* the text after the colon on the header line belongs to the section, which runs to the next
  header, or to a line of underscores (an addendum boundary), or to the end;
* names are lower-cased and normalised (:func:`normalize_section_name`): e.g.
  ``FINDINGS AND IMPRESSION`` and ``CONCLUSION`` -> impression, misspellings such as
  ``IMPRESSON`` or ``FINDNGS`` -> impression / findings, names containing a main section name
  -> that name, names describing the views (``PA AND LATERAL VIEWS OF THE CHEST``) -> findings;
* when neither findings nor impression has text, ``last_paragraph`` is what follows the first
  paragraph of the last section with text (for a report without any header: its whole body).

This project reads the FINDINGS section (METHOD.md section 1), else the impression, else the
last paragraph; section text is returned with each line stripped and blank runs collapsed, so
the leading-space convention does not change it. The original's 23 hard-coded section names and
31 hard-coded character spans for individual studies are not reproduced.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

ReportRejection = Literal["unreadable", "empty_report", "no_text_section"]
REPORT_REJECTIONS: tuple[str, ...] = ("unreadable", "empty_report", "no_text_section")

SECTION_PREFERENCE: tuple[str, ...] = ("findings", "impression", "last_paragraph")
"""Which section the model reads, in order of preference."""

_HEADER = re.compile(r"^ ?(?=[ ()/,-]*[A-Z])([A-Z ()/,-]+):(?:\s+(.*))?$")
_ADDENDUM_RULE = re.compile(r"^\s*_{10,}\s*$")
_TITLE = re.compile(r"^\s*(?:FINAL|PRELIMINARY)\s+(?:REPORT|ADDENDUM)\s*$")

# Exact names that do not follow from the rules below (facts from the reference's table).
_KNOWN_NAMES: dict[str, str] = {
    "conclusion": "impression",
    "conclusions": "impression",
    "clinical history": "history",
    "clinical information": "history",
    "patient history": "history",
    "pfi": "history",
    "reason for examination": "indication",
    "reason for exam": "indication",
    "clinical indication": "indication",
    "idication": "indication",
    "exam": "examination",
    "type of examination": "examination",
    "comparisons": "comparison",
    "reference exam": "comparison",
    "comparison exam": "comparison",
    "comparison film": "comparison",
    "recommendation": "recommendations",
    "recommendation(s)": "recommendations",
    "wetread": "wet read",
}
# Checked in this order, so 'findings and impression' -> impression.
_MAIN_NAMES: tuple[str, ...] = ("impression", "findings", "history", "comparison", "addendum")
# A word this close to 'impression' / 'findings' is that word misspelt ('impresson', 'findngs');
# 0.85 keeps 'expression' (0.80), 'comparison' (0.60) and 'indication' (0.56) apart.
_FUZZY_TARGETS: tuple[str, ...] = ("impression", "findings")
_FUZZY_CUTOFF = 0.85
# A header that describes the views taken stands for the findings.
_VIEW_WORDS = re.compile(
    r"chest|portable|pa and lat|lateral and pa|ap and lateral|lateral and ap|frontal and|"
    r"two views|frontal view|pa view|ap view|one view|lateral view|bone window|"
    r"frontal upright|frontal semi-upright|ribs"
)


class ReportRejected(Exception):
    """A report the model cannot use; callers count ``reason`` as a rejection.

    ``reason``: ``unreadable`` (missing file, not UTF-8), ``empty_report`` (no text besides a
    title line) or ``no_text_section`` (text, but no findings, impression or last paragraph).
    """

    def __init__(self, reason: ReportRejection, detail: str, path: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(f"{where}{reason}: {detail}")


@dataclass(frozen=True)
class ReportSection:
    """One section: normalised ``name``, ``header`` as written ('' before the first header)."""

    name: str
    header: str
    text: str


@dataclass(frozen=True)
class ReportText:
    """The text the model reads and the section it came from."""

    text: str
    section: str


def report_path(subject_id: int, study_id: int) -> str:
    """Relative path of a MIMIC-CXR report: ``files/p{XX}/p{subject}/s{study}.txt``."""
    if subject_id < 10 or study_id < 0:
        raise ValueError(
            f"subject_id {subject_id!r} / study_id {study_id!r}: expected a subject id of at "
            "least two digits and a non-negative study id"
        )
    return f"files/p{str(subject_id)[:2]}/p{subject_id}/s{study_id}.txt"


def normalize_section_name(header: str) -> str:
    """Map a header as written (``'FINDINGS AND IMPRESSION'``) to a canonical section name."""
    name = " ".join(header.lower().split())
    if name in _KNOWN_NAMES:
        return _KNOWN_NAMES[name]
    for main in _MAIN_NAMES:
        if main in name:
            return main
    words = re.split(r"[ ()/,-]+", name)
    for target in _FUZZY_TARGETS:
        if difflib.get_close_matches(target, words, n=1, cutoff=_FUZZY_CUTOFF):
            return target
    if _VIEW_WORDS.search(name):
        return "findings"
    return name


def _clean(lines: Sequence[str]) -> str:
    """Strip every line, collapse runs of blank lines to one, strip the ends."""
    text = "\n".join(line.strip() for line in lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_sections(text: str) -> list[ReportSection]:
    """Split a report into sections, in order; text before a first header is ``preamble``.

    Title lines (``FINAL REPORT``, ``FINAL ADDENDUM``) are dropped; a line of ten or more
    underscores ends the current section and starts a new ``preamble`` (the next part of an
    addendum-bearing report).
    """
    sections: list[ReportSection] = []
    name, header, body = "preamble", "", []

    def close() -> None:
        if header or _clean(body):
            sections.append(ReportSection(name, header, _clean(body)))

    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if _TITLE.match(line):
            continue
        if _ADDENDUM_RULE.match(line):
            close()
            name, header, body = "preamble", "", []
            continue
        match = _HEADER.match(line)
        if match:
            close()
            header = match.group(1).strip()
            name, body = normalize_section_name(header), [match.group(2) or ""]
        else:
            body.append(line)
    close()
    return sections


def _last_paragraph(sections: Sequence[ReportSection]) -> str:
    """What follows the first paragraph of the last section with text (all of a preamble)."""
    for section in reversed(sections):
        if not section.text:
            continue
        if not section.header:
            return section.text
        paragraphs = section.text.split("\n\n", 1)
        return paragraphs[1].strip() if len(paragraphs) == 2 else ""
    return ""


def select_report_text(
    text: str, preference: Sequence[str] = SECTION_PREFERENCE, path: str | None = None
) -> ReportText:
    """The text the model reads: the last non-empty section named by ``preference``, in order.

    ``preference`` names sections (``findings``, ``impression``, ...) or ``last_paragraph``.
    Raises :class:`ReportRejected` (``empty_report`` or ``no_text_section``).
    """
    sections = split_sections(text)
    if not any(section.text for section in sections):
        raise ReportRejected("empty_report", "no text besides headers and title lines", path)
    for wanted in preference:
        if wanted == "last_paragraph":
            chosen = _last_paragraph(sections)
        else:
            chosen = next((s.text for s in reversed(sections) if s.name == wanted and s.text), "")
        if chosen:
            return ReportText(chosen, wanted)
    found = sorted({s.name for s in sections if s.text})
    raise ReportRejected(
        "no_text_section", f"none of {list(preference)} has text; sections found: {found}", path
    )


def read_report(
    path: str | os.PathLike[str], preference: Sequence[str] = SECTION_PREFERENCE
) -> ReportText:
    """Read one report file (UTF-8) and select its text, see :func:`select_report_text`.

    Raises :class:`ReportRejected` with reason ``unreadable``, ``empty_report`` or
    ``no_text_section`` and the path.
    """
    source = str(path)
    try:
        with open(source, encoding="utf-8-sig") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ReportRejected("unreadable", "no such file", source) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ReportRejected("unreadable", f"{type(error).__name__}: {error}", source) from error
    return select_report_text(text, preference, source)

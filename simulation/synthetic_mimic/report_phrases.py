"""Sentences of the synthetic radiology reports, and the words that identify a finding.

Every positive sentence about a finding names it with one of :data:`KEYWORDS`, says its grade
with one word of :data:`GRADE_WORDS` and, for lateralised findings, its side; every negation
contains a negation word of :data:`NEGATION_MARKERS`; no other sentence (devices, incidental
or routine remarks, normal heart size) contains a finding keyword. :func:`.text.read_findings`
relies on these rules to read the findings back from a report.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

KEYWORDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "opacity": ("opacit", "consolidation"),
        "effusion": ("effusion",),
        "cardiomegaly": ("cardiomegaly", "enlarged"),
        "edema": ("edema",),
    }
)
GRADE_WORDS: Mapping[str, tuple[str, str, str]] = MappingProxyType(
    {
        "opacity": ("mild", "moderate", "dense"),
        "effusion": ("small", "moderate", "large"),
        "cardiomegaly": ("mild", "moderate", "severe"),
        "edema": ("mild", "moderate", "severe"),
    }
)
NEGATION_MARKERS: tuple[str, ...] = ("no ", "not ", "without ")

# {grade} grade word, {gradely} its adverb, {side} left/right/bilateral, {where} a lobe phrase,
# {effusions} singular or plural; a capitalised key gives the capitalised word.
FINDING_SENTENCES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "opacity": (
            "There is a {grade} opacity in the {where}, concerning for consolidation.",
            "{Grade} airspace opacity is seen in the {where}.",
            "A {grade} {side} basilar opacity is present.",
        ),
        "effusion": (
            "There is a {grade} {side} {effusions}.",
            "A {grade} {side} {effusions} is noted.",
            "{Grade} {side} {effusions} with adjacent atelectasis.",
        ),
        "cardiomegaly": (
            "There is {grade} cardiomegaly.",
            "The heart is {gradely} enlarged.",
            "The cardiac silhouette is {gradely} enlarged.",
        ),
        "edema": (
            "There is {grade} pulmonary edema.",
            "{Grade} interstitial edema with pulmonary vascular congestion.",
            "Findings are consistent with {grade} pulmonary edema.",
        ),
    }
)
IMPRESSIONS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "opacity": (
            "{Grade} {side} lower lobe opacity, concerning for pneumonia.",
            "{Grade} opacity in the {where}.",
        ),
        "effusion": ("{Grade} {side} {effusions}.",),
        "cardiomegaly": ("{Grade} cardiomegaly.", "Cardiac silhouette {gradely} enlarged."),
        "edema": ("{Grade} pulmonary edema.", "{Grade} interstitial pulmonary edema."),
    }
)
NEGATIONS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "opacity": (
            "No focal consolidation.",
            "The lungs are clear without focal opacity.",
            "There is no focal airspace opacity.",
        ),
        "effusion": (
            "No pleural effusion.",
            "There is no pleural effusion.",
            "Pleural effusions are not seen.",
        ),
        "cardiomegaly": (
            "No cardiomegaly.",
            "The cardiac silhouette is not enlarged.",
            "There is no cardiomegaly.",
        ),
        "edema": (
            "No pulmonary edema.",
            "There is no pulmonary edema.",
            "Pulmonary vasculature is unremarkable without edema.",
        ),
    }
)
NEGATION_NOUNS: Mapping[str, str] = MappingProxyType(
    {
        "opacity": "focal consolidation",
        "effusion": "pleural effusion",
        "cardiomegaly": "cardiomegaly",
        "edema": "pulmonary edema",
    }
)
"""Nouns of the terse, merged negation ``No pleural effusion, pulmonary edema or ....``"""

LOBES: Mapping[str, str] = MappingProxyType(
    {"left": "left lower lobe", "right": "right lower lobe", "bilateral": "bilateral lower lobes"}
)
BOILERPLATE = ("No pneumothorax is seen.", "There is no pneumothorax.")
INCIDENTAL = (
    "Degenerative changes are noted in the thoracic spine.",
    "Surgical clips project over the right upper quadrant.",
    "Old healed left rib fractures are noted.",
    "The aortic knob is calcified.",
    "Median sternotomy wires are intact.",
    "The bones are diffusely demineralized.",
)
ROUTINE = (
    "Lung volumes are within the expected range for a portable study.",
    "The mediastinal and hilar contours are unchanged.",
    "The visualized upper abdomen is unremarkable.",
    "Patient rotation limits assessment of the mediastinum.",
    "The trachea is midline.",
    "Soft tissues of the chest wall are unremarkable.",
)
"""Sentences added to verbose reports (``report_length > 1``); they name no finding."""

DEVICES = (
    (1.1, "An endotracheal tube terminates 4 cm above the carina."),
    (0.5, "A right internal jugular central venous catheter terminates in the mid SVC."),
)
"""(report-view severity threshold, sentence): support devices, more likely in sicker stays."""

SICK_REASONS = (
    ("hypoxia", "eval for infiltrate"),
    ("intubation", "ETT position"),
    ("respiratory distress", "eval for acute process"),
    ("hypotension", "r/o aspiration"),
)
ROUTINE_REASONS = (
    ("shortness of breath", "?pneumonia"),
    ("fever", "eval for pneumonia"),
    ("chest pain", "eval for acute process"),
    ("line placement", "confirm position"),
)
COMPARISONS = ("___", "Chest radiograph from ___.", "None.", "___ chest radiograph.")

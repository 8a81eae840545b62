"""The audit report as one document to read or send: report.html (self-contained: figures
embedded as base64 PNG, styles inline, no external link) and report.md (figures referenced as
the PNG files beside it). Both are rendered with jinja2 from ``server/templates/`` and hold
the same sections, tables and notes as the console report, with a short reading guide first.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined

from server.audit_tables import TEST_TIME_WEIGHT_NOTE, ReportTable

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
NUMERIC = re.compile(r"[<>=+-]*\d.*|-|hidden")  # a number, missing or hidden


@dataclass(frozen=True)
class Section:
    """One section of the document: a heading, what it answers, its tables and figures."""

    heading: str
    question: str
    tables: tuple[str, ...]
    figures: tuple[str, ...]


SECTIONS = (
    Section(
        "1. Lazy combinations, and how clear each call is",
        "Which combination does each site's model rely on least, and is the call clear?",
        ("lazy_timeline", "lazy_margins"),
        ("lazy_combination_timeline",),
    ),
    Section(
        "2. Across sites: which combination is lazy where, and is that stable?",
        "How often each combination was lazy at each site over the rounds.",
        ("lazy_frequency",),
        ("lazy_frequency",),
    ),
    Section(
        "3. Modality weights: observed vs imputed, next to availability",
        "DWFuse's test-time confidence weight per modality at each site (how hard training "
        "would push the modality: high where the others are unsure), and whether the site "
        "holds it.",
        ("weight_profile", "dwfuse_weights"),
        ("weight_profile", "modality_weights"),
    ),
    Section(
        "4. Imputation quality",
        "How well each modality is reconstructed from the others (comparable across modalities).",
        ("imputation_error",),
        (),
    ),
    Section(
        "5. Availability (small counts suppressed)",
        "How many training samples hold each exact modality combination.",
        ("availability",),
        ("availability",),
    ),
    Section(
        "6. Global performance",
        "How the global model does per round, with the test-set uncertainty.",
        ("round_metrics",),
        ("auroc_per_round",),
    ),
    Section(
        "7. Failures and rejections",
        "Which sites failed or had their reply rejected, in which round and why.",
        ("failures",),
        (),
    ),
    Section("8. Privacy budget", "DP-SGD epsilon spent per site.", ("epsilon",), ()),
)


def reading_guide(data: dict) -> list[str]:
    """The few sentences a reader needs before the tables."""
    k, tie = data["min_count"], f"{data['tie_margin']:.0%}"
    return [
        "Lazy combination: the modality combination a site's model relies on least this round "
        "(highest TLA score); the next round's training pushes it. It is a finding only when "
        f"its margin over the runner-up is at least {tie} of its score; smaller margins are "
        "marked '?' (near tie) and should be read as 'no clear lazy combination'.",
        TEST_TIME_WEIGHT_NOTE,
        "Observed vs imputed: a site that holds no sample of a modality still gets a DWFuse "
        "weight for it, computed on an embedding imputed from the other modalities. Such "
        "weights are labelled 'imputed' and drawn dashed or hatched: they say nothing about "
        "that modality's data at the site.",
        "Imputation error is 1 - R^2: 0 = perfect reconstruction, 1 = no better than "
        "predicting the site's mean embedding, above 1 = worse than that; it compares across "
        "modalities, the raw MSE does not.",
        "AUROC axes run from 0.5 (chance) to 1 (or 0 to 1) and the server test AUROC carries "
        "a 95% bootstrap interval; with a test set of a few dozen stays, differences inside "
        "the interval are noise.",
        f"Counts below {k} are suppressed ('<{k}'), at the sites and in this report; a "
        "threshold given to the report can raise this, never lower it. Nothing per patient "
        "is in this report: every value is an aggregate a site chose to publish.",
    ]


def _environment(autoescape: bool) -> Environment:
    return Environment(
        loader=PackageLoader("server", "templates"),
        autoescape=autoescape,  # on for HTML (names come from site configs), off for Markdown
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def numeric_columns(table: ReportTable) -> list[bool]:
    """Per column: whether every cell reads as a number ('0.41', '<5', '40%', '2/3',
    '16.4 MiB', '-', 'hidden'), so that the column is right-aligned; a column of mixed text stays
    left-aligned as a whole (a ragged mix of alignments reads badly)."""
    return [
        index > 0 and all(NUMERIC.fullmatch(row[index]) for row in table.rows)
        for index in range(len(table.columns))
    ]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _context(run_dir: Path, data: dict, tables: dict[str, ReportTable], notes: list[str]) -> dict:
    sections = []
    for section in SECTIONS:
        present = [tables[name] for name in section.tables if name in tables]
        if present:
            sections.append({"section": section, "tables": present})
    return {
        "run_dir": str(run_dir),
        "sites": data["sites"],
        "rounds": data["rounds"],
        "guide": reading_guide(data),
        "notes": notes,
        "sections": sections,
    }


def write_documents(
    out_dir: Path,
    run_dir: Path,
    data: dict,
    tables: dict[str, ReportTable],
    plots: dict[str, Path],
    notes: list[str],
) -> dict[str, Path]:
    """Write report.html and report.md into ``out_dir``; returns name -> path."""
    context = _context(run_dir, data, tables, notes)
    embedded = {
        name: "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        for name, path in plots.items()
    }
    html = _environment(autoescape=True).get_template("audit_report.html.j2")
    md = _environment(autoescape=False).get_template("audit_report.md.j2")
    html_path, md_path = out_dir / REPORT_HTML, out_dir / REPORT_MD
    html_path.write_text(
        html.render(**context, figures=embedded, numeric_columns=numeric_columns),
        encoding="utf-8",
    )
    md_path.write_text(
        md.render(**context, figures={n: p.name for n, p in plots.items()}, cell=_md_cell),
        encoding="utf-8",
    )
    return {"html": html_path, "md": md_path}

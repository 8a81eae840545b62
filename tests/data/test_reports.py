"""Radiology report paths, section parsing and the text the model reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from omnifuse_model.data.reports.sections import (
    ReportRejected,
    normalize_section_name,
    read_report,
    report_path,
    select_report_text,
    split_sections,
)

# MIMIC-CXR style: every line starts with a space, blank lines are " ", centred title, PHI ___.
REPORT = "\n".join(
    [
        "                                 FINAL REPORT",
        " EXAMINATION:  CHEST (PORTABLE AP)",
        " ",
        " INDICATION:  ___ year old woman with fever and cough  // ? pneumonia",
        " ",
        " TECHNIQUE:  Single portable view of the chest.",
        " ",
        " COMPARISON:  Chest radiograph from ___.",
        " ",
        " FINDINGS: ",
        " ",
        " The heart size is normal.  There is a new right lower lobe opacity",
        " concerning for pneumonia.  No pleural effusion or pneumothorax.",
        " ",
        " Support devices are unchanged.",
        " ",
        " IMPRESSION: ",
        " ",
        " Right lower lobe pneumonia.",
        "",
    ]
)
FINDINGS = (
    "The heart size is normal.  There is a new right lower lobe opacity\n"
    "concerning for pneumonia.  No pleural effusion or pneumothorax.\n"
    "\n"
    "Support devices are unchanged."
)


def strip_leading(text: str) -> str:
    return "\n".join(line.lstrip() for line in text.split("\n"))


def test_report_path() -> None:
    assert report_path(10000032, 50414267) == "files/p10/p10000032/s50414267.txt"
    with pytest.raises(ValueError, match="subject_id"):
        report_path(7, 50414267)


def test_sections_of_a_mimic_report() -> None:
    sections = split_sections(REPORT)
    assert [s.name for s in sections] == [
        "examination",
        "indication",
        "technique",
        "comparison",
        "findings",
        "impression",
    ]
    assert sections[0].text == "CHEST (PORTABLE AP)"
    assert sections[1].text == "___ year old woman with fever and cough  // ? pneumonia"
    assert sections[4].text == FINDINGS
    assert sections[5].text == "Right lower lobe pneumonia."


@pytest.mark.parametrize(
    "transform", [lambda t: t, strip_leading, lambda t: t.replace("\n", "\r\n")]
)
def test_findings_chosen_with_or_without_leading_spaces(transform) -> None:
    chosen = select_report_text(transform(REPORT))
    assert (chosen.section, chosen.text) == ("findings", FINDINGS)


def test_impression_when_findings_absent_or_empty() -> None:
    without = REPORT.replace(" FINDINGS:", " NOTES:")
    chosen = select_report_text(without)
    assert (chosen.section, chosen.text) == ("impression", "Right lower lobe pneumonia.")
    empty_findings = REPORT.split(" FINDINGS:")[0] + " FINDINGS:\n \n IMPRESSION: Clear lungs.\n"
    chosen = select_report_text(empty_findings)
    assert (chosen.section, chosen.text) == ("impression", "Clear lungs.")


def test_last_impression_wins_and_misspelt_headers() -> None:
    text = "FINAL REPORT\nIMPRESSON: First.\n\nFINDINGS AND IMPRESSION: Second.\n"
    chosen = select_report_text(text)
    assert (chosen.section, chosen.text) == ("impression", "Second.")


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("FINDINGS", "findings"),
        ("FINDNGS", "findings"),
        ("FINIDNGS", "findings"),
        ("FINDING", "findings"),
        ("IMPRESSION", "impression"),
        ("IMPRESSON", "impression"),
        ("IMPRESSIONS", "impression"),
        ("FINDINGS AND IMPRESSION", "impression"),
        ("FINDINGS/IMPRESSION", "impression"),
        ("CONCLUSION", "impression"),
        ("PA AND LATERAL VIEWS OF THE CHEST", "findings"),
        ("COMPARISONS", "comparison"),
        ("CLINICAL HISTORY", "history"),
        ("REASON FOR EXAM", "indication"),
        ("INDICATION", "indication"),
        ("EXPRESSION", "expression"),  # close to 'impression', but not close enough
        ("TECHNIQUE", "technique"),
    ],
)
def test_section_name_normalisation(header: str, name: str) -> None:
    assert normalize_section_name(header) == name


def test_last_paragraph_when_no_findings_or_impression() -> None:
    text = (
        "                                 FINAL REPORT\n"
        " CHEST RADIOGRAPH PERFORMED ON ___\n"
        " \n"
        " COMPARISON:  Prior exam from ___.\n"
        " \n"
        " Lungs are clear.  No effusion.\n"
        " \n"
        " No acute process.\n"
    )
    chosen = select_report_text(text)
    assert chosen.section == "last_paragraph"
    assert chosen.text == "Lungs are clear.  No effusion.\n\nNo acute process."


def test_report_without_headers_uses_its_body() -> None:
    chosen = select_report_text("  FINAL REPORT\n \n Heart normal.\n \n Lungs clear.\n")
    assert (chosen.section, chosen.text) == ("last_paragraph", "Heart normal.\n\nLungs clear.")
    chinese = select_report_text("双肺纹理清晰，未见实变。\n心影大小正常。")
    assert chinese.text == "双肺纹理清晰，未见实变。\n心影大小正常。"


def test_addendum_does_not_leak_into_findings() -> None:
    addendum = (
        "                                 FINAL ADDENDUM\n"
        " ADDENDUM:  Findings discussed with Dr. ___ at 10:00.\n"
        " \n"
        " ______________________________________________________________________________\n"
    )
    trailing = (
        " ______________________________________________________________________________\n"
        " ADDENDUM:  Repeat study recommended.\n"
    )
    for text in (addendum + REPORT, REPORT + trailing):
        sections = split_sections(text)
        assert "addendum" in [s.name for s in sections]
        assert select_report_text(text).text == FINDINGS
    impression_only = REPORT.replace(" FINDINGS:", " NOTE:") + trailing
    assert select_report_text(impression_only).text == "Right lower lobe pneumonia."


def test_rejections(tmp_path: Path) -> None:
    cases = {
        "empty.txt": ("", "empty_report"),
        "blank.txt": (" \n \n", "empty_report"),
        "title.txt": ("                                 FINAL REPORT\n \n", "empty_report"),
        "headers.txt": (" EXAMINATION:  CHEST\n INDICATION:  cough\n", "no_text_section"),
    }
    for name, (text, reason) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ReportRejected, match=name) as caught:
            read_report(tmp_path / name)
        assert caught.value.reason == reason, name
    (tmp_path / "latin1.txt").write_bytes(" FINDINGS: caf\xe9\n".encode("latin-1"))
    for name in ("latin1.txt", "absent.txt"):
        with pytest.raises(ReportRejected, match=name) as caught:
            read_report(tmp_path / name)
        assert caught.value.reason == "unreadable"


def test_read_report_round_trip(tmp_path: Path) -> None:
    path = tmp_path / report_path(10000032, 50414267)
    path.parent.mkdir(parents=True)
    path.write_text(REPORT, encoding="utf-8")
    assert read_report(path).text == FINDINGS
    assert read_report(path, preference=("impression",)).text == "Right lower lobe pneumonia."

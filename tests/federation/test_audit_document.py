"""The audit report as a reader gets it (issue #12 points 1, 2, 8): margins and near ties,
observed vs imputed, normalised imputation error, AUROC intervals, failures, cross-site
views, consistent suppression, and the self-contained report.html / report.md."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from omnifuse_model.federation_schema import AuditRow
from server.audit_findings import TIE_MARGIN, lazy_call
from server.audit_log import write_audit
from server.audit_plots import _auroc_limits
from server.audit_report import AuditReport, build_report

MODALITIES = ("ehr", "cxr", "rep")
COMBINATIONS = ("ehr", "cxr", "rep", "ehr+cxr", "ehr+rep", "cxr+rep", "ehr+cxr+rep")


def scores(lazy: str, lazy_score: float, others: dict[str, float | None]) -> dict:
    return {lazy: lazy_score, **others}


def row(site: str, round_: int, **fields) -> AuditRow:
    """A complete audit row; ``fields`` override the defaults."""
    base = {
        "site": site,
        "round": round_,
        "num_examples": 120,
        "availability_counts": {
            "ehr": 40,
            "ehr+cxr": 50,
            "ehr+rep": 30,
            "cxr": 0,
            "rep": 0,
            "cxr+rep": 0,
            "ehr+cxr+rep": 0,
        },
        "tla_scores": {"ehr": 0.30, "ehr+cxr": 0.60, "ehr+rep": 0.40},
        "lazy_combination": "ehr+cxr",
        "mean_dwfuse_weight": {"ehr": 0.5, "cxr": 0.3, "rep": 0.2},
        "imputation_error": {"ehr": 18.96, "cxr": 0.04, "rep": 0.5},
        "imputation_error_normalised": {"ehr": 0.40, "cxr": 0.80, "rep": 0.6},
        "observed_modalities": ["ehr", "cxr", "rep"],
        "min_count": 5,
        "val_auroc": 0.7,
    }
    return AuditRow(**(base | fields))


# hospital_a round 2: "cxr" at 0.410 against 0.404 and 0.401 (the issue's example)
TIE = {"cxr": 0.410, "ehr": 0.404, "rep": 0.401}
NO_REP = {
    "ehr": 60,
    "ehr+cxr": 40,
    "cxr": 0,
    "rep": 0,
    "ehr+rep": 0,
    "cxr+rep": 0,
    "ehr+cxr+rep": 0,
}
SMALL = {"ehr": 26, "ehr+cxr": 12, "ehr+rep": 5, "cxr": None, "rep": 0, "cxr+rep": 0,
         "ehr+cxr+rep": 9}  # fmt: skip
METRICS = {
    str(r): {
        "server": {"test-auroc": 0.62 + 0.04 * r, "test-auroc_low": 0.41 + 0.04 * r,
                   "test-auroc_high": 0.80 + 0.04 * r, "test-n": 30.0},
        "evaluate_clients": {"val-auroc": 0.6},
        "failed_or_rejected": [],
        "evaluate_failed_or_rejected": [],
    }
    for r in (1, 2, 3)
}  # fmt: skip
METRICS["2"]["failed_or_rejected"] = [
    {"node": 7, "status": "rejected", "site": "hospital_c", "reason": "update_norm:2400>1000"}
]
METRICS["3"]["evaluate_failed_or_rejected"] = [
    {"node": 9, "status": "failed", "reason": "ConnectionError: site went away"}
]


def rows() -> list[AuditRow]:
    made = []
    for r in (1, 2, 3):
        made.append(row("hospital_a", r, tla_scores=TIE if r == 2 else {"cxr": 0.5, "ehr": 0.3},
                        lazy_combination="cxr"))  # fmt: skip
        made.append(
            row("hospital_b", r, availability_counts=NO_REP, num_examples=100,
                observed_modalities=["ehr", "cxr"],
                mean_dwfuse_weight={"ehr": 0.3, "cxr": 0.2, "rep": 0.5},
                imputation_error={"ehr": 1.0, "cxr": 2.0, "rep": None},
                imputation_error_normalised={"ehr": 0.5, "cxr": 0.7, "rep": None},
                lazy_combination="ehr" if r < 3 else "ehr+cxr",
                tla_scores={"ehr": 0.9, "ehr+cxr": 0.5} if r < 3 else {"ehr": 0.2, "ehr+cxr": 0.5})
        )  # fmt: skip
        made.append(row("hospital_c", r, availability_counts=SMALL, num_examples=52))
    return made


def run_dir(tmp_path: Path, audit: list[AuditRow] | None = None, metrics=METRICS) -> Path:
    write_audit(tmp_path, rows() if audit is None else audit)
    if metrics is not None:
        (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    return tmp_path


def cells(report: AuditReport, table: str, *key: str) -> dict[str, str]:
    """The row of ``table`` whose first cells are ``key``, as {column: cell}."""
    rendered = report.tables[table]
    found = [r for r in rendered.rows if tuple(r[: len(key)]) == key]
    assert len(found) == 1, (table, key, rendered.rows)
    return dict(zip(rendered.columns, found[0], strict=False))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> AuditReport:
    return build_report(run_dir(tmp_path_factory.mktemp("run")))


# -- margins and near ties --------------------------------------------------------------------
def test_issue_example_is_a_near_tie_with_its_margin(report):
    call = report.data["lazy_calls"]["hospital_a"][1]
    assert call["lazy"] == "cxr" and call["runner_up"] == "ehr"
    assert call["margin"] == pytest.approx(0.006)
    assert call["relative_margin"] == pytest.approx(0.006 / 0.410)
    assert call["near_tie"] is True
    assert report.tables["lazy_timeline"].rows[0] == ["hospital_a", "cxr", "cxr?", "cxr"]
    margin = cells(report, "lazy_margins", "hospital_a", "2")
    assert margin["margin"] == "0.006" and margin["margin %"] == "1.5%"
    assert margin["verdict"] == "near tie"
    assert cells(report, "lazy_margins", "hospital_a", "1")["verdict"] == "clear"
    assert f"{TIE_MARGIN:.0%}" in report.tables["lazy_timeline"].caption


def test_margin_is_an_upper_bound_when_a_score_was_suppressed():
    call = lazy_call(row("s", 1, tla_scores={"ehr": 0.5, "cxr": 0.3, "rep": None},
                         lazy_combination="ehr"))  # fmt: skip
    assert call["unpublished"] == 1 and call["near_tie"] is False
    alone = lazy_call(row("s", 1, tla_scores={"ehr": 0.5}, lazy_combination="ehr"))
    assert alone["near_tie"] is None and alone["margin"] is None


def test_margins_table_says_when_scores_were_withheld(tmp_path):
    audit = [row("s", 1, tla_scores={"ehr": 0.5, "cxr": 0.49, "rep": None}, lazy_combination="ehr")]
    report = build_report(run_dir(tmp_path, audit, None))
    assert cells(report, "lazy_margins", "s", "1")["verdict"] == "near tie (1 suppressed)"


# -- observed vs imputed, normalised imputation error ----------------------------------------
def test_weights_of_a_modality_the_site_lacks_are_marked_imputed(report):
    weights = cells(report, "dwfuse_weights", "hospital_b")
    assert weights["rep"].endswith("imputed") and weights["rep"].startswith("0.500")
    assert not weights["ehr"].endswith("imputed")
    profile = cells(report, "weight_profile", "hospital_b")
    assert profile["rep weight"] == "0.500 imputed" and profile["rep held"] == "0%"
    assert profile["ehr held"] == "100%" and profile["cxr held"] == "40%"
    assert not any("imputed" in c for c in cells(report, "dwfuse_weights", "hospital_a").values())


def test_imputation_error_is_normalised_and_absent_where_not_held(report):
    a = cells(report, "imputation_error", "hospital_a")
    assert a["ehr"] == "0.40 (raw 19)" and a["cxr"] == "0.80 (raw 0.04)"
    assert cells(report, "imputation_error", "hospital_b")["rep"] == "not held"
    assert "1 - R^2" in report.tables["imputation_error"].title


def test_rows_without_held_modalities_derive_them_from_availability(tmp_path):
    """Rows written before ``observed_modalities`` existed still decode; availability says
    which modalities the site holds."""
    old = row("old", 1, availability_counts=NO_REP).model_dump(mode="json")
    for key in ("observed_modalities", "imputation_error_normalised", "min_count"):
        del old[key]
    (tmp_path / "audit.json").write_text(json.dumps([old]))
    report = build_report(tmp_path)
    assert report.data["observed"]["old"] == {"modalities": ["ehr", "cxr"],
                                              "source": "availability counts"}  # fmt: skip
    assert cells(report, "dwfuse_weights", "old")["rep"].endswith("imputed")


# -- AUROC with intervals, failures -----------------------------------------------------------
def test_server_test_auroc_has_its_interval_and_n(report):
    assert cells(report, "round_metrics", "2")["server test AUROC [95% CI]"] == (
        "0.700 [0.49, 0.88]"
    )
    assert "n = 30 stays" in report.tables["round_metrics"].caption


def test_auroc_axis_is_never_zoomed():
    assert _auroc_limits([0.66, 0.70, 0.74]) == (0.5, 1.0)
    assert _auroc_limits([0.45, 0.70]) == (0.0, 1.0)
    assert _auroc_limits([]) == (0.5, 1.0)


def test_failures_and_rejections_per_round(report):
    rows_ = report.tables["failures"].rows
    assert ["2", "train", "hospital_c", "rejected", "update_norm:2400>1000"] in rows_
    assert ["3", "evaluate", "node 9", "failed", "ConnectionError: site went away"] in rows_


def test_rejections_come_from_the_audit_without_metrics_json(tmp_path):
    audit = [row("s", 1, update_status="rejected:bad_audit:x")]
    report = build_report(run_dir(tmp_path, audit, None))
    assert report.tables["failures"].rows == [["1", "train", "s", "rejected", "bad_audit:x"]]


# -- cross-site view --------------------------------------------------------------------------
def test_lazy_frequency_per_site(report):
    b = cells(report, "lazy_frequency", "hospital_b")
    assert b["ehr"] == "2/3" and b["ehr+cxr"] == "1/3" and b["most often"] == "ehr (67%)"
    a = cells(report, "lazy_frequency", "hospital_a")
    assert a["cxr"] == "3/3" and a["near ties"] == "1"


# -- suppression ------------------------------------------------------------------------------
def test_min_count_raises_the_threshold_and_the_caption_is_true(tmp_path):
    report = build_report(run_dir(tmp_path), min_count=30)
    c = cells(report, "availability", "hospital_c")
    assert c["ehr"] == "<30" and c["ehr+cxr"] == "<30" and c["ehr+rep"] == "<30"
    assert c["cxr"] == "<30" and c["rep"] == "0"
    assert cells(report, "availability", "hospital_a")["ehr+cxr"] == "50"
    assert "fewer than 30" in report.tables["availability"].caption
    shown = [int(x) for r in report.tables["availability"].rows for x in r[3:] if x.isdigit()]
    assert all(v == 0 or v >= 30 for v in shown)  # the caption holds for every cell
    # a cell the site published but the report hides cannot come back by subtraction
    assert c["samples"] == "hidden" and "hidden too" in report.tables["availability"].caption
    assert cells(report, "availability", "hospital_b")["samples"] == "100"  # nothing hidden
    assert cells(report, "weight_profile", "hospital_c")["ehr held"] == "-"


def test_min_count_cannot_lower_the_sites_threshold(tmp_path):
    report = build_report(run_dir(tmp_path), min_count=2)
    c = cells(report, "availability", "hospital_c")
    assert c["cxr"] == "<5" and c["ehr+rep"] == "5"  # suppressed at the site: stays '<5'
    assert c["samples"] == "52"  # nothing newly hidden: the total stays
    assert "fewer than 5" in report.tables["availability"].caption
    assert any("--min-count 2 is below" in note for note in report.notes)


def test_threshold_reported_by_the_rows_wins_over_the_run_config(tmp_path):
    audit = [row("s", 1, availability_counts=SMALL, num_examples=52, min_count=10)]
    (tmp_path / "run_config.json").write_text(json.dumps({"audit_min_count": 5}))
    report = build_report(run_dir(tmp_path, audit, None))
    assert cells(report, "availability", "s")["ehr+cxr+rep"] == "<10"
    assert report.data["min_count"] == 10


def test_min_count_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="--min-count"):
        build_report(run_dir(tmp_path), min_count=0)


# -- the documents ----------------------------------------------------------------------------
class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data") and value is not None:
                self.links.append((tag, name, value))


def test_html_is_self_contained(report):
    html = report.documents["html"].read_text()
    parser = _Links()
    parser.feed(html)
    images = [v for tag, name, v in parser.links if tag == "img"]
    assert len(images) == len(report.plots)
    assert all(v.startswith("data:image/png;base64,") for v in images)
    others = [v for tag, _, v in parser.links if tag != "img"]
    assert others and all(v.startswith("#") for v in others)  # in-page links only
    assert not re.search(r"url\(|@import|<script|<link", html)


def test_html_holds_the_guide_tables_and_captions(report):
    html = unescape(report.documents["html"].read_text())
    assert html.index("How to read this report") < html.index("Lazy modality combination")
    for table in report.tables.values():
        assert table.title in html
    assert "cxr?" in html and "0.700 [0.49, 0.88]" in html and "imputed" in html


def test_markdown_report_is_written_beside_its_figures(report):
    md = report.documents["md"].read_text()
    assert md.startswith("# Audit report") and "## How to read this report" in md
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(figures) == sorted(p.name for p in report.plots.values())
    assert all((report.out_dir / name).is_file() for name in figures)
    assert "| hospital_a | cxr | cxr? | cxr |" in md


def test_html_escapes_site_names(tmp_path):
    report = build_report(run_dir(tmp_path, [row("<b>x</b>", 1)], None))
    html = report.documents["html"].read_text()
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs the chromium binary (.ci/run)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    """The page renders in a real browser: the screenshot is tall and not blank."""
    shot = tmp_path / "report.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--screenshot={shot}", "--window-size=1280,4000",
         report.documents["html"].resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    with Image.open(shot) as image:
        assert image.size == (1280, 4000)
        colours = image.convert("L").resize((64, 200)).getextrema()
    assert colours[0] < 100 < colours[1]  # text and figures on a light page

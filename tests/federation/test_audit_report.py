"""`build_report` / `print_report` on small hand-made run directories.

The main fixture is three sites over three rounds: 'gamma' holds no chest X-rays (its cxr
weights and errors are None), some availability cells are suppressed (None), metrics.json
marks one undefined AUROC with -1.0 and has one round without a server evaluation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from omnifuse_model.federation_schema import AuditRow
from server.audit_log import write_audit
from server.audit_report import AuditReport, build_report, print_report

MODALITIES = ("ehr", "cxr", "rep")
COMBINATIONS = ("ehr", "cxr", "rep", "ehr+cxr", "ehr+rep", "cxr+rep", "ehr+cxr+rep")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = (
    "auroc_per_round",
    "lazy_combination_timeline",
    "lazy_frequency",
    "modality_weights",
    "weight_profile",
    "availability",
)

LAZY = {
    "alpha": ["ehr", "cxr", "cxr"],
    "beta": [None, "ehr+rep", "ehr+rep"],
    "gamma": ["rep", "rep", "ehr"],
}
COUNTS = {
    "alpha": {"ehr": 40, "cxr": 12, "rep": None, "ehr+cxr": 30, "ehr+rep": 25,
              "cxr+rep": 9, "ehr+cxr+rep": 80},
    "beta": {"ehr": 60, "cxr": 20, "rep": 15, "ehr+cxr": 50, "ehr+rep": 35,
             "cxr+rep": None, "ehr+cxr+rep": 40},
    "gamma": {"ehr": 70, "cxr": 0, "rep": 22, "ehr+cxr": 0, "ehr+rep": 90,
              "cxr+rep": 0, "ehr+cxr+rep": 0},
}  # fmt: skip
VAL_AUROC = {"alpha": [0.60, 0.70, 0.75], "beta": [0.55, 0.65, 0.72], "gamma": [0.50, None, 0.70]}
METRICS = {
    "1": {
        "train": {"num-examples": 900.0, "train-loss": 1.2, "val-auroc": 0.55},
        "evaluate_clients": {"num-examples": 300.0, "val-auroc": 0.61, "val-auprc": 0.4},
        "server": {"test-auroc": 0.60, "test-auprc": 0.35},
        "bytes": {"sent": 3000, "received": 2500},
        "wall_seconds": 12.5,
    },
    "2": {
        "train": {"num-examples": 900.0, "train-loss": 1.0, "val-auroc": 0.65},
        "evaluate_clients": {"num-examples": 300.0, "val-auroc": -1.0, "val-auprc": -1.0},
        "server": {"test-auroc": 0.65, "test-auprc": 0.4},
        "bytes": {"sent": 3000, "received": 2600},
        "wall_seconds": 3.25,
    },
    "3": {
        "train": {"num-examples": 900.0, "train-loss": 0.9, "val-auroc": 0.7},
        "evaluate_clients": {"num-examples": 300.0, "val-auroc": 0.70, "val-auprc": 0.5},
        "server": {},
        "bytes": {"sent": 3000, "received": 2700},
        "wall_seconds": 3.0,
    },
}


def weight(site: str, modality: str, round_: int) -> float | None:
    """Made-up DWFuse weights: None for the modality 'gamma' lacks."""
    if site == "gamma" and modality == "cxr":
        return None
    return round(0.5 + 0.1 * MODALITIES.index(modality) + 0.01 * round_, 4)


def make_row(site: str, round_: int, **overrides) -> AuditRow:
    """An audit row of the fixture run; ``overrides`` replace any field."""
    counts = COUNTS[site]
    fields = {
        "site": site,
        "round": round_,
        "num_examples": sum(v for v in counts.values() if v is not None),
        "availability_counts": counts,
        # the lazy combination wins clearly (0.80 against 0.69): no near tie
        "tla_scores": {
            c: (0.80 if c == LAZY[site][round_ - 1] else 0.69) if counts[c] else None
            for c in COMBINATIONS
        },
        "lazy_combination": LAZY[site][round_ - 1],
        "mean_dwfuse_weight": {m: weight(site, m, round_) for m in MODALITIES},
        "imputation_error": {
            m: None if site == "gamma" and m == "cxr" else 0.1 * (round_ + 1) for m in MODALITIES
        },
        "imputation_error_normalised": {
            m: None if site == "gamma" and m == "cxr" else 0.25 for m in MODALITIES
        },
        "val_auroc": VAL_AUROC[site][round_ - 1],
        "epsilon": 0.5 * round_ if site == "alpha" else None,
    }
    return AuditRow(**(fields | overrides))


def table_row(report: AuditReport, table: str, site: str) -> dict[str, str]:
    """One site's row of a rendered table as {column: cell}."""
    rendered = report.tables[table]
    row = next(r for r in rendered.rows if r[0] == site)
    return dict(zip(rendered.columns, row, strict=True))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> AuditReport:
    run_dir = tmp_path_factory.mktemp("run")
    write_audit(run_dir, [make_row(s, r) for r in (1, 2, 3) for s in LAZY])
    (run_dir / "metrics.json").write_text(json.dumps(METRICS))
    return build_report(run_dir)


def test_writes_valid_png_plots_in_default_out_dir(report):
    assert report.out_dir == report.run_dir / "audit_report"
    assert set(report.plots) == set(PLOTS)
    for name in PLOTS:
        path = report.plots[name]
        assert path == report.out_dir / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert path.stat().st_size > 5_000


def test_report_json_holds_timeline_and_tables(report):
    saved = json.loads(report.report_json.read_text())
    assert saved["data"]["sites"] == ["alpha", "beta", "gamma"]
    assert saved["data"]["rounds"] == [1, 2, 3]
    assert saved["data"]["lazy_timeline"] == LAZY
    assert saved["tables"]["lazy_timeline"]["columns"] == ["site", "r1", "r2", "r3"]
    assert saved["tables"]["lazy_timeline"]["rows"][1] == ["beta", "-", "ehr+rep", "ehr+rep"]
    assert saved["data"]["local_val_auroc"] == VAL_AUROC
    assert saved["plots"]["availability"] == "availability.png"
    assert saved["tables"] == {name: table.to_json() for name, table in report.tables.items()}


def test_suppressed_counts_render_as_below_threshold(report):
    alpha = table_row(report, "availability", "alpha")
    assert alpha["rep"] == "<5"
    assert alpha["ehr+cxr+rep"] == "80"
    assert table_row(report, "availability", "beta")["cxr+rep"] == "<5"
    assert table_row(report, "availability", "gamma")["cxr"] == "0"
    assert "suppressed" in report.tables["availability"].caption
    assert report.data["availability"]["alpha"]["counts"]["rep"] is None


def test_round_metrics_come_from_metrics_json(report):
    metrics = {m["round"]: m for m in report.data["round_metrics"]}
    assert [metrics[r]["federated_val_auroc"] for r in (1, 2, 3)] == [0.61, None, 0.70]
    assert [metrics[r]["server_test_auroc"] for r in (1, 2, 3)] == [0.60, 0.65, None]
    assert metrics[2]["bytes_received"] == 2600
    assert metrics[2]["wall_seconds"] == 3.25
    assert metrics[2]["mean_local_val_auroc"] == pytest.approx((0.70 + 0.65) / 2)
    rendered = report.tables["round_metrics"].rows
    assert rendered[1][:5] == ["2", "3", "0.675", "-", "0.650"]
    assert rendered[2][4] == "-"


def test_weights_imputation_and_epsilon_tables(report):
    alpha = report.data["dwfuse_weight"]["alpha"]["ehr"]
    assert alpha["first"] == 0.51 and alpha["last"] == 0.53
    assert alpha["change"] == pytest.approx(0.02)
    assert table_row(report, "dwfuse_weights", "alpha")["ehr"] == "0.530 (+0.020)"
    assert table_row(report, "dwfuse_weights", "gamma")["cxr"] == "-"
    assert report.data["dwfuse_weight_series"]["gamma"]["cxr"] == [None, None, None]
    assert table_row(report, "imputation_error", "gamma") == {
        "site": "gamma", "round": "3", "ehr": "0.25 (raw 0.4)", "cxr": "not held",
        "rep": "0.25 (raw 0.4)",
    }  # fmt: skip
    assert table_row(report, "epsilon", "alpha") == {
        "site": "alpha", "r1": "0.50", "r2": "1.00", "r3": "1.50"
    }  # fmt: skip
    assert table_row(report, "epsilon", "beta")["r3"] == "-"


def test_print_report_shows_sites_and_combinations(report):
    console = Console(record=True, width=200)
    print_report(report, console)
    text = console.export_text()
    for name in ["alpha", "beta", "gamma", "ehr+rep", "cxr", "<5", "Global metrics per round"]:
        assert name in text
    assert "suppressed" in text


def test_empty_audit_is_an_error_naming_the_file(tmp_path):
    write_audit(tmp_path, [])
    with pytest.raises(ValueError, match="audit.json"):
        build_report(tmp_path)


def test_missing_audit_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="audit.json"):
        build_report(tmp_path)


def test_missing_metrics_json_reports_from_audit_only(tmp_path):
    write_audit(tmp_path, [make_row(s, r) for r in (1, 2) for s in ("alpha", "beta")])
    report = build_report(tmp_path, out_dir=tmp_path / "out")
    assert report.out_dir == tmp_path / "out"
    assert any("metrics.json" in note for note in report.notes)
    assert report.data["metrics_found"] is False
    round_1 = report.tables["round_metrics"].rows[0]
    assert round_1 == ["1", "2", "0.575", "-", "-", "-", "-", "-"]
    assert all(path.read_bytes()[:8] == PNG_MAGIC for path in report.plots.values())


def test_one_site_one_round(tmp_path):
    write_audit(tmp_path, [make_row("alpha", 1, epsilon=None)])
    (tmp_path / "metrics.json").write_text(json.dumps({"1": METRICS["1"]}))
    report = build_report(tmp_path)
    assert report.tables["lazy_timeline"].rows == [["alpha", "ehr"]]
    assert table_row(report, "dwfuse_weights", "alpha")["rep"] == "0.710"  # no change shown
    assert "epsilon" not in report.tables
    assert all(path.stat().st_size > 1_000 for path in report.plots.values())
    print_report(report, Console(record=True, width=160))


def test_fields_missing_everywhere_render_as_dashes(tmp_path):
    """None everywhere, plus NaN (which audit.json can hold) for one site: all shown as '-'."""
    nothing = {m: None for m in MODALITIES}
    not_a_number = {"ehr": math.nan, "cxr": None, "rep": None}
    rows = [
        make_row(
            site,
            round_,
            num_examples=None,
            availability_counts={c: None for c in COMBINATIONS},
            tla_scores={},
            lazy_combination=None,
            mean_dwfuse_weight=not_a_number if site == "alpha" else nothing,
            imputation_error=not_a_number if site == "alpha" else nothing,
            imputation_error_normalised=not_a_number if site == "alpha" else nothing,
            val_auroc=math.nan if site == "alpha" else None,
            epsilon=None,
        )
        for site in ("alpha", "beta")
        for round_ in (1, 2)
    ]
    write_audit(tmp_path, rows)
    undefined = {"evaluate_clients": {"val-auroc": -1.0}, "server": {"test-auroc": -1.0}}
    (tmp_path / "metrics.json").write_text(json.dumps({"1": undefined, "2": {}}))
    report = build_report(tmp_path)
    assert report.tables["lazy_timeline"].rows == [["alpha", "-", "-"], ["beta", "-", "-"]]
    for site in ("alpha", "beta"):
        assert set(table_row(report, "dwfuse_weights", site).values()) == {site, "-"}
    assert table_row(report, "imputation_error", "alpha")["ehr"] == "-"
    json.loads(report.report_json.read_text())  # strict JSON: no NaN slipped through
    assert set(report.tables["round_metrics"].rows[0][2:]) == {"-"}
    assert table_row(report, "availability", "alpha")["samples"] == "<5"
    assert all(path.read_bytes()[:8] == PNG_MAGIC for path in report.plots.values())
    print_report(report, Console(record=True, width=160))


def test_threshold_from_run_config_or_argument(tmp_path):
    write_audit(tmp_path, [make_row("beta", 1)])
    (tmp_path / "run_config.json").write_text(json.dumps({"audit_min_count": 10}))
    assert table_row(build_report(tmp_path), "availability", "beta")["cxr+rep"] == "<10"
    explicit = build_report(tmp_path, min_count=20)
    assert table_row(explicit, "availability", "beta")["cxr+rep"] == "<20"
    assert "fewer than 20" in explicit.tables["availability"].caption


def test_corrupt_metrics_json_is_an_error_naming_the_file(tmp_path: Path):
    write_audit(tmp_path, [make_row("alpha", 1)])
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="metrics.json"):
        build_report(tmp_path)


def test_console_tables_fit_80_columns_without_cutting_names(tmp_path):
    """Piped output or an 80-column terminal: every line fits, nothing becomes 'hospi…'; a
    long name wraps inside its cell instead."""
    long_names = {"alpha": "hospital_alpha_university_medical_centre", "beta": "hospital_beta"}
    rows = [
        make_row(site, r).model_copy(update={"site": name})
        for site, name in long_names.items()
        for r in (1, 2, 3)
    ]
    write_audit(tmp_path, rows)
    console = Console(record=True, width=80)
    print_report(build_report(tmp_path), console)
    text = console.export_text()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    flattened = "".join(text.split())  # a folded name reads whole once the wrapping goes
    assert all(name in flattened for name in long_names.values())


def test_the_weight_is_labelled_as_the_test_time_confidence_weight(report):
    """The reported omega comes from label-free test-time passes: every place that shows it
    says so, and that it is not the training omega (issue #11 point 5d)."""
    for name in ("dwfuse_weights", "weight_profile"):
        table = report.tables[name]
        assert "test-time" in table.title.lower() and "confidence" in table.title.lower()
        assert "test time" in table.caption or "test-time" in table.caption
    caption = report.tables["dwfuse_weights"].caption
    assert "not the omega that weighted training" in caption
    assert "does not enter the prediction" in caption
    for document in ("report.md", "report.html"):
        text = (report.out_dir / document).read_text()
        assert "not the omega that weighted training" in text
        assert "Mean DWFuse weight" not in text


@pytest.mark.parametrize(
    ("round_", "field", "value", "where"),
    [
        ("2", "server", [1], "field 'server'"),
        ("2", "bytes", [1, 2], "field 'bytes'"),
        ("2", "server", {"test-auroc": "high"}, "field 'server.test-auroc'"),
        ("2", "wall_seconds", "x", "field 'wall_seconds'"),
        ("2", "bytes", {"sent": True}, "field 'bytes.sent'"),
        ("2", "failed_or_rejected", ["boom"], "field 'failed_or_rejected.0'"),
    ],
)
def test_a_malformed_metrics_entry_is_an_error_naming_file_round_and_field(
    tmp_path, round_, field, value, where
):
    """'server': [1] was a traceback (AttributeError on 'list'); 'test-auroc': 'high' and
    'wall_seconds': 'x' were shown as '-', as if the value were missing."""
    write_audit(tmp_path, [make_row("alpha", 1), make_row("alpha", 2)])
    metrics = json.loads(json.dumps(METRICS))
    metrics[round_][field] = value
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match=f"metrics.json: round {round_}: {where}: .*, got"):
        build_report(tmp_path)


@pytest.mark.parametrize("history", [{"1": [1]}, {"1": {}, "01": {"wall_seconds": 2.0}}])
def test_metrics_json_must_map_distinct_round_numbers_to_entries(tmp_path, history):
    """A round entry that was not an object was dropped silently; '01' replaced '1'."""
    write_audit(tmp_path, [make_row("alpha", 1)])
    (tmp_path / "metrics.json").write_text(json.dumps(history))
    with pytest.raises(ValueError, match="metrics.json: "):
        build_report(tmp_path)


def test_a_second_audit_row_for_a_site_and_round_is_an_error_naming_them(tmp_path):
    """The second row silently replaced the first (lazy combination and AUROC changed)."""
    rows = [make_row("alpha", 1), make_row("beta", 1)]
    write_audit(tmp_path, rows)
    path = tmp_path / "audit.json"
    dumped = json.loads(path.read_text())
    edited = dict(dumped[0], lazy_combination="rep", val_auroc=0.99)
    path.write_text(json.dumps([*dumped, edited]))
    with pytest.raises(
        ValueError, match="audit.json: row 2: a second row for site 'alpha' round 1"
    ):
        build_report(tmp_path)

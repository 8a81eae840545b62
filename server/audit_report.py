"""The auditor's report of a federated run: rich tables, PNG figures, report.json, and one
self-contained document to read or send (report.html, report.md; ``audit_html``).

Reads ``run_dir/audit.json`` (per-site, per-round aggregates, see ``AuditRow``) and, when
present, ``run_dir/metrics.json`` (per-round global metrics written by the ServerApp). The
report answers the questions of an auditor or consortium lead: which modality combination
is lazy at which site and round, how DWFuse weights and imputation quality evolve, how many
samples hold each modality combination (small cells suppressed), how the global model does
per round, and how much privacy budget each site has spent.

metrics.json is validated first (``audit_metrics``): a value that is not a number or null
is an error naming the round and field, as is a second audit row for a (site, round).
Missing values (None in the audit, -1 or non-finite in metrics.json) are shown as '-' in
tables and are left out of figures (a series with no values is not drawn); suppressed
counts are shown as '<k', k = the sites' threshold raised (never lowered) by ``min_count``.
What is read out beyond the rows (margins, observed/imputed, cross-site views, failures)
is in ``audit_findings``; the tables in ``audit_tables``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from omnifuse_model.federation_schema import VAL_AUROC, AuditRow, finite_or_none
from server import audit_findings as findings
from server.audit_html import write_documents
from server.audit_log import AUDIT_JSON, check_unique, read_audit
from server.audit_metrics import METRICS_JSON, read_metrics
from server.audit_plots import write_plots
from server.audit_tables import MISSING, ReportTable, build_tables

RUN_CONFIG_JSON = "run_config.json"
REPORT_JSON = "report.json"
DEFAULT_OUT = "audit_report"
DEFAULT_MIN_COUNT = 5
UNDEFINED_METRIC = -1.0  # what clients report for a metric that is undefined (e.g. one class)
__all__ = ["MISSING", "AuditReport", "ReportTable", "build_data", "build_report", "print_report"]


@dataclass
class AuditReport:
    """Where the report went and what it holds.

    ``data`` keeps raw values (None = missing or suppressed; per-round lists aligned with
    ``data['rounds']``); ``tables`` the same content as rendered strings.
    """

    run_dir: Path
    out_dir: Path
    report_json: Path
    plots: dict[str, Path]
    documents: dict[str, Path]
    tables: dict[str, ReportTable]
    data: dict
    notes: list[str] = field(default_factory=list)


# -- reading ---------------------------------------------------------------------------------
def _metric(value: object) -> float | None:
    """A metric value, or None when absent, non-numeric, non-finite or the -1 sentinel."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if math.isnan(value) or math.isinf(value) or value == UNDEFINED_METRIC:
        return None
    return float(value)


def _min_count_of_run(run_dir: Path) -> int:
    """The run's suppression threshold (run_config.json 'audit_min_count'), else 5."""
    path = run_dir / RUN_CONFIG_JSON
    try:
        value = json.loads(path.read_text()).get("audit_min_count", DEFAULT_MIN_COUNT)
        return int(value)
    except (OSError, json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return DEFAULT_MIN_COUNT


def _ordered_union(mappings: list[dict]) -> list[str]:
    """Keys of all mappings in order of first appearance (keeps the model's modality order)."""
    return list(dict.fromkeys(key for mapping in mappings for key in mapping))


# -- the report's data -----------------------------------------------------------------------
def _round_metrics(
    rounds: list[int], by_site: dict[str, dict[int, AuditRow]], history: dict[int, dict] | None
) -> list[dict]:
    """Per-round global metrics: local AUROC over sites (audit) and metrics.json values
    (the server test AUROC with its bootstrap interval and test-set size)."""
    result = []
    for round_ in sorted(set(rounds) | set(history or {})):
        local = [_metric(r[round_].val_auroc) for r in by_site.values() if round_ in r]
        defined = [v for v in local if v is not None]
        entry = (history or {}).get(round_, {})
        nbytes, server = entry.get("bytes") or {}, entry.get("server") or {}
        result.append(
            {
                "round": round_,
                "sites_reporting": len(local),
                "mean_local_val_auroc": statistics.fmean(defined) if defined else None,
                "federated_val_auroc": _metric(
                    (entry.get("evaluate_clients") or {}).get(VAL_AUROC)
                ),
                "server_test_auroc": _metric(server.get("test-auroc")),
                "server_test_auroc_low": _metric(server.get("test-auroc_low")),
                "server_test_auroc_high": _metric(server.get("test-auroc_high")),
                "server_test_n": _metric(server.get("test-n")),
                "bytes_sent": _metric(nbytes.get("sent")),
                "bytes_received": _metric(nbytes.get("received")),
                "wall_seconds": _metric(entry.get("wall_seconds")),
            }
        )
    return result


def _weights_summary(rows: dict[int, AuditRow], modalities: list[str]) -> dict:
    """Per modality: weight in the site's first and last round and the change between."""
    first, last = rows[min(rows)], rows[max(rows)]
    summary = {}
    for modality in modalities:
        start = finite_or_none(first.mean_dwfuse_weight.get(modality))
        end = finite_or_none(last.mean_dwfuse_weight.get(modality))
        change = (
            end - start if start is not None and end is not None and first is not last else None
        )
        summary[modality] = {"first": start, "last": end, "change": change}
    return summary


def _site_views(
    by_site: dict[str, dict[int, AuditRow]],
    rounds: list[int],
    modalities: list[str],
    threshold: findings.Threshold,
    tie_margin: float,
) -> dict:
    """Per-site entries of the report's data (see ``build_data``)."""
    sites = sorted(by_site)
    last = {s: by_site[s][max(by_site[s])] for s in sites}

    def per_round(site: str, value: Callable[[AuditRow], object]) -> list:
        return [value(by_site[site][r]) if r in by_site[site] else None for r in rounds]

    calls = {s: per_round(s, lambda r: findings.lazy_call(r, tie_margin)) for s in sites}
    observed = {s: findings.observed_modalities(last[s], modalities) for s in sites}
    return {
        "lazy_timeline": {s: per_round(s, lambda r: r.lazy_combination) for s in sites},
        "lazy_calls": calls,
        "lazy_frequency": {s: findings.lazy_frequency(calls[s]) for s in sites},
        "observed": {s: {"modalities": held, "source": src} for s, (held, src) in observed.items()},
        "local_val_auroc": {s: per_round(s, lambda r: _metric(r.val_auroc)) for s in sites},
        "dwfuse_weight_series": {
            s: {
                m: per_round(s, lambda r, m=m: finite_or_none(r.mean_dwfuse_weight.get(m)))
                for m in modalities
            }
            for s in sites
        },
        "dwfuse_weight": {s: _weights_summary(by_site[s], modalities) for s in sites},
        "weight_profile": {
            s: findings.weight_profile(by_site[s], modalities, threshold) for s in sites
        },
        "availability": {s: findings.published_counts(last[s], threshold) for s in sites},
        "imputation_error": {
            s: {
                "round": last[s].round,
                "errors": {m: finite_or_none(last[s].imputation_error.get(m)) for m in modalities},
                "normalised": {
                    m: finite_or_none(last[s].imputation_error_normalised.get(m))
                    for m in modalities
                },
            }
            for s in sites
        },
        "epsilon": {s: per_round(s, lambda r: finite_or_none(r.epsilon)) for s in sites},
        "update_status": {s: per_round(s, lambda r: r.update_status) for s in sites},
    }


def build_data(
    rows: list[AuditRow],
    history: dict[int, dict] | None,
    threshold: findings.Threshold,
    tie_margin: float = findings.TIE_MARGIN,
) -> dict:
    """The report's raw content (JSON-safe; None = missing or suppressed).

    Per-round values are lists aligned with ``rounds``; a site without a row in a round
    gets None there. Availability and imputation error come from each site's last round;
    counts below ``threshold.used`` are suppressed (None).
    """
    check_unique(rows, "audit rows")  # a duplicate (site, round) would replace the first
    by_site: dict[str, dict[int, AuditRow]] = {}
    for row in rows:
        by_site.setdefault(row.site, {})[row.round] = row
    rounds = sorted({row.round for row in rows})
    modalities = _ordered_union(
        [m for r in rows for m in (r.mean_dwfuse_weight, r.imputation_error)]
    )
    combinations = _ordered_union(
        [c for r in rows for c in (r.availability_counts, r.tla_scores)]
        + [{r.lazy_combination: None} for r in rows if r.lazy_combination]
    )
    data = {
        "sites": sorted(by_site),
        "rounds": rounds,
        "modalities": modalities,
        "combinations": combinations,
        "min_count": threshold.used,
        "site_min_count": threshold.site,
        "requested_min_count": threshold.requested,
        "tie_margin": tie_margin,
        "metrics_found": history is not None,
        **_site_views(by_site, rounds, modalities, threshold, tie_margin),
        "round_metrics": _round_metrics(rounds, by_site, history),
        "failures": findings.failures(history, rows),
    }
    if not any(v is not None for series in data["epsilon"].values() for v in series):
        data["epsilon"] = None
    return data


# -- entry points ----------------------------------------------------------------------------
def _notes(run_dir: Path, data: dict, threshold: findings.Threshold) -> list[str]:
    notes = []
    if (note := threshold.note()) is not None:
        notes.append(note)
    if not data["metrics_found"]:
        notes.append(
            f"{run_dir / METRICS_JSON} not found: federated evaluation, server test, bytes, "
            "wall-clock and failure entries are empty; everything else comes from the audit table."
        )
    unknown = [s for s in data["sites"] if data["observed"][s]["modalities"] is None]
    if unknown:
        notes.append(
            f"Sites {', '.join(unknown)} report neither held modalities nor availability: their "
            "weights cannot be labelled observed or imputed."
        )
    if data["epsilon"] is None:
        notes.append("No site reported a DP epsilon (no local differential privacy).")
    return notes


def build_report(
    run_dir: Path,
    out_dir: Path | None = None,
    min_count: int | None = None,
    tie_margin: float = findings.TIE_MARGIN,
) -> AuditReport:
    """Read a run's audit (and metrics), write figures, report.json, report.html and
    report.md, and return the report.

    ``out_dir`` defaults to ``run_dir/audit_report``. ``min_count`` can only raise the
    suppression threshold above the one the sites applied (each row's ``min_count``, else
    the run's ``audit_min_count``, else 5): a cell suppressed at a site stays suppressed.
    Raises FileNotFoundError / ValueError naming audit.json when it is missing or empty.
    """
    run_dir = Path(run_dir)
    rows = read_audit(run_dir)
    if not rows:
        raise ValueError(f"{run_dir / AUDIT_JSON}: the audit table has no rows")
    if min_count is not None and min_count < 1:
        raise ValueError(f"--min-count: expected a positive integer, got {min_count}")
    history = read_metrics(run_dir)
    threshold = findings.Threshold(
        findings.site_threshold(rows, _min_count_of_run(run_dir)), min_count
    )
    data = build_data(rows, history, threshold, tie_margin)
    notes = _notes(run_dir, data, threshold)
    out = Path(out_dir) if out_dir is not None else run_dir / DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(out, data)
    tables = build_tables(data)
    report_json = out / REPORT_JSON
    payload = {
        "run_dir": str(run_dir),
        "notes": notes,
        "plots": {name: path.name for name, path in plots.items()},
        "tables": {name: table.to_json() for name, table in tables.items()},
        "data": data,
    }
    report_json.write_text(json.dumps(payload, indent=2, allow_nan=False))
    documents = write_documents(out, run_dir, data, tables, plots, notes)
    return AuditReport(run_dir, out, report_json, plots, documents, tables, data, notes)


def print_report(report: AuditReport, console: Console) -> None:
    """Render the report's tables, notes and output paths on ``console``."""
    console.rule(f"Audit report: {escape(str(report.run_dir))}")
    for table in report.tables.values():
        # Titles and captions go outside the table so that narrow tables do not wrap them.
        console.print(f"\n[bold]{table.title}[/bold]")
        rich_table = Table()
        for index, column in enumerate(table.columns):
            # fold, never '…': on an 80-column console a long site name or combination wraps
            rich_table.add_column(
                Text(column), justify="left" if index == 0 else "right", overflow="fold"
            )
        for row in table.rows:
            rich_table.add_row(*(Text(cell) for cell in row))  # no markup
        console.print(rich_table)
        if table.caption:
            console.print(f"[dim]{escape(table.caption)}[/dim]")
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    console.print(
        f"report.html, report.md, figures and report.json in {escape(str(report.out_dir))}"
    )

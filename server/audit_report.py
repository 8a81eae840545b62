"""The auditor's report of a federated run: rich tables, PNG figures and report.json.

Reads ``run_dir/audit.json`` (per-site, per-round aggregates, see ``AuditRow``) and, when
present, ``run_dir/metrics.json`` (per-round global metrics written by the ServerApp). The
report answers the questions of an auditor or consortium lead: which modality combination
is lazy at which site and round, how DWFuse weights and imputation quality evolve, how many
samples hold each modality combination (small cells suppressed), how the global model does
per round, and how much privacy budget each site has spent.

Missing values (None in the audit, -1 or non-finite in metrics.json) are shown as '-' in
tables and are left out of figures (a series with no values is not drawn); suppressed
counts are shown as '<k' (k = suppression threshold).
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
from server.audit_log import AUDIT_JSON, read_audit
from server.audit_plots import write_plots

METRICS_JSON = "metrics.json"
RUN_CONFIG_JSON = "run_config.json"
REPORT_JSON = "report.json"
DEFAULT_OUT = "audit_report"
DEFAULT_MIN_COUNT = 5
UNDEFINED_METRIC = -1.0  # what clients report for a metric that is undefined (e.g. one class)
MISSING = "-"


@dataclass
class ReportTable:
    """One table of the report as rendered strings: what ``print_report`` shows."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: str | None = None

    def to_json(self) -> dict:
        """JSON form of the table (title, columns, rows, caption)."""
        return {
            "title": self.title,
            "columns": self.columns,
            "rows": self.rows,
            "caption": self.caption,
        }


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


def _read_metrics(run_dir: Path) -> dict[int, dict] | None:
    """Per-round history from metrics.json, or None when the file is absent."""
    path = run_dir / METRICS_JSON
    if not path.is_file():
        return None
    try:
        history = json.loads(path.read_text())
        return {int(key): value for key, value in history.items() if isinstance(value, dict)}
    except (json.JSONDecodeError, ValueError, AttributeError) as error:
        raise ValueError(
            f"{path}: expected {{'<round>': {{...}}}} per-round metrics: {error}"
        ) from error


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
    """Per-round global metrics: local AUROC over sites (audit) and metrics.json values."""
    result = []
    for round_ in sorted(set(rounds) | set(history or {})):
        local = [_metric(r[round_].val_auroc) for r in by_site.values() if round_ in r]
        defined = [v for v in local if v is not None]
        entry = (history or {}).get(round_, {})
        nbytes = entry.get("bytes") or {}
        result.append(
            {
                "round": round_,
                "sites_reporting": len(local),
                "mean_local_val_auroc": statistics.fmean(defined) if defined else None,
                "federated_val_auroc": _metric(
                    (entry.get("evaluate_clients") or {}).get(VAL_AUROC)
                ),
                "server_test_auroc": _metric((entry.get("server") or {}).get("test-auroc")),
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


def build_data(rows: list[AuditRow], history: dict[int, dict] | None, min_count: int) -> dict:
    """The report's raw content (JSON-safe; None = missing or suppressed).

    Per-round values are lists aligned with ``rounds``; a site without a row in a round
    gets None there. Availability and imputation error come from each site's last round.
    """
    by_site: dict[str, dict[int, AuditRow]] = {}
    for row in rows:  # a later duplicate (site, round) replaces an earlier one
        by_site.setdefault(row.site, {})[row.round] = row
    sites = sorted(by_site)
    rounds = sorted({row.round for row in rows})
    last = {s: by_site[s][max(by_site[s])] for s in sites}
    modalities = _ordered_union(
        [m for r in rows for m in (r.mean_dwfuse_weight, r.imputation_error)]
    )
    combinations = _ordered_union(
        [c for r in rows for c in (r.availability_counts, r.tla_scores)]
        + [{r.lazy_combination: None} for r in rows if r.lazy_combination]
    )

    def per_round(site: str, value: Callable[[AuditRow], object]) -> list:
        return [value(by_site[site][r]) if r in by_site[site] else None for r in rounds]

    epsilon = {s: per_round(s, lambda r: finite_or_none(r.epsilon)) for s in sites}
    status = {s: per_round(s, lambda r: r.update_status) for s in sites}
    return {
        "update_status": status,
        "sites": sites,
        "rounds": rounds,
        "modalities": modalities,
        "combinations": combinations,
        "min_count": min_count,
        "metrics_found": history is not None,
        "lazy_timeline": {s: per_round(s, lambda r: r.lazy_combination) for s in sites},
        "local_val_auroc": {s: per_round(s, lambda r: _metric(r.val_auroc)) for s in sites},
        "dwfuse_weight_series": {
            s: {
                m: per_round(s, lambda r, m=m: finite_or_none(r.mean_dwfuse_weight.get(m)))
                for m in modalities
            }
            for s in sites
        },
        "dwfuse_weight": {s: _weights_summary(by_site[s], modalities) for s in sites},
        "availability": {
            s: {
                "round": last[s].round,
                "num_examples": last[s].num_examples,
                "counts": dict(last[s].availability_counts),
            }
            for s in sites
        },
        "imputation_error": {
            s: {
                "round": last[s].round,
                "errors": {m: finite_or_none(last[s].imputation_error.get(m)) for m in modalities},
            }
            for s in sites
        },
        "round_metrics": _round_metrics(rounds, by_site, history),
        "epsilon": epsilon if any(v is not None for s in sites for v in epsilon[s]) else None,
    }


# -- rendering -------------------------------------------------------------------------------
def _num(value: float | None, digits: int = 3) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _count(value: int | None, present: bool, min_count: int) -> str:
    """A count cell: the count, '<k' when suppressed, '-' when not reported at all."""
    if not present:
        return MISSING
    return f"<{min_count}" if value is None else str(value)


def _bytes(value: float | None) -> str:
    if value is None:
        return MISSING
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _weight_cell(entry: dict) -> str:
    if entry["last"] is None:
        return MISSING
    change = "" if entry["change"] is None else f" ({entry['change']:+.3f})"
    return f"{entry['last']:.3f}{change}"


def build_tables(data: dict) -> dict[str, ReportTable]:
    """Rendered tables from the report's data, keyed by name."""
    sites, rounds, modalities = data["sites"], data["rounds"], data["modalities"]
    tables = {
        "lazy_timeline": ReportTable(
            "Lazy modality combination per site and round",
            ["site", *(f"r{r}" for r in rounds)],
            [[s, *(c or MISSING for c in data["lazy_timeline"][s])] for s in sites],
        ),
        "dwfuse_weights": ReportTable(
            "Mean DWFuse weight per modality: last round (change since first round)",
            ["site", *modalities],
            [[s, *(_weight_cell(data["dwfuse_weight"][s][m]) for m in modalities)] for s in sites],
        ),
        "availability": _availability_table(data),
        "round_metrics": _round_metrics_table(data["round_metrics"]),
    }
    imputation = data["imputation_error"]
    tables["imputation_error"] = ReportTable(
        "Imputation error per modality (each site's last round)",
        ["site", "round", *modalities],
        [
            [
                s,
                str(imputation[s]["round"]),
                *(_num(imputation[s]["errors"][m]) for m in modalities),
            ]
            for s in sites
        ],
    )
    troubled = [
        s for s in sites if any(v not in (None, "accepted") for v in data["update_status"][s])
    ]
    if troubled:
        tables["update_status"] = ReportTable(
            "Sites with rounds not accepted (failed, rejected or excluded, with the reason)",
            ["site", *(f"r{r}" for r in rounds)],
            [[s, *(v or MISSING for v in data["update_status"][s])] for s in troubled],
        )
    if data["epsilon"] is not None:
        tables["epsilon"] = ReportTable(
            "DP epsilon spent per site and round",
            ["site", *(f"r{r}" for r in rounds)],
            [[s, *(_num(v, 2) for v in data["epsilon"][s])] for s in sites],
        )
    return tables


def _availability_table(data: dict) -> ReportTable:
    """Training samples per exact modality combination, each site's last round."""
    k, availability = data["min_count"], data["availability"]
    combos = [
        c for c in data["combinations"] if any(c in a["counts"] for a in availability.values())
    ]
    rows = []
    for s in data["sites"]:
        site = availability[s]
        cells = [_count(site["counts"].get(c), c in site["counts"], k) for c in combos]
        rows.append([s, str(site["round"]), _count(site["num_examples"], True, k), *cells])
    return ReportTable(
        "Training samples per modality combination (each site's last round)",
        ["site", "round", "samples", *combos],
        rows,
        f"Cells with fewer than {k} samples are suppressed (shown as '<{k}'); "
        "'-' = combination not reported.",
    )


def _round_metrics_table(round_metrics: list[dict]) -> ReportTable:
    """One row per round: sites reporting, AUROCs, bytes and wall time."""
    columns = [
        "round",
        "sites",
        "mean local val AUROC",
        "federated val AUROC",
        "server test AUROC",
        "bytes sent",
        "bytes received",
        "wall s",
    ]
    rows = [
        [
            str(m["round"]),
            str(m["sites_reporting"]),
            _num(m["mean_local_val_auroc"]),
            _num(m["federated_val_auroc"]),
            _num(m["server_test_auroc"]),
            _bytes(m["bytes_sent"]),
            _bytes(m["bytes_received"]),
            _num(m["wall_seconds"], 1),
        ]
        for m in round_metrics
    ]
    return ReportTable("Global metrics per round", columns, rows)


# -- entry points ----------------------------------------------------------------------------
def build_report(
    run_dir: Path, out_dir: Path | None = None, min_count: int | None = None
) -> AuditReport:
    """Read a run's audit (and metrics), write figures and report.json, return the report.

    ``out_dir`` defaults to ``run_dir/audit_report``; ``min_count`` (the suppression
    threshold shown as '<k') defaults to the run's ``audit_min_count``, else 5.
    Raises FileNotFoundError / ValueError naming audit.json when it is missing or empty.
    """
    run_dir = Path(run_dir)
    rows = read_audit(run_dir)
    if not rows:
        raise ValueError(f"{run_dir / AUDIT_JSON}: the audit table has no rows")
    history = _read_metrics(run_dir)
    threshold = _min_count_of_run(run_dir) if min_count is None else min_count
    data = build_data(rows, history, threshold)
    notes = []
    if history is None:
        notes.append(
            f"{run_dir / METRICS_JSON} not found: federated evaluation, server test, bytes and "
            "wall-clock columns are empty; everything else comes from the audit table."
        )
    if data["epsilon"] is None:
        notes.append("No site reported a DP epsilon (no local differential privacy).")
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
    return AuditReport(run_dir, out, report_json, plots, tables, data, notes)


def print_report(report: AuditReport, console: Console) -> None:
    """Render the report's tables, notes and output paths on ``console``."""
    console.rule(f"Audit report: {escape(str(report.run_dir))}")
    for table in report.tables.values():
        # Titles and captions go outside the table so that narrow tables do not wrap them.
        console.print(f"\n[bold]{table.title}[/bold]")
        rich_table = Table()
        for index, column in enumerate(table.columns):
            rich_table.add_column(Text(column), justify="left" if index == 0 else "right")
        for row in table.rows:
            rich_table.add_row(*(Text(cell) for cell in row))  # no markup
        console.print(rich_table)
        if table.caption:
            console.print(f"[dim]{escape(table.caption)}[/dim]")
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    console.print(f"figures and report.json in {escape(str(report.out_dir))}")

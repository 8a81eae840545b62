"""The audit report's tables as rendered strings, built from the report's data
(``audit_report.build_data``). The console, report.md and report.html all show these."""

from __future__ import annotations

from dataclasses import dataclass

MISSING = "-"
NEAR_TIE_MARK = "?"
IMPUTED = "imputed"
HIDDEN = "hidden"
# What the reported DWFuse weight is; the tables, the reading guide and the figures say so.
TEST_TIME_WEIGHT_NOTE = (
    "Weight = omega_m (DWFuse Eq. 10) averaged over the site's validation split at test time, "
    "without labels: each head's confidence stands in for its true-label probability. It is "
    "not the omega that weighted training (computed with labels) and it does not enter the "
    "prediction; a high value means the OTHER modalities' heads are unsure, not that this "
    "modality is trusted."
)


@dataclass
class ReportTable:
    """One table of the report as rendered strings."""

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


def num(value: float | None, digits: int = 3) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def count_cell(value: int | None, present: bool, min_count: int) -> str:
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


def _is_imputed(data: dict, site: str, modality: str) -> bool:
    held = data["observed"][site]["modalities"]
    return held is not None and modality not in held


def _weight_cell(entry: dict, imputed: bool) -> str:
    if entry["last"] is None:
        return MISSING
    change = "" if entry["change"] is None else f" ({entry['change']:+.3f})"
    return f"{entry['last']:.3f}{change}" + (f" {IMPUTED}" if imputed else "")


def _lazy_cell(call: dict | None) -> str:
    if call is None or call["lazy"] is None:
        return MISSING
    return call["lazy"] + (NEAR_TIE_MARK if call["near_tie"] else "")


def build_tables(data: dict) -> dict[str, ReportTable]:
    """Rendered tables from the report's data, keyed by name (the report's order)."""
    sites, rounds, modalities = data["sites"], data["rounds"], data["modalities"]
    tie = f"{data['tie_margin']:.0%}"
    tables = {
        "lazy_timeline": ReportTable(
            "Lazy modality combination per site and round",
            ["site", *(f"r{r}" for r in rounds)],
            [[s, *(_lazy_cell(c) for c in data["lazy_calls"][s])] for s in sites],
            f"'{NEAR_TIE_MARK}' = near tie: the margin over the runner-up is below {tie} of the "
            "lazy combination's TLA score (within noise, not a finding). '-' = none reported.",
        ),
        "lazy_margins": _margins_table(data),
        "lazy_frequency": _frequency_table(data),
        "weight_profile": _profile_table(data),
        "dwfuse_weights": ReportTable(
            "Test-time DWFuse confidence weight per modality: last round (change since first "
            "round)",
            ["site", *modalities],
            [
                [
                    s,
                    *(
                        _weight_cell(data["dwfuse_weight"][s][m], _is_imputed(data, s, m))
                        for m in modalities
                    ),
                ]
                for s in sites
            ],
            f"{TEST_TIME_WEIGHT_NOTE} '{IMPUTED}' = the site holds no sample of this "
            "modality: its weight is that of an imputed embedding, not of observed data.",
        ),
        "imputation_error": _imputation_table(data),
        "availability": _availability_table(data),
        "round_metrics": _round_metrics_table(data),
        "failures": _failures_table(data["failures"]),
    }
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
            [[s, *(num(v, 2) for v in data["epsilon"][s])] for s in sites],
        )
    return tables


def _margins_table(data: dict) -> ReportTable:
    """One row per (site, round): the lazy combination, the runner-up and the margin."""
    rows = []
    for site in data["sites"]:
        for round_, call in zip(data["rounds"], data["lazy_calls"][site], strict=True):
            if call is None or call["lazy"] is None:
                continue
            verdict = {True: "near tie", False: "clear", None: "no runner-up"}[call["near_tie"]]
            if call["unpublished"] and call["near_tie"] is not None:
                verdict += f" ({call['unpublished']} suppressed)"
            relative = call["relative_margin"]
            rows.append(
                [site, str(round_), call["lazy"], num(call["score"]), call["runner_up"] or MISSING,
                 num(call["runner_up_score"]), num(call["margin"]),
                 MISSING if relative is None else f"{relative:.1%}", verdict]
            )  # fmt: skip
    return ReportTable(
        "Lazy combination: margin over the runner-up (TLA scores)",
        ["site", "round", "lazy", "score", "runner-up", "score", "margin", "margin %", "verdict"],
        rows,
        f"margin % = margin / lazy score; below {data['tie_margin']:.0%} is a near tie (the "
        "score's standard error is about score/sqrt(n)). '(k suppressed)': k scores were "
        "withheld at the site, one may be the true runner-up, so the margin is an upper bound.",
    )


def _frequency_table(data: dict) -> ReportTable:
    """Cross-site: how often each combination was lazy at each site, and how stable."""
    frequency = data["lazy_frequency"]
    combos = [c for c in data["combinations"] if any(c in f["counts"] for f in frequency.values())]
    rows = []
    for site in data["sites"]:
        entry = frequency[site]
        n = entry["rounds"]
        cells = [f"{entry['counts'][c]}/{n}" if c in entry["counts"] else MISSING for c in combos]
        share = (
            MISSING
            if entry["share"] is None
            else f"{entry['most_frequent']} ({entry['share']:.0%})"
        )
        rows.append([site, *cells, share, str(entry["near_ties"])])
    return ReportTable(
        "Which combination is lazy where: rounds lazy / rounds reported",
        ["site", *combos, "most often", "near ties"],
        rows,
        "Stable = one combination in most rounds with few near ties; a site whose lazy "
        "combination changes between near ties has no stable lazy combination.",
    )


def _profile_table(data: dict) -> ReportTable:
    """Cross-site: each site's mean DWFuse weight per modality next to its availability."""
    columns, rows = ["site"], []
    for modality in data["modalities"]:
        columns += [f"{modality} weight", f"{modality} held"]
    for site in data["sites"]:
        cells = [site]
        for modality in data["modalities"]:
            entry = data["weight_profile"][site][modality]
            weight = num(entry["mean_weight"])
            if entry["observed"] is False and entry["mean_weight"] is not None:
                weight += f" {IMPUTED}"
            share = entry["share"]
            held = (
                MISSING
                if share is None
                else f"{'>=' if entry['present_lower_bound'] else ''}{share:.0%}"
            )
            cells += [weight, held]
        rows.append(cells)
    return ReportTable(
        "Test-time DWFuse confidence weight (mean over rounds) next to availability",
        columns,
        rows,
        "weight = test-time DWFuse confidence weight (see the weight table's note). held = "
        "share of the site's training samples holding the modality (last round; '>=' when a "
        f"suppressed cell holds it). '{IMPUTED}': weight of a modality the site never observes.",
    )


def _imputation_table(data: dict) -> ReportTable:
    """Normalised imputation error (raw MSE in brackets) per modality, last round."""
    imputation = data["imputation_error"]
    rows = []
    for site in data["sites"]:
        cells = [site, str(imputation[site]["round"])]
        for modality in data["modalities"]:
            raw = imputation[site]["errors"][modality]
            normalised = imputation[site]["normalised"].get(modality)
            if _is_imputed(data, site, modality):
                cells.append("not held")
            elif normalised is None:
                cells.append(MISSING if raw is None else f"- (raw {raw:.3g})")
            else:
                cells.append(f"{normalised:.2f} (raw {MISSING if raw is None else f'{raw:.3g}'})")
        rows.append(cells)
    return ReportTable(
        "Imputation error per modality: 1 - R^2 (raw MSE), each site's last round",
        ["site", "round", *data["modalities"]],
        rows,
        "1 - R^2 = imputation MSE / MSE of predicting the site's training mean embedding, on "
        "validation samples holding the modality and another: 0 = perfect, 1 = no better than "
        "the mean, above 1 = worse than the mean; comparable across modalities (raw MSE is in "
        "each encoder's own units). '- (raw x)': the modality's embedding does not vary at the "
        "site, so there is no baseline. 'not held' = the site has no sample to measure it on; "
        "'-' = withheld at the site (fewer samples than its threshold) or not measured.",
    )


def _availability_table(data: dict) -> ReportTable:
    """Training samples per exact modality combination, each site's last round."""
    k, availability = data["min_count"], data["availability"]
    combos = [
        c for c in data["combinations"] if any(c in a["counts"] for a in availability.values())
    ]
    rows = []
    for s in data["sites"]:
        site = availability[s]
        cells = [count_cell(site["counts"].get(c), c in site["counts"], k) for c in combos]
        total = HIDDEN if site["total_hidden"] else count_cell(site["num_examples"], True, k)
        rows.append([s, str(site["round"]), total, *cells])
    hidden = any(availability[s]["total_hidden"] for s in data["sites"])
    return ReportTable(
        "Training samples per modality combination (each site's last round)",
        ["site", "round", "samples", *combos],
        rows,
        f"Cells with fewer than {k} samples are suppressed (shown as '<{k}'); "
        "'-' = combination not reported."
        + (
            f" '{HIDDEN}': this report's threshold hides a cell the site published, so the "
            "site's total is hidden too (it would give the cell away by subtraction)."
            if hidden
            else ""
        ),
    )


def _ci(metric: dict) -> str:
    low, high = metric["server_test_auroc_low"], metric["server_test_auroc_high"]
    value = num(metric["server_test_auroc"])
    return value if low is None or high is None else f"{value} [{low:.2f}, {high:.2f}]"


def _round_metrics_table(data: dict) -> ReportTable:
    """One row per round: sites reporting, AUROCs (server test with its CI), bytes, time."""
    columns = ["round", "sites", "mean local val AUROC", "federated val AUROC",
               "server test AUROC [95% CI]", "bytes sent", "bytes received", "wall s"]  # fmt: skip
    rows = [
        [str(m["round"]), str(m["sites_reporting"]), num(m["mean_local_val_auroc"]),
         num(m["federated_val_auroc"]), _ci(m), _bytes(m["bytes_sent"]),
         _bytes(m["bytes_received"]), num(m["wall_seconds"], 1)]
        for m in data["round_metrics"]
    ]  # fmt: skip
    sizes = sorted({m["server_test_n"] for m in data["round_metrics"] if m["server_test_n"]})
    n = ", ".join(str(int(s)) for s in sizes) or "unknown"
    return ReportTable(
        "Global metrics per round",
        columns,
        rows,
        f"Server test set: n = {n} stays; 95% percentile bootstrap interval over the test "
        "stays (200 resamples). Local and federated validation AUROCs have no interval.",
    )


def _failures_table(failures: list[dict]) -> ReportTable:
    """Every failed or rejected reply per round."""
    rows = [
        [str(f["round"]), f["stage"], f["participant"], f["status"], f["reason"]] for f in failures
    ]
    return ReportTable(
        "Failed and rejected replies per round",
        ["round", "stage", "site", "status", "reason"],
        rows,
        "none: every site's reply was accepted in every round" if not rows else None,
    )

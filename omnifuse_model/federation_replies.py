"""What a site may send back: strict schemas for registration, train and evaluate replies.

The server trusts nothing a site sends. Every value a reply carries is parsed here into a
typed object or refused with a ``ReplyError`` whose reason names the field and what was
wrong; the server turns that into a rejection of the reply, never into a crash. Counts are
checked for consistency (``num-present.m <= num-examples``) and against what the site
declared when it registered before round 1 and what it reported in its last accepted round.

Plain Python only (no Flower): the server hands in the records as mappings.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

from pydantic import Field, ValidationError, model_validator

from omnifuse_model import federation_schema as wire
from omnifuse_model.config import StrictModel
from omnifuse_model.laziness import combination_label, modality_combinations

MAX_COUNT = 100_000_000  # no site declares more samples than this
MAX_SECONDS = 1e7
MAX_AUDIT_CHARS = 1_000_000
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# registration answer: RecordDict key, and the keys of its ConfigRecord (flat scalars)
REGISTRATION = "registration"
SITE = "site"
NUM_TRAIN = "num-train"
NUM_VAL = "num-val"


class ReplyError(ValueError):
    """A reply field that may not be used; ``reason`` is short, stable and names the field."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = safe_reason(reason)


def safe_reason(text: object, limit: int = 300) -> str:
    """One printable ASCII line of at most ``limit`` characters (site-chosen names inside a
    reason are escaped, so logs and metrics.json stay readable)."""
    try:
        line = str(text).encode("ascii", "backslashreplace").decode("ascii")
    except Exception:  # a reason must never raise
        line = "unprintable reason"
    line = " ".join("".join(c if c.isprintable() else " " for c in line).split())
    return line[:limit] or "no reason given"


def _count(key: str, value: object, upper: int = MAX_COUNT) -> int:
    if type(value) is not int:
        raise ReplyError(f"{key}:not_an_int:{type(value).__name__}")
    if not 0 <= value <= upper:
        raise ReplyError(f"{key}:out_of_range:{value}>{upper}" if value > 0 else f"{key}:negative")
    return value


def _real(
    key: str, value: object, low: float, high: float, undefined: float | None = None
) -> float:
    if type(value) not in (int, float):
        raise ReplyError(f"{key}:not_a_number:{type(value).__name__}")
    number = float(value)  # type: ignore[arg-type]
    if undefined is not None and number == undefined:
        return number
    if not math.isfinite(number):
        raise ReplyError(f"{key}:not_finite")
    if not low <= number <= high:
        raise ReplyError(f"{key}:out_of_range:{number:.6g}")
    return number


def _exact_keys(what: str, record: Mapping[str, object], required: set[str], optional=()) -> None:
    keys = set(record)
    missing = sorted(required - keys)
    if missing:
        raise ReplyError(f"{what}:missing_key:{missing[0]}")
    extra = sorted(keys - required - set(optional))
    if extra:
        raise ReplyError(f"{what}:unexpected_key:{str(extra[0])[:60]}")


# -- registration ---------------------------------------------------------------------------
class SiteDeclaration(StrictModel):
    """A site's answer to the registration query before round 1: its name and data sizes."""

    site: str = Field(pattern=SITE_NAME.pattern, description="The site's name.")
    num_train: int = Field(ge=0, le=MAX_COUNT, description="Training samples.")
    num_val: int = Field(ge=0, le=MAX_COUNT, description="Validation samples.")
    num_present: dict[str, int] = Field(description="Training samples holding each modality.")

    @model_validator(mode="after")
    def _present_within_train(self) -> SiteDeclaration:
        for name, count in self.num_present.items():
            if not 0 <= count <= self.num_train:
                raise ValueError(f"num-present.{name} = {count} not in [0, {self.num_train}]")
        return self


def encode_declaration(declaration: SiteDeclaration) -> dict[str, str | int]:
    record: dict[str, str | int] = {
        SITE: declaration.site,
        NUM_TRAIN: declaration.num_train,
        NUM_VAL: declaration.num_val,
    }
    record.update({wire.present_key(m): n for m, n in declaration.num_present.items()})
    return record


def decode_declaration(record: Mapping[str, object], modality_names: list[str]) -> SiteDeclaration:
    """A registration answer, every model modality counted; ``ReplyError`` otherwise."""
    present = {wire.present_key(m) for m in modality_names}
    _exact_keys("registration", record, {SITE, NUM_TRAIN, NUM_VAL} | present)
    site = record[SITE]
    if not isinstance(site, str) or not SITE_NAME.match(site):
        raise ReplyError("registration:site:bad_name")
    num_train = _count(NUM_TRAIN, record[NUM_TRAIN])
    try:
        return SiteDeclaration(
            site=site,
            num_train=num_train,
            num_val=_count(NUM_VAL, record[NUM_VAL]),
            num_present={
                m: _count(wire.present_key(m), record[wire.present_key(m)], num_train)
                for m in modality_names
            },
        )
    except ValidationError as error:  # pragma: no cover - the checks above come first
        raise ReplyError(f"registration:{error.errors()[0]['msg']}") from error


# -- train replies ----------------------------------------------------------------------------
class TrainMetrics(StrictModel):
    """A train reply's MetricRecord, parsed."""

    num_examples: int = Field(ge=0)
    num_present: dict[str, int]
    train_loss: float
    train_seconds: float
    val_auroc: float
    val_auprc: float
    epsilon: float | None = None
    load_seconds: float | None = None

    def as_metrics(self) -> dict[str, float | int]:
        """The flat metric dict aggregation and history use (the wire keys)."""
        metrics: dict[str, float | int] = {
            wire.NUM_EXAMPLES: self.num_examples,
            wire.TRAIN_LOSS: self.train_loss,
            wire.TRAIN_SECONDS: self.train_seconds,
            wire.VAL_AUROC: self.val_auroc,
            wire.VAL_AUPRC: self.val_auprc,
        }
        metrics.update({wire.present_key(m): n for m, n in self.num_present.items()})
        if self.epsilon is not None:
            metrics[wire.EPSILON] = self.epsilon
        if self.load_seconds is not None:
            metrics[wire.LOAD_SECONDS] = self.load_seconds
        return metrics

    def counts(self) -> dict[str, int]:
        return {
            wire.NUM_EXAMPLES: self.num_examples,
            **{wire.present_key(m): n for m, n in self.num_present.items()},
        }


def _metric_probability(key: str, value: object) -> float:
    """AUROC/AUPRC: in [0, 1], or -1.0 when undefined at the site."""
    return _real(key, value, 0.0, 1.0, undefined=-1.0)


def parse_train_metrics(record: Mapping[str, object], modality_names: list[str]) -> TrainMetrics:
    """Every key known, every value of its type and range, ``num-present.m <= num-examples``."""
    present = {wire.present_key(m): m for m in modality_names}
    required = {
        wire.NUM_EXAMPLES,
        wire.TRAIN_LOSS,
        wire.TRAIN_SECONDS,
        wire.VAL_AUROC,
        wire.VAL_AUPRC,
        *present,
    }
    _exact_keys("metrics", record, required, optional=(wire.EPSILON, wire.LOAD_SECONDS))
    num_examples = _count(wire.NUM_EXAMPLES, record[wire.NUM_EXAMPLES])
    epsilon = record.get(wire.EPSILON)
    load = record.get(wire.LOAD_SECONDS)
    return TrainMetrics(
        num_examples=num_examples,
        num_present={m: _count(k, record[k], num_examples) for k, m in present.items()},
        train_loss=_real(wire.TRAIN_LOSS, record[wire.TRAIN_LOSS], -1e12, 1e12),
        train_seconds=_real(wire.TRAIN_SECONDS, record[wire.TRAIN_SECONDS], 0.0, MAX_SECONDS),
        val_auroc=_metric_probability(wire.VAL_AUROC, record[wire.VAL_AUROC]),
        val_auprc=_metric_probability(wire.VAL_AUPRC, record[wire.VAL_AUPRC]),
        epsilon=None if epsilon is None else _real(wire.EPSILON, epsilon, 0.0, 1e12),
        load_seconds=None if load is None else _real(wire.LOAD_SECONDS, load, 0.0, MAX_SECONDS),
    )


def check_counts_bound(
    counts: Mapping[str, int], declaration: SiteDeclaration, previous: Mapping[str, int] | None
) -> None:
    """A reply's counts may not exceed the registration's, nor the last accepted round's."""
    declared = {
        wire.NUM_EXAMPLES: declaration.num_train,
        **{wire.present_key(m): n for m, n in declaration.num_present.items()},
    }
    for key, value in counts.items():
        if value > declared.get(key, 0):
            raise ReplyError(f"{key}:above_declared:{value}>{declared.get(key, 0)}")
        if previous is not None and key in previous and value > previous[key]:
            raise ReplyError(f"{key}:above_last_round:{value}>{previous[key]}")


# -- evaluate replies -------------------------------------------------------------------------
class EvaluateMetrics(StrictModel):
    """An evaluate reply's MetricRecord, parsed."""

    num_examples: int = Field(ge=0)
    val_auroc: float
    val_auprc: float

    def as_metrics(self) -> dict[str, float | int]:
        return {
            wire.NUM_EXAMPLES: self.num_examples,
            wire.VAL_AUROC: self.val_auroc,
            wire.VAL_AUPRC: self.val_auprc,
        }


def parse_evaluate_metrics(
    record: Mapping[str, object], declaration: SiteDeclaration
) -> EvaluateMetrics:
    """Exactly the evaluate keys; ``num-examples`` at most the declared validation size."""
    _exact_keys("metrics", record, {wire.NUM_EXAMPLES, wire.VAL_AUROC, wire.VAL_AUPRC})
    value = record[wire.NUM_EXAMPLES]
    num_examples = _count(wire.NUM_EXAMPLES, value)
    if num_examples > declaration.num_val:
        raise ReplyError(f"{wire.NUM_EXAMPLES}:above_declared:{num_examples}>{declaration.num_val}")
    return EvaluateMetrics(
        num_examples=num_examples,
        val_auroc=_metric_probability(wire.VAL_AUROC, record[wire.VAL_AUROC]),
        val_auprc=_metric_probability(wire.VAL_AUPRC, record[wire.VAL_AUPRC]),
    )


# -- audit rows and TLA sums ------------------------------------------------------------------
def parse_audit(
    record: Mapping[str, object],
    site: str,
    global_round: int,
    metrics: TrainMetrics,
    modality_names: list[str],
    declared_train: int | None = None,
    min_count: int | None = None,
) -> wire.AuditRow:
    """The reply's audit row; it must be about ``site`` and ``global_round`` and agree with
    the reply's metrics. Statistics must be finite and in range.

    Counts are compared as published (``suppression.published_count``): the row's
    ``num_examples`` must equal the MetricRecord's, and each exact availability cell is at
    most the published training size, or the declared one (``declared_train``) when the
    site trained nothing this round (a DP-SGD site at its budget sends num-examples 0 but
    still describes its training data). With ``min_count`` (the run's audit threshold, sent
    in every round plan) the row must say it applied exactly that one: the report suppresses
    every site's counts below the largest threshold a row names."""
    _exact_keys("bad_audit", record, {"row"})
    text = record["row"]
    if not isinstance(text, str) or len(text) > MAX_AUDIT_CHARS:
        raise ReplyError("bad_audit:row:not_a_bounded_string")
    try:
        row = wire.AuditRow.model_validate(json.loads(text), strict=True)
    except (ValueError, TypeError, RecursionError) as error:
        raise ReplyError(f"bad_audit:{type(error).__name__}") from error
    if row.site != site:
        raise ReplyError(f"bad_audit:site_mismatch:{row.site[:40]}")
    if row.round != global_round:
        raise ReplyError(f"bad_audit:round_mismatch:{row.round}!={global_round}")
    if row.update_status != "accepted":
        raise ReplyError("bad_audit:update_status_set_by_site")
    if min_count is not None and row.min_count != min_count:
        raise ReplyError(f"bad_audit:min_count:{str(row.min_count)[:20]}!={min_count}")
    if row.num_examples is not None and row.num_examples != metrics.num_examples:
        raise ReplyError("bad_audit:num_examples_disagrees")
    labels = {combination_label(c) for c in modality_combinations(modality_names)}
    cells_bound = max(metrics.num_examples, declared_train or 0)
    _check_stats("availability_counts", row.availability_counts, labels, 0, cells_bound)
    _check_stats("tla_scores", row.tla_scores, labels, 0.0, 1e12)
    _check_stats("mean_dwfuse_weight", row.mean_dwfuse_weight, set(modality_names), 0.0, 1.0)
    _check_stats("imputation_error", row.imputation_error, set(modality_names), 0.0, 1e12)
    _check_stats(
        "imputation_error_normalised",
        row.imputation_error_normalised,
        set(modality_names),
        0.0,
        1e12,
    )
    if row.observed_modalities is not None and not set(row.observed_modalities) <= set(
        modality_names
    ):
        raise ReplyError("bad_audit:observed_modalities:unknown_modality")
    if row.lazy_combination is not None and row.lazy_combination not in labels:
        raise ReplyError("bad_audit:lazy_combination:unknown")
    for name, value, high in (("val_auroc", row.val_auroc, 1.0), ("epsilon", row.epsilon, 1e12)):
        if value is not None:
            _real(f"bad_audit:{name}", value, 0.0, high)
    return row


def _check_stats(
    name: str, values: Mapping[str, float | int | None], keys: set[str], low: float, high: float
) -> None:
    for key, value in values.items():
        if key not in keys:
            raise ReplyError(f"bad_audit:{name}:unknown_key:{key[:40]}")
        if value is not None:
            _real(f"bad_audit:{name}", value, low, high)


def parse_tla_sums(
    record: Mapping[str, object],
    modality_names: list[str],
    num_examples: int,
    num_present: Mapping[str, int] | None = None,
) -> tuple[dict[str, float], dict[str, int]]:
    """Per-combination (sums, counts) for global TLA: known labels, paired keys, finite
    non-negative sums, counts in [1, num-examples] and, with ``num_present`` (the reply's
    published samples per modality), at most the fewest samples holding one of the
    combination's modalities: a site cannot vote for a combination it does not hold (both
    are published rounded up to the same threshold, so the bound holds as sent)."""
    labels = {combination_label(c) for c in modality_combinations(modality_names)}
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for key, value in record.items():
        prefix, _, label = str(key).partition(".")
        if label not in labels or prefix not in ("sum", "count"):
            raise ReplyError(f"tla-sums:unexpected_key:{str(key)[:60]}")
        if prefix == "sum":
            sums[label] = _real(f"tla-sums:{key}", value, 0.0, 1e15)
        else:
            bound = num_examples
            if num_present is not None:
                bound = min(bound, *(num_present.get(m, 0) for m in label.split("+")))
            counts[label] = _count(f"tla-sums:{key}", value, bound)
            if counts[label] == 0:
                raise ReplyError(f"tla-sums:{key}:zero")
    if set(sums) != set(counts):
        raise ReplyError("tla-sums:unpaired_sum_and_count")
    return sums, counts


# -- statistics phase (before round 1) --------------------------------------------------------
# RecordDict key of a site's answer to the statistics query, and the keys of its ConfigRecord
STATISTICS = "statistics"
EHR_STAYS = "ehr-stays"  # training stays with EHR the statistics cover
EHR_COUNT = "ehr-count"  # bins pooled (N)
EHR_SUMS = "ehr-sums"  # per column S1 (list of floats)
EHR_SUMSQ = "ehr-sumsq"  # per column S2 (list of floats)
FINGERPRINT_PREFIX = "fingerprint."  # + backbone (modality) name -> SHA-256 hex digest
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# The most EHR bins one stay can give: a year at 15-minute steps. Binds the bins a site
# pools to the stays it declares, so a few stays cannot claim 1e11 bins and set everyone's
# normaliser (a site can still declare itself large: pooled statistics weigh by size).
MAX_BINS_PER_STAY = 366 * 24 * 4


class SiteStatistics(StrictModel):
    """A site's answer to the statistics query: its training EHR aggregates and the
    fingerprints of the backbones its feature cache was built with.

    The aggregates are sums over every bin of every training stay (never a per-patient
    value); a site whose training split has fewer EHR stays than the audit threshold sends
    none (``ehr_count`` 0, no sums). A fingerprint is the SHA-256 of the feature cache's
    producer identity for a modality (the identity names the SHA-256 of the weight files or
    of the WordPiece vocabulary, the input size and the token length).
    """

    ehr_stays: int = Field(default=0, ge=0, le=MAX_COUNT)
    ehr_count: int = Field(default=0, ge=0, le=MAX_COUNT * 1000)
    ehr_sums: list[float] = Field(default_factory=list)
    ehr_sumsq: list[float] = Field(default_factory=list)
    fingerprints: dict[str, str] = Field(default_factory=dict)

    def has_ehr(self) -> bool:
        return self.ehr_count > 0 and bool(self.ehr_sums)


def encode_statistics(statistics: SiteStatistics) -> dict[str, int | str | list[float]]:
    record: dict[str, int | str | list[float]] = {
        EHR_STAYS: statistics.ehr_stays,
        EHR_COUNT: statistics.ehr_count,
    }
    if statistics.has_ehr():
        record[EHR_SUMS] = list(statistics.ehr_sums)
        record[EHR_SUMSQ] = list(statistics.ehr_sumsq)
    record.update({FINGERPRINT_PREFIX + b: f for b, f in statistics.fingerprints.items()})
    return record


def _float_list(key: str, value: object, length: int) -> list[float]:
    if not isinstance(value, list) or len(value) != length:
        raise ReplyError(f"{key}:not_a_list_of_{length}_numbers")
    if not all(type(v) is float and math.isfinite(v) for v in value):
        raise ReplyError(f"{key}:not_finite_floats")
    return list(value)


def decode_statistics(
    record: Mapping[str, object],
    modality_names: list[str],
    declaration: SiteDeclaration,
    num_features: int,
) -> SiteStatistics:
    """A statistics answer; ``ReplyError`` naming the field otherwise.

    Fingerprints only for model modalities, as 64 lowercase hex digits; EHR sums exactly
    ``num_features`` finite floats each, S2 >= 0, at most the declared training stays and
    at most ``MAX_BINS_PER_STAY`` bins per stay.
    """
    fingerprint_keys = {FINGERPRINT_PREFIX + m for m in modality_names}
    _exact_keys(
        "statistics",
        record,
        {EHR_STAYS, EHR_COUNT},
        optional=(EHR_SUMS, EHR_SUMSQ, *fingerprint_keys),
    )
    stays = _count(EHR_STAYS, record[EHR_STAYS], declaration.num_train)
    count = _count(EHR_COUNT, record[EHR_COUNT], MAX_COUNT * 1000)
    if count > stays * MAX_BINS_PER_STAY:
        raise ReplyError(f"{EHR_COUNT}:above_{MAX_BINS_PER_STAY}_bins_per_stay:{count}>{stays}")
    sums: list[float] = []
    sumsq: list[float] = []
    if count > 0:
        if EHR_SUMS not in record or EHR_SUMSQ not in record:
            raise ReplyError(f"statistics:missing_key:{EHR_SUMS}")
        sums = _float_list(EHR_SUMS, record[EHR_SUMS], num_features)
        sumsq = _float_list(EHR_SUMSQ, record[EHR_SUMSQ], num_features)
        if any(v < 0 for v in sumsq):
            raise ReplyError(f"{EHR_SUMSQ}:negative")
    elif EHR_SUMS in record or EHR_SUMSQ in record:
        raise ReplyError(f"statistics:{EHR_SUMS}_without_{EHR_COUNT}")
    fingerprints = {}
    for key in sorted(fingerprint_keys & set(record)):
        value = record[key]
        if not isinstance(value, str) or not SHA256_HEX.match(value):
            raise ReplyError(f"{key}:not_a_sha256_hex_digest")
        fingerprints[key.removeprefix(FINGERPRINT_PREFIX)] = value
    return SiteStatistics(
        ehr_stays=stays, ehr_count=count, ehr_sums=sums, ehr_sumsq=sumsq, fingerprints=fingerprints
    )

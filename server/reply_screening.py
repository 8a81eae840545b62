"""Screening of site replies before anything in them is used: accept, or reject by name.

One function per phase turns a Flower reply into an ``Accepted*`` object (typed metrics,
the update as sent (``SiteUpdate``: views on the reply's bytes), the audit row, TLA sums)
or a ``Rejection`` (node, bound site, reason).
Screening never raises: a reply that cannot be read is a rejection like any other. The site
is the one the registry bound to the sending node; a reply's own claims (audit row site and
round) must agree with it. The update must hold exactly the keys the site was asked for, in
the run's transport dtype, with the global shapes (``server.update_rows``), then, checked
over the whole round in one streamed pass (``server.update_stream``, :func:`screen_norms`),
be finite and within ``max-update-norm`` of the global weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from omnifuse_model import federation_schema as wire
from omnifuse_model.federation_replies import (
    EvaluateMetrics,
    ReplyError,
    TrainMetrics,
    check_counts_bound,
    parse_audit,
    parse_evaluate_metrics,
    parse_tla_sums,
    parse_train_metrics,
)
from omnifuse_model.wire_format import WireFormat, held_modalities, uplink_keys
from server.site_registry import SiteRegistry, error_reason, short_reason
from server.update_rows import SiteUpdate, UpdateLayout, exact_norm, read_update


@dataclass
class Rejection:
    """A reply left out of the round, and why (``status``: 'failed' for an error reply)."""

    node: int
    site: str | None
    status: str
    reason: str
    row: wire.AuditRow | None = None

    def as_problem(self) -> dict:
        if self.status == "failed":
            problem = {"node": self.node, "status": "failed", "reason": self.reason}
            if self.site is not None:
                problem["site"] = self.site
            return problem
        return {"node": self.node, "status": self.status, "site": self.site, "reason": self.reason}


@dataclass
class AcceptedTrain:
    node: int
    site: str
    metrics: TrainMetrics
    update: SiteUpdate  # as sent: the update, or weights (``server.update_rows``)
    row: wire.AuditRow
    tla: tuple[dict[str, float], dict[str, int]] | None
    received_bytes: int


@dataclass
class AcceptedEvaluate:
    node: int
    site: str
    metrics: EvaluateMetrics


@dataclass
class TrainContext:
    """What screening a train reply checks against."""

    registry: SiteRegistry
    global_round: int
    reference: Mapping[str, np.ndarray]
    modality_names: list[str]
    max_norm: float | None
    wire: WireFormat = field(default_factory=WireFormat)
    layout: UpdateLayout | None = None
    audit_min_count: int | None = None  # the run's: every audit row must name it
    _expected: dict[tuple[str, ...] | None, list[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.layout is None:
            self.layout = UpdateLayout(self.reference)

    def expected_keys(self, site: str) -> list[str]:
        """The parameter keys ``site`` was asked to send back (``wire_format.uplink_keys``;
        one list per set of held modalities in a round)."""
        held = None
        if self.wire.omit_unheld:
            held = tuple(held_modalities(self.registry.declarations[site].num_present))
        if held not in self._expected:
            self._expected[held] = uplink_keys(self.reference, self.modality_names, held)
        return self._expected[held]


def _records(message: Message, required: dict[str, type], optional: dict[str, type]) -> dict:
    content = message.content
    keys = set(content.keys())
    for key in sorted(set(required) - keys):
        raise ReplyError(f"missing_record:{key}")
    for key in sorted(keys - set(required) - set(optional)):
        raise ReplyError(f"unexpected_record:{str(key)[:60]}")
    records = {}
    for key in keys:
        kind = {**required, **optional}[key]
        if not isinstance(content[key], kind):
            raise ReplyError(f"record_type:{key}:{type(content[key]).__name__}")
        records[key] = content[key]
    return records


def screen_train_reply(message: Message, context: TrainContext) -> AcceptedTrain | Rejection:
    """Accept a train reply or say why not; never raises."""
    node = node_of(message)
    site = context.registry.site_of(node)
    if message.has_error():
        return Rejection(node, site, "failed", error_reason(message.error.reason))
    if site is None:
        refused = context.registry.refused.get(node)
        return Rejection(node, None, "rejected", short_reason(f"unregistered_node:{refused}"))
    row = None
    try:
        records = _records(
            message,
            {wire.ARRAYS: ArrayRecord, wire.METRICS: MetricRecord, wire.AUDIT: ConfigRecord},
            {wire.TLA_SUMS: ConfigRecord},
        )
        metrics = parse_train_metrics(dict(records[wire.METRICS]), context.modality_names)
        declaration = context.registry.declarations[site]
        check_counts_bound(metrics.counts(), declaration, context.registry.last_counts.get(site))
        row = parse_audit(
            dict(records[wire.AUDIT]),
            site,
            context.global_round,
            metrics,
            context.modality_names,
            declaration.num_train,
            context.audit_min_count,
        )
        tla = (
            parse_tla_sums(
                dict(records[wire.TLA_SUMS]),
                context.modality_names,
                metrics.num_examples,
                metrics.num_present,
            )
            if wire.TLA_SUMS in records
            else None
        )
        expected = context.expected_keys(site)
        update = read_update(records[wire.ARRAYS], context.layout, expected, context.wire)
        received = records[wire.ARRAYS].count_bytes()
    except ReplyError as error:
        return Rejection(node, site, "rejected", error.reason, row)
    except Exception as error:  # a reply never stops the server
        return Rejection(node, site, "rejected", short_reason(f"unreadable:{type(error).__name__}"))
    return AcceptedTrain(node, site, metrics, update, row, tla, received)


def screen_norms(
    accepted: Sequence[AcceptedTrain], squared_norms: np.ndarray, context: TrainContext
) -> tuple[list[AcceptedTrain], list[Rejection]]:
    """The updates that are finite and within ``max-update-norm``, and a rejection naming
    the first non-finite key, or the norm, for each other one (``squared_norms``: each
    update's squared L2 norm, from ``server.update_stream``)."""
    kept: list[AcceptedTrain] = []
    rejected: list[Rejection] = []
    for item, squared in zip(accepted, squared_norms, strict=True):
        try:
            norm = _norm(item.update, float(squared), context)
            if context.max_norm is not None and norm > context.max_norm:
                raise ReplyError(f"norm_exceeded:{norm:.3g}>{context.max_norm:g}")
        except ReplyError as error:
            rejected.append(Rejection(item.node, item.site, "rejected", error.reason, item.row))
            continue
        kept.append(item)
    return kept, rejected


def _norm(update: SiteUpdate, squared: float, context: TrainContext) -> float:
    if math.isfinite(squared):
        return math.sqrt(squared)
    key = update.first_non_finite(context.layout)
    if key is not None:
        raise ReplyError(f"non_finite:{key}")
    # every value finite, only a float32 sum of squares (or difference) overflowed
    return exact_norm(update, context.layout, context.wire.deltas)


def screen_evaluate_reply(message: Message, registry: SiteRegistry) -> AcceptedEvaluate | Rejection:
    """Accept an evaluate reply (exactly a MetricRecord of the evaluate keys) or say why not."""
    node = node_of(message)
    site = registry.site_of(node)
    if message.has_error():
        return Rejection(node, site, "failed", error_reason(message.error.reason))
    if site is None:
        return Rejection(node, None, "rejected", "unregistered_node")
    try:
        records = _records(message, {wire.METRICS: MetricRecord}, {})
        metrics = parse_evaluate_metrics(dict(records[wire.METRICS]), registry.declarations[site])
    except ReplyError as error:
        return Rejection(node, site, "rejected", error.reason)
    except Exception as error:  # a reply never stops the server
        return Rejection(node, site, "rejected", short_reason(f"unreadable:{type(error).__name__}"))
    return AcceptedEvaluate(node, site, metrics)


def node_of(message: Message) -> int:
    try:
        return int(message.metadata.src_node_id)
    except Exception:
        return -1


def one_reply_per_node(
    screened: list[AcceptedTrain | AcceptedEvaluate | Rejection],
) -> list[AcceptedTrain | AcceptedEvaluate | Rejection]:
    """A node's second reply in a round is rejected (and so is any later one)."""
    seen: set[int] = set()
    result: list[AcceptedTrain | AcceptedEvaluate | Rejection] = []
    for item in screened:
        if not isinstance(item, Rejection) and item.node in seen:
            item = Rejection(item.node, item.site, "rejected", "duplicate_reply")
        seen.add(item.node)
        result.append(item)
    return result

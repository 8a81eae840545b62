"""The statistics phase before round 1: the federated EHR normaliser and backbone checks.

After the registration the server sends every bound node a statistics query (a QUERY with
``query-kind = "statistics"``, ``client.statistics``). Each site answers with the count, sum
and sum of squares per column of its training EHR (withheld below the audit threshold) and
the SHA-256 fingerprints of the backbones its feature cache was built with. The server

* excludes a site whose fingerprint for a backbone differs from the consortium's
  (``fingerprint_mismatch:<backbone>``): the run config's ``expected-fingerprints`` when
  given, else the fingerprint held by a strict majority of the sites reporting that
  backbone (no strict majority and no configured fingerprint: the run stops, naming every
  site's fingerprint, as nobody can tell which sites are right);
* excludes a site whose EHR statistics cannot come from plausible values
  (``implausible_ehr_statistics``, ``check_plausible_aggregates``);
* adds the other sites' aggregates into the federated ``EHRNormalizer`` (the same as one
  fitted on the pooled training EHR of every site), writes it to
  ``run_dir/ehr_normalizer.json`` and keeps it in the checkpoint state; the strategy sends
  it to every site in each round's ``RoundPlan``.

An excluded site is not sent training or evaluation; each round's metrics.json entry and
the audit name it with the reason.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from omnifuse_model import federation_schema as wire
from omnifuse_model.data.ehr.discretizer import NUM_FEATURES
from omnifuse_model.data.ehr.normalizer import (
    EHRAggregates,
    EHRNormalizer,
    check_plausible_aggregates,
    combine_aggregates,
)
from omnifuse_model.federation_replies import (
    STATISTICS,
    ReplyError,
    SiteStatistics,
    decode_statistics,
)
from omnifuse_model.round_plan import NormalizerState
from server.site_registry import SiteRegistry, error_reason, query_messages, short_reason

log = logging.getLogger(__name__)

NORMALIZER_FILE = "ehr_normalizer.json"


class FingerprintConflict(RuntimeError):
    """No strict majority for a backbone's fingerprint and none configured."""


@dataclass
class Preprocessing:
    """What the statistics phase decided; kept in the checkpoint state (plain JSON)."""

    normalizer: NormalizerState | None = None
    contributors: list[str] = field(default_factory=list)  # sites whose EHR is in it
    expected_fingerprints: dict[str, str] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)  # site -> named reason
    problems: dict[str, str] = field(default_factory=dict)  # site or node -> unused answer
    checked: list[str] = field(default_factory=list)  # sites whose fingerprints were checked

    def to_json(self) -> dict:
        return {
            "problems": dict(sorted(self.problems.items())),
            "checked": sorted(self.checked),
            "normalizer": None if self.normalizer is None else self.normalizer.model_dump(),
            "contributors": list(self.contributors),
            "expected_fingerprints": dict(sorted(self.expected_fingerprints.items())),
            "excluded": dict(sorted(self.excluded.items())),
        }

    @classmethod
    def from_json(cls, data: dict | None) -> Preprocessing:
        data = data or {}
        state = data.get("normalizer")
        return cls(
            normalizer=None if state is None else NormalizerState.model_validate(state),
            contributors=list(data.get("contributors", [])),
            expected_fingerprints=dict(data.get("expected_fingerprints", {})),
            excluded=dict(data.get("excluded", {})),
            problems=dict(data.get("problems", {})),
            checked=list(data.get("checked", [])),
        )


def statistics_messages(nodes: list[int], model_config_json: str, min_count: int) -> list[Message]:
    config = {
        wire.QUERY_KIND: wire.STATISTICS_QUERY,
        wire.MODEL_CONFIG: model_config_json,
        wire.AUDIT_MIN_COUNT: min_count,
    }
    return query_messages(nodes, config)


def read_statistics(
    replies: list[Message], registry: SiteRegistry, modality_names: list[str]
) -> tuple[dict[str, SiteStatistics], dict[str, str]]:
    """(site -> statistics, site or node -> why its answer is not used), by bound site."""
    answers: dict[str, SiteStatistics] = {}
    problems: dict[str, str] = {}
    for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
        node = reply.metadata.src_node_id
        site = registry.site_of(node)
        if site is None:
            problems[f"node {node}"] = "statistics:unbound_node"
            continue
        try:
            if reply.has_error():
                raise ReplyError(f"error_reply:{error_reason(reply.error.reason)}")
            content = reply.content
            if set(content.keys()) != {STATISTICS}:
                raise ReplyError("statistics:bad_records")
            answers[site] = decode_statistics(
                dict(content[STATISTICS]),
                modality_names,
                registry.declarations[site],
                NUM_FEATURES,
            )
        except ReplyError as error:
            problems[site] = error.reason
        except Exception as error:  # a reply never stops the server
            problems[site] = short_reason(f"statistics:unreadable:{type(error).__name__}")
    return answers, problems


def consortium_fingerprints(
    answers: dict[str, SiteStatistics], configured: dict[str, str]
) -> dict[str, str]:
    """Backbone -> the expected fingerprint: configured, else a strict majority's."""
    expected = dict(configured)
    backbones = sorted({b for a in answers.values() for b in a.fingerprints} - set(configured))
    for backbone in backbones:
        held = {
            s: a.fingerprints[backbone] for s, a in answers.items() if backbone in a.fingerprints
        }
        digest, votes = Counter(held.values()).most_common(1)[0]
        if 2 * votes <= len(held):
            named = ", ".join(f"{s}: {d[:12]}" for s, d in sorted(held.items()))
            raise FingerprintConflict(
                f"no strict majority of sites shares one {backbone} backbone ({named}); set "
                "the run config's expected-fingerprints to the consortium's"
            )
        expected[backbone] = digest
    return expected


def fingerprint_problem(
    answer: SiteStatistics, expected: dict[str, str], held: set[str] | None
) -> str | None:
    """Why a site's backbones are not the consortium's: one differs, or (with ``held``, the
    modalities it declared training samples of) one it holds is not named at all, which
    would otherwise skip the check."""
    wrong = sorted(b for b, d in answer.fingerprints.items() if expected.get(b, d) != d)
    if wrong:
        return f"fingerprint_mismatch:{wrong[0]}"
    missing = sorted(b for b in expected if b in (held or ()) and b not in answer.fingerprints)
    return f"fingerprint_missing:{missing[0]}" if missing else None


def decide(
    answers: dict[str, SiteStatistics],
    configured: dict[str, str],
    held: dict[str, set[str]] | None = None,
) -> Preprocessing:
    """Exclusions, expected fingerprints and the federated normaliser from the answers
    (``held``: site -> modalities it declared training samples of)."""
    expected = consortium_fingerprints(answers, configured)
    excluded: dict[str, str] = {}
    parts: dict[str, EHRAggregates] = {}
    for site, answer in sorted(answers.items()):
        problem = fingerprint_problem(answer, expected, (held or {}).get(site))
        if problem is not None:
            excluded[site] = problem
            continue
        if not answer.has_ehr():
            continue
        part = EHRAggregates(answer.ehr_count, answer.ehr_sums, answer.ehr_sumsq)
        try:
            check_plausible_aggregates(part, f"site '{site}'")
        except ValueError as error:
            log.warning("statistics: %s", error)
            excluded[site] = "implausible_ehr_statistics"
            continue
        parts[site] = part
    normalizer = None
    total = combine_aggregates(parts.values()) if parts else None
    if total is not None and total.count >= 2:
        normalizer = NormalizerState.of(
            EHRNormalizer.from_aggregates(total.count, total.sums, total.sumsq)
        )
    return Preprocessing(normalizer, sorted(parts), expected, excluded, checked=sorted(answers))


def held_modalities_of(registry: SiteRegistry) -> dict[str, set[str]]:
    """Site -> the modalities it declared training samples of at registration."""
    return {
        site: {m for m, n in declaration.num_present.items() if n > 0}
        for site, declaration in registry.declarations.items()
    }


def run_statistics_phase(
    grid: Grid,
    registry: SiteRegistry,
    model_config_json: str,
    modality_names: list[str],
    min_count: int,
    configured: dict[str, str],
    timeout: float,
) -> Preprocessing:
    """Ask every bound node for its statistics and decide (see the module docstring)."""
    nodes = sorted(registry.nodes)
    messages = statistics_messages(nodes, model_config_json, min_count)
    replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
    answers, problems = read_statistics(replies, registry, modality_names)
    for name, reason in problems.items():
        log.warning("statistics phase: %s: %s", name, reason)
    decided = decide(answers, configured, held_modalities_of(registry))
    for site, reason in decided.excluded.items():
        log.warning("statistics phase: site %s excluded: %s", site, reason)
    # A site whose answer failed is not excluded: it is asked to train and, if it fails
    # every round, the run fails naming it.
    decided.problems = problems
    for site in sorted(set(registry.declarations) - set(answers) - set(problems)):
        decided.problems[site] = "statistics:no_answer"
    return decided


def check_late_sites(
    grid: Grid,
    registry: SiteRegistry,
    preprocessing: Preprocessing,
    model_config_json: str,
    modality_names: list[str],
    min_count: int,
    timeout: float,
) -> None:
    """Sites bound after the statistics phase (a late SuperNode) answer the statistics query
    before their first round: excluded when a fingerprint differs from the consortium's
    (their EHR sums do not change the normaliser the other sites already train with). A
    site without a usable answer is asked again with back-off (1, 2, 4, ... rounds later),
    not every round; like a site whose answer failed in the phase, it is still asked to
    train."""
    checked = set(preprocessing.checked) | set(preprocessing.excluded)
    backoff = registry.statistics_backoff
    backoff.tick()
    late = sorted(n for n, s in registry.nodes.items() if s not in checked and backoff.due(n))
    if not late:
        return
    messages = statistics_messages(late, model_config_json, min_count)
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    answers, problems = read_statistics(replies, registry, modality_names)
    preprocessing.problems.update(problems)
    for node in late:  # no usable answer: asked again with back-off, not every round
        if registry.nodes[node] in answers:
            backoff.answered(node)
        else:
            backoff.missed(node)
    held = held_modalities_of(registry)
    for site, answer in sorted(answers.items()):
        expected = preprocessing.expected_fingerprints
        problem = fingerprint_problem(answer, expected, held.get(site))
        if problem is not None:
            preprocessing.excluded[site] = problem
            log.warning("statistics: late site %s excluded: %s", site, preprocessing.excluded[site])
        preprocessing.checked.append(site)


def write_normalizer(run_dir, preprocessing: Preprocessing) -> None:
    """``run_dir/ehr_normalizer.json`` (the federated normaliser), when there is one."""
    if preprocessing.normalizer is not None:
        state = preprocessing.normalizer.normalizer().to_dict()
        (run_dir / NORMALIZER_FILE).write_text(json.dumps(state, allow_nan=False))

"""Which node is which site: a registration before round 1 binds node ids to site names.

The server sends every connected node a registration query (a QUERY message carrying the
model config and the run's audit-min-count); each ClientApp answers with its site name and
declared data sizes, rounded as its rounds round them
(``omnifuse_model.federation_replies.SiteDeclaration``). From then on every record is named
by the site bound to the sending node, never by what a reply claims; the declared sizes and
the last accepted round's counts bound what later replies may report. The registry is saved
in every checkpoint, so a resumed run keeps it; a site whose old node is gone (a new
simulation, a restarted SuperNode) may bind its new node if it declares the same sizes.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from omnifuse_model import federation_schema as wire
from omnifuse_model.federation_replies import (
    REGISTRATION,
    ReplyError,
    SiteDeclaration,
    decode_declaration,
    safe_reason,
)

log = logging.getLogger(__name__)

REASON_CHARS = 300
ALREADY_BOUND = "site_already_bound:"


ANSI_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
EXCEPTION_LINE = re.compile(r"^\s*[\w.]*(Error|Exception)\b.*:\s*\S")
FLOWER_MESSAGE = "occurred. Message: "  # Flower's ClientAppException wraps the site's text


def error_reason(text: object) -> str:
    """The useful part of an error reply's reason: the site's own exception message rather
    than the engine's wrapping (Ray's traceback, colour codes), shortened."""
    try:
        raw = ANSI_CODES.sub("", str(text))
    except Exception:  # a reason must never raise
        return "unprintable reason"
    if FLOWER_MESSAGE in raw:
        raw = raw.rsplit(FLOWER_MESSAGE, 1)[1]
    else:
        lines = [line for line in raw.splitlines() if EXCEPTION_LINE.match(line)]
        raw = lines[-1] if lines else raw
    return short_reason(raw.strip().removesuffix("'>"))


def short_reason(text: object) -> str:
    """A reason fit for logs and metrics.json: one printable ASCII line of at most
    REASON_CHARS characters."""
    return safe_reason(text, REASON_CHARS)


@dataclass
class Backoff:
    """Which nodes to ask a query again, once per round's check: a node that did not answer
    k times in a row is asked again only 2^k checks later, so a silent node costs the
    federation a query timeout in rounds 1, 3, 7, 15, ... rather than in every round."""

    checks: int = 0
    misses: dict[int, int] = field(default_factory=dict)
    next_check: dict[int, int] = field(default_factory=dict)

    def tick(self) -> None:
        self.checks += 1

    def due(self, node: int) -> bool:
        return self.next_check.get(node, 0) <= self.checks

    def missed(self, node: int) -> None:
        self.misses[node] = self.misses.get(node, 0) + 1
        self.next_check[node] = self.checks + 2 ** min(self.misses[node], 20)
        log.warning(
            "node %d gave no usable answer (%d times in a row); asked again in %d rounds",
            node,
            self.misses[node],
            self.next_check[node] - self.checks,
        )

    def answered(self, node: int) -> None:
        self.misses.pop(node, None)
        self.next_check.pop(node, None)


@dataclass
class SiteRegistry:
    """node id -> site, each site's declaration, and its last accepted counts."""

    nodes: dict[int, str] = field(default_factory=dict)
    declarations: dict[str, SiteDeclaration] = field(default_factory=dict)
    last_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    # not saved: when to ask an unbound node (registration) or a late site (statistics) again
    registration_backoff: Backoff = field(default_factory=Backoff, repr=False, compare=False)
    statistics_backoff: Backoff = field(default_factory=Backoff, repr=False, compare=False)
    refused: dict[int, str] = field(default_factory=dict)  # node -> why it is not bound

    def site_of(self, node: int) -> str | None:
        return self.nodes.get(node)

    def may_ask_again(self, node: int, connected: set[int]) -> bool:
        """Whether an unbound node may be asked to register (again): never asked, or
        refused for a reason that can pass: an error reply (with back-off), or its site held
        by a node that is gone now (a restarted SuperNode whose old id was still listed).
        A malformed or changed declaration stays refused for that node id."""
        reason = self.refused.get(node)
        if reason is None or reason.startswith("error_reply:"):
            return True
        if reason.startswith(ALREADY_BOUND):
            site = reason.removeprefix(ALREADY_BOUND).rsplit(":node ", 1)[0]
            holder = next((n for n, s in self.nodes.items() if s == site), None)
            return holder is None or holder not in connected
        return False

    def bind(self, node: int, declaration: SiteDeclaration, connected: set[int]) -> str | None:
        """Bind ``node`` to the declared site; the reason when refused, else None."""
        site = declaration.site
        holder = next((n for n, s in self.nodes.items() if s == site), None)
        if holder == node:
            return None if self.declarations[site] == declaration else "declaration_changed"
        if holder is not None:
            if holder in connected:
                return f"{ALREADY_BOUND}{site}:node {holder}"
            if self.declarations[site] != declaration:
                return f"declaration_changed:{site}"
            del self.nodes[holder]  # the site's old node is gone: its new node takes over
        if node in self.nodes:
            return f"node_already_bound:{self.nodes[node]}"
        self.nodes[node] = site
        self.declarations[site] = declaration
        self.refused.pop(node, None)
        return None

    def to_json(self) -> dict:
        return {
            "nodes": {str(node): site for node, site in sorted(self.nodes.items())},
            "declarations": {s: d.model_dump() for s, d in sorted(self.declarations.items())},
            "last_counts": {s: dict(c) for s, c in sorted(self.last_counts.items())},
        }

    @classmethod
    def from_json(cls, data: dict | None) -> SiteRegistry:
        data = data or {}
        return cls(
            nodes={int(node): site for node, site in data.get("nodes", {}).items()},
            declarations={
                s: SiteDeclaration.model_validate(d)
                for s, d in data.get("declarations", {}).items()
            },
            last_counts={s: dict(c) for s, c in data.get("last_counts", {}).items()},
        )

    def register(
        self, replies: list[Message], modality_names: list[str], connected: set[int]
    ) -> None:
        """Bind each answering node, in node-id order (the first of two claims wins);
        ``connected``: the node ids connected now (a bound site's node that is not may be
        replaced by a new node declaring the same sizes)."""
        answered: set[int] = set()
        for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
            node = reply.metadata.src_node_id
            if node in answered:  # one query, one answer: a second cannot undo the first
                log.warning("registration: node %d answered twice; the first answer stands", node)
                continue
            answered.add(node)
            reason = self._registration_refusal(reply, modality_names, connected)
            if reason is None:
                log.info("registration: node %d is site %s", node, self.nodes[node])
                continue
            self.refused[node] = reason
            log.warning("registration: node %d refused: %s", node, reason)

    def _registration_refusal(
        self, reply: Message, modality_names: list[str], connected: set[int]
    ) -> str | None:
        if reply.has_error():
            return error_reason(f"error_reply:{error_reason(reply.error.reason)}")
        try:
            content = reply.content
            if set(content.keys()) != {REGISTRATION} or not isinstance(
                content[REGISTRATION], ConfigRecord
            ):
                return short_reason(
                    f"registration:bad_records:{sorted(map(str, content.keys()))[:3]}"
                )
            declaration = decode_declaration(dict(content[REGISTRATION]), modality_names)
        except ReplyError as error:
            return error.reason
        except Exception as error:  # a reply never stops the server
            return short_reason(f"registration:unreadable:{type(error).__name__}")
        return self.bind(reply.metadata.src_node_id, declaration, connected)


def registration_messages(
    nodes: list[int], model_config_json: str, audit_min_count: int
) -> list[Message]:
    """The registration query: the model config and the run's audit-min-count (sites round
    the sizes they declare to multiples of it, as they round every count a round sends)."""
    config = {wire.MODEL_CONFIG: model_config_json, wire.AUDIT_MIN_COUNT: audit_min_count}
    return query_messages(nodes, config)


def query_messages(nodes: list[int], config: dict[str, str | int]) -> list[Message]:
    """One QUERY per node carrying ``config`` (registration and the statistics phase)."""
    return [
        Message(
            content=RecordDict({wire.CONFIG: ConfigRecord(dict(config))}),
            message_type=MessageType.QUERY,
            dst_node_id=node,
        )
        for node in nodes
    ]


def register_newcomers(
    grid: Grid,
    registry: SiteRegistry,
    model_config_json: str,
    modality_names: list[str],
    timeout: float,
    audit_min_count: int,
) -> None:
    """Ask the unbound nodes to register now: those that connected since the registration
    (deployment: a late SuperNode), or did not answer it, or were refused for a reason that
    can pass (``SiteRegistry.may_ask_again``); a node that does not answer is asked again
    with back-off (``Backoff``), so a silent node does not cost a timeout every round."""
    connected = set(grid.get_node_ids())
    backoff = registry.registration_backoff
    backoff.tick()
    ask = [
        node
        for node in sorted(connected - set(registry.nodes))
        if registry.may_ask_again(node, connected) and backoff.due(node)
    ]
    if not ask:
        return
    replies = list(
        grid.send_and_receive(
            registration_messages(ask, model_config_json, audit_min_count), timeout=timeout
        )
    )
    registry.register(replies, modality_names, connected)
    replied = {reply.metadata.src_node_id for reply in replies}
    for node in ask:
        if node in registry.nodes:
            backoff.answered(node)
        elif node not in replied or registry.refused.get(node, "").startswith("error_reply:"):
            backoff.missed(node)


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """The connected node ids, once at least ``minimum`` are there (or at the timeout)."""
    deadline = time.monotonic() + timeout
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < minimum and time.monotonic() < deadline:
        time.sleep(1.0)
        nodes = sorted(grid.get_node_ids())
    return nodes


def register_sites(
    grid: Grid,
    registry: SiteRegistry,
    model_config_json: str,
    modality_names: list[str],
    min_nodes: int,
    timeout: float,
    audit_min_count: int,
) -> dict[str, float | int]:
    """Send the registration query to every connected node and bind the answers.

    Returns what ``startup.json`` records: seconds taken, nodes asked, nodes that answered
    (in simulation this is also the engine's start-up, timed apart from round 1).
    """
    started = time.perf_counter()
    nodes = wait_for_nodes(grid, min_nodes, timeout)
    messages = registration_messages(nodes, model_config_json, audit_min_count)
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    registry.register(replies, modality_names, set(nodes))
    answered = sum(1 for reply in replies if not reply.has_error())
    return {
        "startup_seconds": time.perf_counter() - started,
        "nodes": len(nodes),
        "answered": answered,
        "registered": sum(1 for node in nodes if node in registry.nodes),
    }

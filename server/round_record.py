"""One ``RoundRecord`` per round, and the recorder that checkpoints and writes them.

The strategy fills a round's record while it screens and averages the replies; the recorder
(Flower's ``evaluate_fn``, called once per round after federated evaluation) adds the
server-side test metrics and wall time, then writes the round checkpoint, metrics.json and
the audit table. At the end it names every site that never had an update accepted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord

from omnifuse_model import federation_schema as wire
from server.audit_log import write_audit
from server.checkpoint import ServerState, as_tensor, save_round

log = logging.getLogger(__name__)


AGGREGATE = "(aggregate)"  # the participant named when a round's aggregate is refused


@dataclass
class RoundRecord:
    """Everything the server learnt in one (global) round."""

    round: int
    audit: list[wire.AuditRow] = field(default_factory=list)
    bytes: dict[str, int] = field(default_factory=dict)
    train: dict[str, float] = field(default_factory=dict)
    evaluate_clients: dict[str, float] = field(default_factory=dict)
    problems: list[dict] = field(default_factory=list)
    evaluate_problems: list[dict] = field(default_factory=list)
    accepted_sites: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # site -> why it was not asked
    server: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    note: str = ""

    def not_aggregated(self, status: str, reason: str) -> None:
        """The round's model was kept: named as the aggregate's problem; no site counts as
        accepted this round and their audit rows say why their update was not used."""
        self.problems.append({"site": AGGREGATE, "status": status, "reason": reason})
        self.accepted_sites = []
        self.audit = [
            row.model_copy(update={"update_status": f"not_aggregated:{reason}"})
            if row.update_status == "accepted"
            else row
            for row in self.audit
        ]

    def aggregated(self) -> bool:
        """Whether the round's aggregate was adopted (no problem names the aggregate)."""
        return all(problem.get("site") != AGGREGATE for problem in self.problems)

    def history_entry(self) -> dict:
        """This round's entry in metrics.json."""
        entry = {
            "train": self.train,
            "evaluate_clients": self.evaluate_clients,
            "server": self.server,
            "bytes": self.bytes,
            "failed_or_rejected": self.problems,
            "evaluate_failed_or_rejected": self.evaluate_problems,
            "excluded": dict(sorted(self.excluded.items())),
            "wall_seconds": self.wall_seconds,
        }
        if self.note:
            entry["note"] = self.note
        return entry


def participant(problem: dict) -> str:
    """How a failing or rejected reply's sender is named: its bound site, else its node."""
    return problem.get("site") or f"node {problem['node']}"


@dataclass
class RoundRecorder:
    """Flower's ``evaluate_fn``: after each round, record, checkpoint and write the files."""

    run_dir: Path
    state: ServerState
    records: Callable[[int], RoundRecord]
    current: Callable[[], tuple[dict[str, str], str, dict]]  # laziness, global, registry
    global_round: Callable[[int], int]
    server_evaluate: Callable[[dict[str, torch.Tensor]], dict[str, float]] | None = None
    note: str = ""
    tracker: Callable[[int, dict, list[wire.AuditRow]], None] | None = None  # e.g. TensorBoard
    rounds_run: list[RoundRecord] = field(default_factory=list)
    clock: float = field(default_factory=time.perf_counter)
    audit: list[wire.AuditRow] | None = None  # state.audit_rows as rows, kept across rounds

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        record = self.records(self.global_round(server_round))
        weights = {k: v.numpy() for k, v in arrays.items()}
        if self.server_evaluate is not None:
            record.server = self.server_evaluate({k: as_tensor(v) for k, v in weights.items()})
        now = time.perf_counter()
        record.wall_seconds, self.clock = now - self.clock, now
        if self.note and not self.rounds_run:
            record.note = self.note
        self.rounds_run.append(record)
        self._save(record, weights)
        if self.tracker is not None:
            self.tracker(record.round, record.history_entry(), record.audit)
        return MetricRecord(record.server) if record.server else None

    def _save(self, record: RoundRecord, weights: dict[str, np.ndarray]) -> None:
        site_laziness, global_laziness, registry = self.current()
        state = self.state
        state.round = record.round
        state.site_laziness, state.global_laziness = dict(site_laziness), global_laziness
        state.sites = registry
        state.history[str(record.round)] = record.history_entry()
        dumped = [r.model_dump(mode="json") for r in record.audit]
        state.audit_rows.extend(dumped)
        save_round(self.run_dir, weights, state)
        if self.audit is None:  # a resumed run's earlier rows: validated once
            self.audit = [wire.AuditRow.model_validate(r) for r in state.audit_rows]
        else:
            self.audit.extend(record.audit)
        write_audit(self.run_dir, self.audit, dumped=state.audit_rows)
        (self.run_dir / "metrics.json").write_text(json.dumps(state.history, indent=2))

    def never_accepted(self) -> dict[str, str]:
        """Sites (or unbound nodes) that failed or were rejected in every round this run
        asked them in, with the last reason."""
        accepted = {site for record in self.rounds_run for site in record.accepted_sites}
        if any(record.aggregated() for record in self.rounds_run):
            accepted.add(AGGREGATE)  # fails the run only when no round was aggregated
        failing: dict[str, str] = {}
        for record in self.rounds_run:
            for problem in record.problems:
                name = participant(problem)
                if name not in accepted:
                    failing[name] = f"{problem['status']}: {problem['reason']}"
        return failing

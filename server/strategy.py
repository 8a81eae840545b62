"""OmniFuse's federated strategy: FedAvg/FedProx with modality-aware aggregation.

Subclasses Flower's FedAvg and overrides its hooks only (no copy of ``start``):
- ``configure_train`` adds the model/train config, the round number that survives resumes,
  each site's (or the global) lazy combination and FedProx's mu; node sampling is seeded by
  (seed, round) so a resumed run samples as an uninterrupted one would.
- ``aggregate_train`` averages each modality's parameters only over sites that trained the
  modality, weighted by the samples in which it was present; shared parameters by sample
  count. Replies are ordered by site name so sums are reproducible. It also collects the
  audit rows and, for global TLA, merges per-combination distances weighted by counts.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from omnifuse_model import federation_schema as wire
from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.laziness import LazinessMiner
from omnifuse_model.round_plan import RoundPlan
from server.run_config import FederationRunConfig
from server.update_validation import update_rejection

log = logging.getLogger(__name__)


def modality_aware_average(
    states: list[dict[str, np.ndarray]],
    metrics: list[dict[str, float]],
    modality_names: list[str],
    previous: dict[str, np.ndarray] | None,
    modality_aware: bool = True,
    uniform: bool = False,
) -> dict[str, np.ndarray]:
    """Weighted average of site states (all with the same keys).

    Parameters of modality m are weighted by ``num-present.m`` (sites without m get weight
    0; when no site trained m the previous global value is kept); all others by
    ``num-examples``. With ``modality_aware=False`` everything is weighted by sample count;
    with ``uniform=True`` every site weighs the same for every parameter (central DP: each
    site's influence must be bounded by clipping_norm / n for the Gaussian noise to give the
    stated guarantee).
    """
    if not states:
        raise ValueError("no site states to aggregate")
    keys = list(states[0])
    for index, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            raise ValueError(f"site state {index} has different parameter keys")
    examples = np.array([float(m[wire.NUM_EXAMPLES]) for m in metrics])
    if uniform:
        examples = np.ones(len(states))
        modality_aware = False
    result: dict[str, np.ndarray] = {}
    for key in keys:
        modality = wire.parameter_modality(key, modality_names) if modality_aware else None
        weights = (
            np.array([float(m[wire.present_key(modality)]) for m in metrics])
            if modality is not None
            else examples
        )
        if weights.sum() <= 0:
            if previous is None:
                raise ValueError(f"parameter '{key}': no site trained it and no previous value")
            result[key] = previous[key]
            continue
        stacked = np.stack([state[key].astype(np.float64) for state in states])
        average = np.tensordot(weights / weights.sum(), stacked, axes=1)
        result[key] = average.astype(states[0][key].dtype)
    return result


def merge_tla(
    replies: list[dict[str, object]], modality_names: list[str], reduction: str
) -> tuple[str, ...] | None:
    """Global TLA: merge per-site sums/counts and take the argmax combination (Eq. 15)."""
    miner = LazinessMiner(modality_names, reduction)
    for record in replies:
        sums, counts = wire.decode_tla_sums(record)
        miner.merge(sums, counts)
    return miner.report().lazy_combination


class OmniFuseStrategy(FedAvg):
    """FedAvg/FedProx for OmniFuse with modality-aware aggregation and TLA bookkeeping."""

    def __init__(
        self,
        run: FederationRunConfig,
        model_config: OmniFuseConfig,
        round_offset: int = 0,
        site_laziness: dict[str, str] | None = None,
        global_laziness: str = "",
    ) -> None:
        super().__init__(
            fraction_train=run.fraction_train,
            fraction_evaluate=run.fraction_evaluate,
            min_train_nodes=run.min_train_nodes,
            min_evaluate_nodes=run.min_evaluate_nodes,
            min_available_nodes=run.min_available_nodes,
            weighted_by_key=wire.NUM_EXAMPLES,
            arrayrecord_key=wire.ARRAYS,
            configrecord_key=wire.CONFIG,
        )
        self.run = run
        self.model_config = model_config
        self.round_offset = round_offset
        self.site_laziness = dict(site_laziness or {})
        self.global_laziness = global_laziness
        self.previous: dict[str, np.ndarray] | None = None
        self.round_audit: dict[int, list[wire.AuditRow]] = {}
        self.round_bytes: dict[int, dict[str, int]] = {}
        self.round_train_metrics: dict[int, dict[str, float]] = {}
        self.round_eval_metrics: dict[int, dict[str, float]] = {}
        self.round_problems: dict[int, list[dict]] = {}

    # -- helpers --------------------------------------------------------------------------
    def global_round(self, server_round: int) -> int:
        return self.round_offset + server_round

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        run = self.run
        plan = RoundPlan(
            model=self.model_config,
            train=run.train_config(),
            global_round=self.global_round(server_round),
            tla_scope=run.tla_scope,
            lazy_combination=self.global_laziness if run.tla_scope == "global" else "",
            site_laziness=self.site_laziness,
            proximal_mu=run.proximal_mu if run.strategy == "fedprox" else 0.0,
            audit_min_count=run.audit_min_count,
            planned_rounds=run.num_server_rounds,
            # one privacy ledger per run directory: the same across resumes of the run
            privacy_ledger=hashlib.sha256(str(run.run_dir.resolve()).encode()).hexdigest()[:16],
        )
        config[wire.ROUND_PLAN] = plan.model_dump_json()
        return config

    # -- Flower hooks ---------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        random.seed(self.run.seed * 100_003 + self.global_round(server_round))
        self.previous = {k: v.numpy() for k, v in arrays.items()}
        messages = list(
            super().configure_train(
                server_round, arrays, self.round_config(server_round, config), grid
            )
        )
        self.round_bytes[self.global_round(server_round)] = {
            "sent": arrays.count_bytes() * len(messages)
        }
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        random.seed(self.run.seed * 100_003 + self.global_round(server_round) + 50_000)
        return super().configure_evaluate(
            server_round, arrays, self.round_config(server_round, config), grid
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        global_round = self.global_round(server_round)
        # validate=False: Flower's own consistency check raises on the first odd reply and
        # would stop the round; each reply is checked here instead and rejected alone.
        valid, failed = self._check_and_log_replies(list(replies), is_train=False, validate=False)
        problems = self.round_problems.setdefault(global_round, [])
        for message in failed:
            reason = message.error.reason
            log.warning(
                "round %d: node %d failed: %s", global_round, message.metadata.src_node_id, reason
            )
            problems.append(
                {
                    "node": message.metadata.src_node_id,
                    "status": "failed",
                    "reason": str(reason)[:500],
                }
            )
        accepted, rows, states, rejected_rows = [], [], [], []
        for message in valid:
            verdict = self._verdict(message)
            row = verdict[1]
            if verdict[0] is None:
                accepted.append(message)
                rows.append(row)
                states.append(verdict[2])
                continue
            log.warning(
                "round %d: update from %s rejected: %s",
                global_round,
                row.site if row else f"node {message.metadata.src_node_id}",
                verdict[0],
            )
            problems.append(
                {
                    "node": message.metadata.src_node_id,
                    "status": "rejected",
                    "site": row.site if row else None,
                    "reason": verdict[0],
                }
            )
            if row is not None:
                rejected_rows.append(
                    row.model_copy(update={"update_status": f"rejected:{verdict[0]}"})
                )
        self.round_audit[global_round] = sorted(rows + rejected_rows, key=lambda r: r.site)
        self.round_bytes.setdefault(global_round, {})["received"] = sum(
            m.content[wire.ARRAYS].count_bytes() for m in valid if wire.ARRAYS in m.content
        )
        if len(accepted) < max(1, self.min_train_nodes):
            log.warning(
                "round %d: %d accepted updates, fewer than min-train-nodes %d; the "
                "global model is kept",
                global_round,
                len(accepted),
                self.min_train_nodes,
            )
            return None, None
        order = sorted(range(len(accepted)), key=lambda i: rows[i].site)
        valid, rows = [accepted[i] for i in order], [rows[i] for i in order]
        states = [states[i] for i in order]
        metrics = [dict(m.content[wire.METRICS]) for m in valid]
        averaged = modality_aware_average(
            states,
            metrics,
            self.model_config.modality_names,
            self.previous,
            self.run.modality_aware,
            uniform=self.run.central_dp != "off",
        )
        for row in rows:
            if row.lazy_combination:
                self.site_laziness[row.site] = row.lazy_combination
        if self.run.tla_scope == "global":
            merged = merge_tla(
                [dict(m.content[wire.TLA_SUMS]) for m in valid if wire.TLA_SUMS in m.content],
                self.model_config.modality_names,
                self.model_config.tla_reduction,
            )
            self.global_laziness = "+".join(merged) if merged else ""
        aggregated = weighted_metrics(metrics)
        # the sum, not the mean: the simulation-overhead benchmark compares it to wall time
        aggregated[wire.TRAIN_SECONDS + "-sum"] = float(
            sum(m.get(wire.TRAIN_SECONDS, 0.0) for m in metrics)
        )
        self.round_train_metrics[global_round] = aggregated
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in averaged.items()})
        log.info(
            "round %d: aggregated %d sites, bytes sent %d received %d",
            global_round,
            len(valid),
            self.round_bytes[global_round].get("sent", 0),
            self.round_bytes[global_round]["received"],
        )
        return arrays, MetricRecord(aggregated)

    def _verdict(
        self, message: Message
    ) -> tuple[str | None, wire.AuditRow | None, dict[str, np.ndarray] | None]:
        """(rejection reason or None, the reply's audit row when it decodes, its weights)."""
        content = message.content
        try:
            row = wire.decode_audit(content[wire.AUDIT])
        except (KeyError, ValueError) as error:
            return f"bad_audit:{type(error).__name__}", None, None
        if wire.ARRAYS not in content or wire.METRICS not in content:
            return "missing_records", row, None
        state = {k: v.numpy() for k, v in content[wire.ARRAYS].items()}
        reason = update_rejection(
            state,
            self.previous or {},
            dict(content[wire.METRICS]),
            self.model_config.modality_names,
            self.run.max_update_norm or None,
        )
        return reason, row, state

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        valid, _ = self._check_and_log_replies(list(replies), is_train=False)
        if not valid:
            return None
        aggregated = weighted_metrics([dict(m.content[wire.METRICS]) for m in valid])
        self.round_eval_metrics[self.global_round(server_round)] = aggregated
        return MetricRecord(aggregated)


def weighted_metrics(metrics: list[dict[str, float]]) -> dict[str, float]:
    """Sample-weighted mean of each metric over sites; undefined values (-1) are skipped.

    Counts are summed; DP epsilon (reported by DP-SGD sites only) is the largest any site
    has spent.
    """
    result: dict[str, float] = {
        wire.NUM_EXAMPLES: float(sum(m[wire.NUM_EXAMPLES] for m in metrics))
    }
    keys = {k for m in metrics for k in m} - {wire.NUM_EXAMPLES}
    for key in sorted(keys):
        if key.startswith("num-present."):
            result[key] = float(sum(m.get(key, 0) for m in metrics))
            continue
        if key == wire.EPSILON:
            result[key] = float(max(m[key] for m in metrics if key in m))
            continue
        pairs = [(m[key], m[wire.NUM_EXAMPLES]) for m in metrics if key in m and m[key] != -1.0]
        total = sum(w for _, w in pairs)
        result[key] = float(sum(v * w for v, w in pairs) / total) if total else -1.0
    return result

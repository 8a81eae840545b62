"""OmniFuse's federated strategy: FedAvg/FedProx with modality-aware aggregation.

Subclasses Flower's FedAvg and overrides its hooks only (no copy of ``start``):
- ``configure_train`` adds the model/train config, the round number that survives resumes,
  each site's (or the global) lazy combination and FedProx's mu; node sampling is seeded by
  (seed, round) so a resumed run samples as an uninterrupted one would.
- ``aggregate_train`` first screens every reply (``server.reply_screening``: the wire
  format in full, the site bound to the sending node, update validation), then averages the
  accepted ones with the run's rule (``server.aggregation``): by default each modality's
  parameters only over sites that trained the modality, weighted by the samples in which it
  was present, shared parameters by sample count; or coordinate-wise median / trimmed mean
  per modality group (``aggregation`` in the run config).
  Replies are ordered by their bound site name so sums are reproducible. The round's audit
  rows, rejections, bytes and metrics go to its ``RoundRecord``; for global TLA the
  per-combination distances are merged weighted by counts.
- ``aggregate_evaluate`` screens evaluate replies the same way.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from omnifuse_model import federation_schema as wire
from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.round_plan import RoundPlan
from omnifuse_model.wire_format import UPLINK_MODALITIES, fits_wire, held_modalities
from server.master_weights import MasterWeights
from server.reply_screening import (
    AcceptedEvaluate,
    AcceptedTrain,
    Rejection,
    TrainContext,
    one_reply_per_node,
    screen_evaluate_reply,
    screen_train_reply,
)
from server.round_metrics import merge_tla, status_row, tla_record, weighted_metrics
from server.round_record import RoundRecord
from server.run_config import FederationRunConfig
from server.site_registry import SiteRegistry, register_newcomers
from server.statistics_phase import Preprocessing, check_late_sites
from server.update_rows import UpdateLayout

log = logging.getLogger(__name__)


class OmniFuseStrategy(FedAvg):
    """FedAvg/FedProx for OmniFuse with modality-aware aggregation and TLA bookkeeping."""

    def __init__(
        self,
        run: FederationRunConfig,
        model_config: OmniFuseConfig,
        round_offset: int = 0,
        site_laziness: dict[str, str] | None = None,
        global_laziness: str = "",
        registry: SiteRegistry | None = None,
        preprocessing: Preprocessing | None = None,
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
        self.registry = registry if registry is not None else SiteRegistry()
        self.preprocessing = preprocessing if preprocessing is not None else Preprocessing()
        self.previous: dict[str, np.ndarray] | None = None  # the float32 master weights
        self.records: dict[int, RoundRecord] = {}
        # rejections a central-DP wrapper found before it clipped (``server.central_dp``)
        self.prescreened: dict[int, list[Rejection]] = {}
        self.wire = run.wire_format()
        self.weights = MasterWeights(run, model_config.modality_names)

    def layout(self) -> UpdateLayout:
        """The flat layout of the master weights (rebuilt when they change)."""
        return self.weights.layout(self.previous or {})

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
            ehr_normalizer=self.preprocessing.normalizer,
            wire=self.wire,
        )
        config[wire.ROUND_PLAN] = plan.model_dump_json()
        return config

    # -- Flower hooks ---------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        register_newcomers(
            grid,
            self.registry,
            self.model_config.model_dump_json(),
            self.model_config.modality_names,
            self.run.query_timeout,
            self.run.audit_min_count,
        )
        check_late_sites(
            grid,
            self.registry,
            self.preprocessing,
            self.model_config.model_dump_json(),
            self.model_config.modality_names,
            self.run.audit_min_count,
            self.run.query_timeout,
        )
        random.seed(self.run.seed * 100_003 + self.global_round(server_round))
        self.previous, downlink = self.weights.round_arrays(arrays)
        messages = self.with_uplink_keys(
            self.without_excluded(
                server_round,
                super().configure_train(
                    server_round, downlink, self.round_config(server_round, config), grid
                ),
            )
        )
        self.record(self.global_round(server_round)).bytes["sent"] = downlink.count_bytes() * len(
            messages
        )
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        random.seed(self.run.seed * 100_003 + self.global_round(server_round) + 50_000)
        _, downlink = self.weights.round_arrays(arrays)
        return self.without_excluded(
            server_round,
            super().configure_evaluate(
                server_round, downlink, self.round_config(server_round, config), grid
            ),
        )

    def with_uplink_keys(self, messages: list[Message]) -> list[Message]:
        """With omission, each train message names the modalities whose parameter groups
        its site sends back: those it registered as held (its own copy of the config)."""
        if not self.wire.omit_unheld:
            return messages
        for message in messages:
            site = self.registry.site_of(message.metadata.dst_node_id)
            declaration = self.registry.declarations.get(site) if site is not None else None
            held = held_modalities(declaration.num_present) if declaration is not None else []
            config = ConfigRecord(dict(message.content[wire.CONFIG]))
            config[UPLINK_MODALITIES] = held
            message.content = RecordDict(
                {wire.ARRAYS: message.content[wire.ARRAYS], wire.CONFIG: config}
            )
        return messages

    def without_excluded(self, server_round: int, messages: Iterable[Message]) -> list[Message]:
        """The messages minus those to a site the statistics phase excluded (recorded with
        its reason in this round's record and audit)."""
        excluded = self.preprocessing.excluded
        record = self.record(self.global_round(server_round))
        kept = []
        for message in messages:
            site = self.registry.site_of(message.metadata.dst_node_id)
            if site in excluded:
                record.excluded[site] = excluded[site]
                continue
            kept.append(message)
        return kept

    def record(self, global_round: int) -> RoundRecord:
        """This round's record (created on first use)."""
        return self.records.setdefault(global_round, RoundRecord(round=global_round))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen every reply (rejections named, logged, audited), then average the rest."""
        global_round = self.global_round(server_round)
        accepted = self.screen_train(global_round, list(replies))
        needed = max(1, self.min_train_nodes)
        if len(accepted) < needed:
            log.warning(
                "round %d: %d accepted updates, fewer than min-train-nodes %d; the "
                "global model is kept",
                global_round,
                len(accepted),
                self.min_train_nodes,
            )
            reason = f"too_few_accepted:{len(accepted)}<{needed}"
            self.record(global_round).not_aggregated("skipped", reason)
            return None, None
        return self.average(global_round, accepted)

    def screen(
        self, global_round: int, replies: list[Message]
    ) -> tuple[list[AcceptedTrain], list[Rejection]]:
        """(accepted in site order, rejected); nothing is recorded yet.

        Each reply is screened on its own (records, metrics, audit row, the update's keys,
        dtypes, shapes and byte counts); then every update is read once, in one streamed pass
        (``server.update_stream``) that gives each one's norm and, with FedAvg, the aggregate
        of all of them; a non-finite or too large update is rejected and, only then, the
        aggregate is taken again without it."""
        context = TrainContext(
            self.registry,
            global_round,
            self.previous or {},
            self.model_config.modality_names,
            self.run.max_update_norm or None,
            self.wire,
            self.layout(),
            self.run.audit_min_count,
        )
        screened = one_reply_per_node([screen_train_reply(m, context) for m in replies])
        candidates = sorted(
            (s for s in screened if isinstance(s, AcceptedTrain)), key=lambda a: a.site
        )
        rejected = [s for s in screened if isinstance(s, Rejection)]
        return self.weights.screen_norms(candidates, context, rejected), rejected

    def screen_train(self, global_round: int, replies: list[Message]) -> list[AcceptedTrain]:
        """Accepted replies in site order (:meth:`screen`); the rejections, with those a
        central-DP wrapper found before it clipped (``prescreened``), go to the round's
        record and audit."""
        record = self.record(global_round)
        accepted, rejected = self.screen(global_round, replies)
        rejected = self.prescreened.pop(global_round, []) + rejected
        rows = [a.row for a in accepted]
        for rejection in rejected:
            log.warning(
                "round %d: reply from %s %s: %s",
                global_round,
                rejection.site or f"node {rejection.node}",
                rejection.status,
                rejection.reason,
            )
            record.problems.append(rejection.as_problem())
            if rejection.row is not None:
                rows.append(
                    rejection.row.model_copy(
                        update={"update_status": f"rejected:{rejection.reason}"}
                    )
                )
            elif rejection.site is not None:  # the audit shows a site's failed rounds too
                rows.append(
                    status_row(rejection.site, global_round, rejection.status, rejection.reason)
                )
        rows.extend(
            status_row(site, global_round, "excluded", reason)
            for site, reason in record.excluded.items()
        )
        record.audit = sorted(rows, key=lambda r: r.site)
        record.accepted_sites = [a.site for a in accepted]
        record.bytes["received"] = sum(a.received_bytes for a in accepted)
        return accepted

    def average(
        self, global_round: int, accepted: list[AcceptedTrain]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate accepted updates with the run's rule (``server.aggregation``: modality-
        aware FedAvg, coordinate-wise median or trimmed mean; float32), laziness and metrics.

        Every update is finite and bounded, but finite values can still sum past float32's
        range (with ``max-update-norm = 0``, or a master already near it), or past what the
        16-bit downlink holds (float16: 65504): such a master is refused, named in the
        round's problems (``non_finite_aggregate``, ``downlink_overflow:<dtype>``), and the
        global model kept."""
        record = self.record(global_round)
        metrics = [a.metrics.as_metrics() for a in accepted]
        self.layout()
        new = self.weights.new_master(accepted, metrics)
        if not fits_wire(new.aggregate, self.wire.dtype):
            finite = bool(np.isfinite(new.aggregate).all())
            reason = f"downlink_overflow:{self.wire.dtype}" if finite else "non_finite_aggregate"
            log.warning("round %d: %s; the global model is kept", global_round, reason)
            record.not_aggregated("rejected", reason)
            return None, None
        arrays = self.weights.adopt(new)
        for item in accepted:
            self.registry.last_counts[item.site] = item.metrics.counts()
            if item.row.lazy_combination:
                self.site_laziness[item.site] = item.row.lazy_combination
        if self.run.tla_scope == "global":
            merged = merge_tla(
                [tla_record(a.tla) for a in accepted if a.tla is not None],
                self.model_config.modality_names,
                self.model_config.tla_reduction,
            )
            self.global_laziness = "+".join(merged) if merged else ""
        aggregated = weighted_metrics(metrics)
        # sums and maxima, not means: the overhead and scale benchmarks compare them to wall
        # time (the slowest site bounds a round; the sum is the work done one site at a time)
        for key in (wire.TRAIN_SECONDS, wire.LOAD_SECONDS):
            seconds = [float(m[key]) for m in metrics if key in m]
            if seconds or key == wire.TRAIN_SECONDS:
                aggregated[key + "-sum"] = float(sum(seconds))
                aggregated[key + "-max"] = float(max(seconds, default=0.0))
        record.train = aggregated
        log.info(
            "round %d: aggregated %d sites, bytes sent %d received %d",
            global_round,
            len(accepted),
            record.bytes.get("sent", 0),
            record.bytes["received"],
        )
        return arrays, MetricRecord(aggregated)

    def apply_updates(
        self, accepted: list[AcceptedTrain], metrics: list[dict[str, float]]
    ) -> dict[str, np.ndarray]:
        """The new float32 master weights, as views on one row
        (``MasterWeights.new_master``)."""
        layout = self.layout()
        return layout.views(self.weights.new_master(accepted, metrics).aggregate)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Screen every evaluate reply like a train reply; average the accepted ones."""
        record = self.record(self.global_round(server_round))
        screened = one_reply_per_node(
            [screen_evaluate_reply(m, self.registry) for m in list(replies)]
        )
        accepted = [s for s in screened if isinstance(s, AcceptedEvaluate)]
        for rejection in (s for s in screened if isinstance(s, Rejection)):
            log.warning(
                "round %d: evaluate reply from %s %s: %s",
                record.round,
                rejection.site or f"node {rejection.node}",
                rejection.status,
                rejection.reason,
            )
            record.evaluate_problems.append(rejection.as_problem())
        if not accepted:
            return None
        accepted.sort(key=lambda a: a.site)
        record.evaluate_clients = weighted_metrics([a.metrics.as_metrics() for a in accepted])
        return MetricRecord(record.evaluate_clients)

"""What a site does in one round, in plain Python (the ClientApp only adapts messages).

Local training reuses ``omnifuse_model.training.fit`` unchanged; FedProx adds its proximal
term through ``fit``'s ``extra_loss``; a DP-SGD site trains through ``client.privacy``. The
reply holds trainable weights, the counts used for (modality-aware) weighting and an audit
row of aggregates; nothing per-sample. A DP site adds the epsilon it has spent; once its
budget is spent it trains no more and sends the global weights back with zero counts, so
they carry no weight in the average.

Small counts (``audit-min-count``, default 5): statistics computed over fewer samples
(validation AUROC/AUPRC, mean DWFuse weights, imputation errors, TLA scores, the training
loss) are not sent (None in the audit, -1.0 in the MetricRecord), every count sent for
weighting (num-examples, num-present.m, the audit's num_examples, TLA-sum counts) is rounded
up to a multiple of it (``published_count``), and the exact-combination counts get
complementary suppression (``omnifuse_model.suppression`` says what this protects and what
not).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from client.model_cache import LoadedModel, loaded_model
from client.privacy import PrivacyLedger, PrivacyPlan, ledger_path, planned_epochs, private_fit
from omnifuse_model.config import OmniFuseConfig, TrainConfig
from omnifuse_model.federation_schema import (
    EPSILON,
    NUM_EXAMPLES,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    VAL_AUPRC,
    VAL_AUROC,
    AuditRow,
    exact_combination_counts,
    finite_or_none,
    present_key,
)
from omnifuse_model.laziness import LazinessReport
from omnifuse_model.model import OmniFuse
from omnifuse_model.round_plan import RoundPlan
from omnifuse_model.site_config import PrivacyConfig, SiteConfig
from omnifuse_model.site_data import SiteDatasets
from omnifuse_model.suppression import (
    protect_combination_counts,
    published_count,
    statistic_or_none,
)
from omnifuse_model.training import EvaluationResult, FitResult, evaluate, fit, mean_embeddings
from omnifuse_model.wire_format import WireFormat

log = logging.getLogger(__name__)


@dataclass
class RoundInstructions:
    """What the server asked for this round."""

    model_config: OmniFuseConfig
    train_config: TrainConfig
    global_round: int
    proximal_mu: float = 0.0
    lazy_combination: tuple[str, ...] | None = None  # activated during the first epoch
    audit_min_count: int = 5
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # the site's DP-SGD settings
    planned_rounds: int = 1  # the federation's total rounds (DP-SGD plans its noise for them)
    privacy_ledger: Path | None = None  # where a DP site keeps its accountant across rounds
    wire: WireFormat = field(default_factory=WireFormat)  # how the reply's weights travel

    @classmethod
    def for_site(cls, plan: RoundPlan, site: SiteConfig) -> RoundInstructions:
        """The server's round plan as this site carries it out: its training overrides,
        device and round seed, its lazy combination, its DP settings and privacy ledger."""
        return cls(
            model_config=plan.model,
            train_config=plan.site_train_config(site),
            global_round=plan.global_round,
            proximal_mu=plan.proximal_mu,
            lazy_combination=plan.lazy_combination_for(site.name),
            audit_min_count=plan.audit_min_count,
            privacy=site.privacy,
            planned_rounds=plan.rounds_planned(),
            privacy_ledger=ledger_path(site.cache_dir, plan.privacy_ledger),
            wire=plan.wire,
        )


@dataclass
class RoundResult:
    state: dict[str, Tensor]
    metrics: dict[str, float | int]
    audit: AuditRow
    laziness: LazinessReport | None


def proximal_term(model: OmniFuse, global_state: dict[str, Tensor], mu: float):
    """FedProx: (mu / 2) * ||w - w_global||^2 over trainable parameters."""
    anchors = {k: v.detach().clone() for k, v in global_state.items()}

    def term(current: OmniFuse) -> Tensor:
        total = torch.zeros((), device=next(current.parameters()).device)
        for name, parameter in current.named_parameters():
            total = total + (parameter - anchors[name].to(parameter.device)).pow(2).sum()
        return 0.5 * mu * total

    return term


def train_round(
    site_name: str,
    datasets: SiteDatasets,
    instructions: RoundInstructions,
    global_state: dict[str, Tensor],
) -> RoundResult:
    """Local epochs from the global weights, then a local validation pass for the audit.

    The model is the process's reused one (``client.model_cache``), except for DP-SGD."""
    started = time.perf_counter()
    model_config = instructions.model_config
    if instructions.privacy.dp_sgd:
        model_config = model_config.model_copy(update={"dp_compatible": True})
    with loaded_model(model_config, global_state) as loaded:
        return _train_loaded(loaded, started, site_name, datasets, instructions, global_state)


def _train_loaded(
    loaded: LoadedModel,
    started: float,
    site_name: str,
    datasets: SiteDatasets,
    instructions: RoundInstructions,
    global_state: dict[str, Tensor],
) -> RoundResult:
    model = loaded.model
    if instructions.lazy_combination is not None:
        model.set_laziness(LazinessReport(lazy_combination=instructions.lazy_combination))
    epsilon = None
    if instructions.privacy.dp_sgd:
        result, epsilon = _private_round(site_name, model, datasets, instructions, global_state)
    else:
        extra = (
            proximal_term(model, global_state, instructions.proximal_mu)
            if instructions.proximal_mu > 0
            else None
        )
        result = fit(model, datasets.train, None, instructions.train_config, extra_loss=extra)
    eval_config = instructions.train_config.model_copy(update={"bootstrap_samples": 0})
    # the normalised imputation error's baseline: the training split's mean embeddings
    means = mean_embeddings(model, datasets.train, eval_config) if len(datasets.train) else None
    evaluation = evaluate(model, datasets.val, eval_config, embedding_means=means)
    report = _RoundReport(site_name, instructions, _availability(datasets.train), datasets.val)
    metrics = report.metrics(result, evaluation, epsilon)
    metrics[TRAIN_SECONDS] = time.perf_counter() - started
    audit = report.audit(evaluation, model.laziness, epsilon)
    # a reused model's tensors are overwritten by the next message: the reply keeps a copy
    state = {
        k: v.detach().cpu().clone() if loaded.reused else v.detach().cpu()
        for k, v in model.state_dict().items()
    }
    return RoundResult(state, metrics, audit, model.laziness)


class _RoundReport:
    """What a round sends besides weights: counts for weighting, metrics and the audit row.

    Every statistic computed over fewer than ``audit_min_count`` samples is withheld (None in
    the audit, -1.0 or left out in the MetricRecord), and the exact-combination counts are
    protected by complementary suppression (``omnifuse_model.suppression``). The counts used
    for weighting (num-examples, num-present.m) and the audit's num_examples are sent as
    ``published_count`` (rounded up to a multiple of the threshold); cells the published
    counts would still give away are logged here.
    """

    def __init__(
        self, site: str, instructions: RoundInstructions, availability: Tensor, val: Dataset
    ) -> None:
        self.site, self.instructions = site, instructions
        self.names = instructions.model_config.modality_names
        self.threshold = instructions.audit_min_count
        self.availability = availability
        self.num_examples = int(availability.shape[0])
        self.num_val = len(val)
        self.published_examples = published_count(self.num_examples, self.threshold)
        held = _availability(val)
        others = held.sum(dim=1) > 1
        # imputation error of m is measured on val samples holding m and another modality
        self.imputation_samples = {
            name: int((held[:, i] & others).sum()) for i, name in enumerate(self.names)
        }

    def _val(self, value: float | None) -> float | None:
        return statistic_or_none(finite_or_none(value), self.num_val, self.threshold)

    def _imputation(self, errors: dict[str, float]) -> dict[str, float | None]:
        """Per-modality imputation statistics, withheld over fewer than threshold samples."""
        return {
            k: statistic_or_none(finite_or_none(v), self.imputation_samples[k], self.threshold)
            for k, v in errors.items()
        }

    def metrics(
        self, result: FitResult | None, evaluation: EvaluationResult, epsilon: float | None
    ) -> dict[str, float | int]:
        trained = result is not None
        loss = float(result.history[-1].losses.get("total", math.nan)) if trained else None
        self.published_examples = (
            published_count(self.num_examples, self.threshold) if trained else 0
        )
        metrics: dict[str, float | int] = {
            NUM_EXAMPLES: self.published_examples,
            TRAIN_LOSS: _finite(statistic_or_none(loss, self.num_examples, self.threshold)),
            VAL_AUROC: _finite(self._val(evaluation.metrics.get("auroc"))),
            VAL_AUPRC: _finite(self._val(evaluation.metrics.get("auprc"))),
        }
        for index, name in enumerate(self.names):
            present = int(self.availability[:, index].sum())
            metrics[present_key(name)] = published_count(present, self.threshold) if trained else 0
        if epsilon is not None:
            metrics[EPSILON] = epsilon
        return metrics

    def audit(
        self, evaluation: EvaluationResult, report: LazinessReport | None, epsilon: float | None
    ) -> AuditRow:
        counts = exact_combination_counts(self.availability.tolist(), self.names)
        protected = protect_combination_counts(
            counts,
            self.names,
            self.threshold,
            tla_counts=report.counts if report and report.counts else None,  # sent as TLA sums
        )
        if protected.exposed:
            log.warning(
                "site %s: audit cells %s are below %d but follow from the (rounded) "
                "num-present / num-examples counts sent for weighting; suppressing them "
                "hides nothing",
                self.site,
                list(protected.exposed),
                self.threshold,
            )
        tla = report.scores if report else {}
        tla_counts = report.counts if report else {}
        threshold = self.threshold
        return AuditRow(
            site=self.site,
            round=self.instructions.global_round,
            num_examples=self.published_examples,  # as in the MetricRecord
            availability_counts=protected.reported,
            tla_scores={
                k: statistic_or_none(finite_or_none(v), tla_counts.get(k, 0), threshold)
                for k, v in tla.items()
            },
            lazy_combination="+".join(report.lazy_combination)
            if report and report.lazy_combination
            else None,
            mean_dwfuse_weight={k: self._val(v) for k, v in evaluation.mean_dwfuse_weight.items()},
            imputation_error=self._imputation(evaluation.imputation_error),
            imputation_error_normalised=self._imputation(evaluation.imputation_error_normalised),
            observed_modalities=[
                name for i, name in enumerate(self.names) if bool(self.availability[:, i].any())
            ],
            min_count=threshold,
            val_auroc=self._val(evaluation.metrics.get("auroc")),
            epsilon=epsilon,
        )


def _private_round(
    site_name: str,
    model: OmniFuse,
    datasets: SiteDatasets,
    instructions: RoundInstructions,
    global_state: dict[str, Tensor],
) -> tuple[FitResult | None, float]:
    """DP-SGD local epochs (``client.privacy``): (the fit or None at budget, epsilon spent)."""
    if instructions.privacy_ledger is None:
        raise ValueError(f"site '{site_name}': privacy.dp_sgd is on but no privacy ledger is set")
    train_config = instructions.train_config
    plan = PrivacyPlan(
        total_epochs=planned_epochs(instructions.planned_rounds, train_config.epochs),
        ledger=PrivacyLedger(instructions.privacy_ledger),
        global_round=instructions.global_round,
    )
    proximal = (global_state, instructions.proximal_mu) if instructions.proximal_mu > 0 else None
    outcome = private_fit(
        site_name, model, datasets.train, train_config, instructions.privacy, plan, proximal
    )
    return outcome.fit, outcome.epsilon


def evaluate_global(
    datasets: SiteDatasets,
    model_config: OmniFuseConfig,
    state: dict[str, Tensor],
    train_config: TrainConfig,
    min_count: int = 5,
) -> dict[str, float | int]:
    """Federated evaluation of the global model on the site's validation split; AUROC/AUPRC
    over fewer than ``min_count`` (the audit's suppression threshold) samples are sent as -1,
    and the validation size as ``published_count(size, min_count)``."""
    with loaded_model(model_config, state) as loaded:
        evaluation = evaluate(
            loaded.model,
            datasets.val,
            train_config.model_copy(update={"bootstrap_samples": 0}),
            imputation_error=False,
        )
    size = len(datasets.val)
    return {
        NUM_EXAMPLES: published_count(size, min_count),
        VAL_AUROC: _finite(statistic_or_none(evaluation.metrics.get("auroc"), size, min_count)),
        VAL_AUPRC: _finite(statistic_or_none(evaluation.metrics.get("auprc"), size, min_count)),
    }


def _finite(value: float | None) -> float:
    """MetricRecords must hold numbers: undefined metrics travel as -1.0."""
    return -1.0 if value is None or math.isnan(value) else float(value)


def _availability(dataset) -> Tensor:
    if hasattr(dataset, "availability"):
        return dataset.availability.to(torch.bool)
    return torch.stack([dataset[i]["availability"] for i in range(len(dataset))]).to(torch.bool)

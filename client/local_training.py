"""What a site does in one round, in plain Python (the ClientApp only adapts messages).

Local training reuses ``omnifuse_model.training.fit`` unchanged; FedProx adds its proximal
term through ``fit``'s ``extra_loss``; a DP-SGD site trains through ``client.privacy``. The
reply holds trainable weights, the counts used for (modality-aware) weighting and an audit
row of aggregates; nothing per-sample. A DP site adds the epsilon it has spent; once its
budget is spent it trains no more and sends the global weights back with zero counts, so
they carry no weight in the average.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

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
    suppress,
)
from omnifuse_model.laziness import LazinessReport
from omnifuse_model.model import OmniFuse
from omnifuse_model.round_plan import RoundPlan
from omnifuse_model.site_config import PrivacyConfig, SiteConfig
from omnifuse_model.site_data import SiteDatasets
from omnifuse_model.training import FitResult, evaluate, fit


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
        )


@dataclass
class RoundResult:
    state: dict[str, Tensor]
    metrics: dict[str, float | int]
    audit: AuditRow
    laziness: LazinessReport | None


def build_model(config: OmniFuseConfig, state: dict[str, Tensor] | None) -> OmniFuse:
    model = OmniFuse(config)
    if state is not None:
        model.load_state_dict(state)
    return model


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
    """Local epochs from the global weights, then a local validation pass for the audit."""
    started = time.perf_counter()
    dp = instructions.privacy.dp_sgd
    model_config = instructions.model_config
    if dp:
        model_config = model_config.model_copy(update={"dp_compatible": True})
    model = build_model(model_config, global_state)
    if instructions.lazy_combination is not None:
        model.set_laziness(LazinessReport(lazy_combination=instructions.lazy_combination))
    train_config = instructions.train_config
    epsilon = None
    if dp:
        result, epsilon = _private_round(site_name, model, datasets, instructions, global_state)
    else:
        extra = (
            proximal_term(model, global_state, instructions.proximal_mu)
            if instructions.proximal_mu > 0
            else None
        )
        result = fit(model, datasets.train, None, train_config, extra_loss=extra)
    evaluation = evaluate(
        model, datasets.val, train_config.model_copy(update={"bootstrap_samples": 0})
    )
    names = instructions.model_config.modality_names
    availability = _availability(datasets.train)
    num_examples = int(availability.shape[0])
    trained = result is not None
    metrics: dict[str, float | int] = {
        NUM_EXAMPLES: num_examples if trained else 0,
        TRAIN_LOSS: float(result.history[-1].losses.get("total", math.nan)) if trained else -1.0,
        TRAIN_SECONDS: time.perf_counter() - started,
        VAL_AUROC: _finite(evaluation.metrics.get("auroc")),
        VAL_AUPRC: _finite(evaluation.metrics.get("auprc")),
    }
    for index, name in enumerate(names):
        metrics[present_key(name)] = int(availability[:, index].sum()) if trained else 0
    if epsilon is not None:
        metrics[EPSILON] = epsilon
    threshold = instructions.audit_min_count
    counts = exact_combination_counts(availability.tolist(), names)
    report = model.laziness
    audit = AuditRow(
        site=site_name,
        round=instructions.global_round,
        num_examples=suppress(num_examples, threshold),
        availability_counts={k: suppress(v, threshold) for k, v in counts.items()},
        tla_scores={
            k: (finite_or_none(v) if report.counts.get(k, 0) >= threshold else None)
            for k, v in report.scores.items()
        }
        if report
        else {},
        lazy_combination="+".join(report.lazy_combination)
        if report and report.lazy_combination
        else None,
        mean_dwfuse_weight={k: finite_or_none(v) for k, v in evaluation.mean_dwfuse_weight.items()},
        imputation_error={k: finite_or_none(v) for k, v in evaluation.imputation_error.items()},
        val_auroc=finite_or_none(evaluation.metrics.get("auroc")),
        epsilon=epsilon,
    )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return RoundResult(state, metrics, audit, report)


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
) -> dict[str, float | int]:
    """Federated evaluation of the global model on the site's validation split."""
    model = build_model(model_config, state)
    evaluation = evaluate(
        model,
        datasets.val,
        train_config.model_copy(update={"bootstrap_samples": 0}),
        imputation_error=False,
    )
    return {
        NUM_EXAMPLES: len(datasets.val),
        VAL_AUROC: _finite(evaluation.metrics.get("auroc")),
        VAL_AUPRC: _finite(evaluation.metrics.get("auprc")),
    }


def _finite(value: float | None) -> float:
    """MetricRecords must hold numbers: undefined metrics travel as -1.0."""
    return -1.0 if value is None or math.isnan(value) else float(value)


def _availability(dataset) -> Tensor:
    if hasattr(dataset, "availability"):
        return dataset.availability.to(torch.bool)
    return torch.stack([dataset[i]["availability"] for i in range(len(dataset))]).to(torch.bool)

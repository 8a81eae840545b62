"""Sample-level DP-SGD at a site (Opacus), with the site's privacy budget kept across rounds.

A site whose config sets ``privacy.dp_sgd`` trains the DP-SGD variant of the model
(``OmniFuseConfig.dp_compatible``: Opacus' DPLSTM, per-sample placeholders and losses) with
``PrivacyEngine.make_private_with_epsilon`` over a Poisson-sampled DataLoader of its train
split, through the same ``training.fit`` as every other site (its ``optimizer`` and
``batches`` hooks). Each step clips every sample's gradient to ``max_grad_norm`` and adds
Gaussian noise; the noise multiplier is planned for the whole federation: the server's
planned rounds x the site's local epochs reach ``target_epsilon`` at ``target_delta``.

Accountant persistence: the accountant's history (noise multiplier, sample rate, steps) is
written after every round to a ledger file in the site's ``cache_dir`` (``privacy/<ledger
id>.json``), keyed by the federation run (an id the server derives from its run directory).
Flower's ``Context.state`` would be simpler but lives in one SuperNode process for one Flower
run: a restarted SuperNode, or a server resumed with ``resume=true`` (a new Flower run), would
start the accountant from zero and under-report epsilon. The ledger keeps one entry per
global round, so a resumed run continues from the last recorded round; a round run again
replaces its entry, and a fresh run in the same run directory starts over from round 1.

Budget: before training, the site computes how many of the requested local epochs fit in
the remaining budget with Opacus' accountant; it trains that many (none once the budget is
spent, with a logged message naming the site and the epsilon) and reports the epsilon spent.

Not covered by the epsilon: the round's aggregates (counts with small cells suppressed, the
training loss, validation metrics) and TLA mining, whose lazy combination is mined on the
training data without noise and selects the next epoch's TLA term.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from opacus import PrivacyEngine
from opacus.accountants import IAccountant
from opacus.optimizers import DPOptimizer
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from omnifuse_model.batch import Batch
from omnifuse_model.config import TrainConfig
from omnifuse_model.model import OmniFuse
from omnifuse_model.site_config import PrivacyConfig
from omnifuse_model.training import BatchSource, FitResult, fit

log = logging.getLogger(__name__)

LEDGER_DIR = "privacy"
_LEDGER_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
History = list[tuple[float, float, int]]  # Opacus accountant history: (sigma, q, steps)


def ledger_path(cache_dir: Path, ledger_id: str) -> Path:
    """Where a site keeps the privacy ledger of one federation run."""
    if not _LEDGER_ID.match(ledger_id):
        raise ValueError(f"privacy ledger id {ledger_id!r}: expected letters, digits, '_.-'")
    return Path(cache_dir) / LEDGER_DIR / f"{ledger_id}.json"


class PrivacyLedger:
    """A site's accountant history per global round of one run, in a JSON file.

    Each entry holds the cumulative history after that round, so the state before round r
    is the entry of the latest earlier round.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _rounds(self) -> dict[int, dict]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
            return {int(k): v for k, v in data["rounds"].items()}
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"privacy ledger {self.path}: unreadable ({error})") from error

    def history_before(self, global_round: int) -> History:
        """The accountant history after the latest recorded round before ``global_round``."""
        earlier = [r for r in self._rounds() if r < global_round]
        if not earlier:
            return []
        entry = self._rounds()[max(earlier)]
        return [(float(s), float(q), int(n)) for s, q, n in entry["history"]]

    def record(self, global_round: int, history: Sequence, epsilon: float, delta: float) -> None:
        """Write round ``global_round``'s entry (dropping it and any later, stale ones)."""
        rounds = {r: e for r, e in self._rounds().items() if r < global_round}
        rounds[global_round] = {
            "history": [list(h) for h in history],
            "epsilon": epsilon,
            "delta": delta,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_suffix(".tmp")
        temp.write_text(json.dumps({"format": 1, "rounds": rounds}, indent=1))
        os.replace(temp, self.path)


@dataclass
class PrivacyPlan:
    """What the accountant plans for, and where its state persists."""

    total_epochs: int  # planned rounds x local epochs over the whole federation
    ledger: PrivacyLedger
    global_round: int


@dataclass
class PrivateTraining:
    """The outcome of one round of DP-SGD at a site (``fit`` is None when none ran)."""

    fit: FitResult | None
    epsilon: float
    epochs_trained: int
    epochs_requested: int
    noise_multiplier: float

    @property
    def budget_reached(self) -> bool:
        return self.epochs_trained < self.epochs_requested


def collate_tensors(samples: Sequence[Mapping]) -> dict:
    """Stack samples (``omnifuse_model.batch`` layout) into a dict of tensors.

    Unlike ``collate_samples`` it leaves out the sample ids: Opacus rebuilds an empty Poisson
    batch from the structure of the first batch and accepts only tensors, dicts and lists.
    """
    first = samples[0]
    return {
        "inputs": {k: torch.stack([s["inputs"][k] for s in samples]) for k in first["inputs"]},
        "masks": {k: torch.stack([s["masks"][k] for s in samples]) for k in first["masks"]},
        "availability": torch.stack([s["availability"] for s in samples]).to(torch.bool),
        "labels": torch.stack([s["label"] for s in samples]),
    }


def noise_only_step(optimizer: DPOptimizer) -> None:
    """The DP-SGD step of an empty Poisson batch: no gradient, only noise (and accounting)."""
    for parameter in optimizer.params:
        parameter.grad_sample = torch.zeros(
            (0, *parameter.shape), device=parameter.device, dtype=parameter.dtype
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def private_batches(loader: DataLoader, optimizer: DPOptimizer) -> BatchSource:
    """``fit``'s batch source over Opacus' Poisson-sampled loader; empty draws step noise."""

    def epoch(_generator: torch.Generator) -> Iterator[Batch]:
        for item in loader:
            if not isinstance(item, Mapping) or item["availability"].shape[0] == 0:
                noise_only_step(optimizer)
                continue
            size = int(item["availability"].shape[0])
            yield Batch(
                inputs=item["inputs"],
                masks=item["masks"],
                availability=item["availability"],
                labels=item["labels"],
                sample_ids=[""] * size,  # ids do not travel through the private loader
            )

    return epoch


def spent_epsilon(accountant: IAccountant, delta: float, extra: History = ()) -> float:
    """Epsilon of the accountant's history (plus ``extra`` entries), 0 before any step."""
    trial = copy.deepcopy(accountant)
    trial.history = [*trial.history, *extra]
    return float(trial.get_epsilon(delta)) if trial.history else 0.0


def affordable_epochs(
    accountant: IAccountant,
    privacy: PrivacyConfig,
    noise_multiplier: float,
    sample_rate: float,
    steps_per_epoch: int,
    requested: int,
) -> int:
    """How many of ``requested`` epochs keep the spent epsilon within the target."""
    for epochs in range(1, requested + 1):
        step = (noise_multiplier, sample_rate, epochs * steps_per_epoch)
        if spent_epsilon(accountant, privacy.target_delta, [step]) > privacy.target_epsilon:
            return epochs - 1
    return requested


def proximal_step_hook(optimizer: DPOptimizer, model: OmniFuse, anchors: dict, mu: float):
    """FedProx under DP-SGD: add mu * (w - w_global) to the privatised gradient.

    The proximal term depends on no sample, so Opacus' per-sample gradients never see it; it
    is added after clipping and noise (post-processing, no privacy cost), next to the
    accountant's own step hook.
    """
    pairs = [(p, anchors[name].to(p.device)) for name, p in model.named_parameters()]
    accounting = optimizer.step_hook

    def hook(dp_optimizer: DPOptimizer) -> None:
        if accounting is not None:
            accounting(dp_optimizer)
        for parameter, anchor in pairs:
            parameter.grad.add_(parameter.detach() - anchor, alpha=mu)

    optimizer.attach_step_hook(hook)


def private_fit(
    site_name: str,
    model: OmniFuse,
    train_data: Dataset,
    config: TrainConfig,
    privacy: PrivacyConfig,
    plan: PrivacyPlan,
    proximal: tuple[dict[str, Tensor], float] | None = None,
) -> PrivateTraining:
    """One round of local DP-SGD; the model must be built with ``dp_compatible=True``.

    Args:
        proximal: (global state, mu) for FedProx's proximal term.

    Returns:
        The fit (None when the budget allowed no epoch), the epsilon spent so far over the
        whole run, and the epochs trained of those requested.
    """
    if not model.config.dp_compatible:
        raise ValueError(f"site '{site_name}': DP-SGD needs a model with dp_compatible=true")
    if plan.total_epochs < 1:
        raise ValueError(
            f"site '{site_name}': planned epochs must be >= 1, got {plan.total_epochs}"
        )
    with warnings.catch_warnings():
        for message in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        engine, hooks, optimizer, loader = _make_private(model, train_data, config, privacy, plan)
        sample_rate, steps = 1.0 / len(loader), len(loader)
        sigma = float(optimizer.noise_multiplier)
        epochs = affordable_epochs(
            engine.accountant, privacy, sigma, sample_rate, steps, config.epochs
        )
        _log_plan(site_name, plan, privacy, sigma, sample_rate)
        try:
            result = _private_epochs(model, train_data, config, optimizer, loader, epochs, proximal)
        finally:
            hooks.cleanup()
        epsilon = spent_epsilon(engine.accountant, privacy.target_delta)
    plan.ledger.record(plan.global_round, engine.accountant.history, epsilon, privacy.target_delta)
    outcome = PrivateTraining(result, epsilon, epochs, config.epochs, sigma)
    if outcome.budget_reached:
        _log_budget_reached(site_name, plan.global_round, privacy, outcome)
    return outcome


def _private_epochs(
    model: OmniFuse,
    train_data: Dataset,
    config: TrainConfig,
    optimizer: DPOptimizer,
    loader: DataLoader,
    epochs: int,
    proximal: tuple[dict[str, Tensor], float] | None,
) -> FitResult | None:
    """``epochs`` epochs of ``fit`` through Opacus' optimizer and Poisson loader (None if 0)."""
    if epochs == 0:
        return None
    if proximal is not None:
        proximal_step_hook(optimizer, model, proximal[0], proximal[1])
    # bfloat16 per-sample gradients would blur the clipping: full precision here
    update = {"epochs": epochs, "grad_clip": None, "patience": 0, "mixed_precision": False}
    return fit(
        model,
        train_data,
        None,
        config.model_copy(update=update),
        optimizer=optimizer,
        batches=private_batches(loader, optimizer),
        keep_best=False,
    )


def _log_plan(
    site_name: str, plan: PrivacyPlan, privacy: PrivacyConfig, sigma: float, sample_rate: float
) -> None:
    log.info(
        "site %s: DP-SGD round %d: noise multiplier %.3f, sample rate %.4f, %d planned "
        "epochs for epsilon %.2f at delta %g",
        site_name,
        plan.global_round,
        sigma,
        sample_rate,
        plan.total_epochs,
        privacy.target_epsilon,
        privacy.target_delta,
    )


# Expected on every DP round: inputs that need no gradient (Opacus' hooks still fire), the
# secure RNG being off (Opacus' own advice: turn it on for production) and RDP's widest order
# being optimal at small epsilon (the bound is then a little loose, on the safe side).
_EXPECTED_WARNINGS = (
    "Full backward hook is firing",
    "Secure RNG turned off",
    "Optimal order is the largest alpha",
)


def _make_private(
    model: OmniFuse,
    train_data: Dataset,
    config: TrainConfig,
    privacy: PrivacyConfig,
    plan: PrivacyPlan,
) -> tuple[PrivacyEngine, object, DPOptimizer, DataLoader]:
    """Opacus' engine, hooks, optimizer and Poisson loader, the accountant's history restored.

    The noise multiplier is planned from an empty history for ``plan.total_epochs`` (so it is
    the same every round); the ledger's history is loaded afterwards and accumulates.
    """
    model.to(torch.device(config.device))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loader = DataLoader(
        train_data,
        batch_size=config.batch_size,
        collate_fn=collate_tensors,
        num_workers=config.num_workers,
    )
    engine = PrivacyEngine(accountant=privacy.accountant)
    hooks, dp_optimizer, dp_loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        target_epsilon=privacy.target_epsilon,
        target_delta=privacy.target_delta,
        epochs=plan.total_epochs,
        max_grad_norm=privacy.max_grad_norm,
        wrap_model=False,  # hooks on the model itself: fit and state_dict use it unchanged
    )
    engine.accountant.load_state_dict(
        {
            "history": plan.ledger.history_before(plan.global_round),
            "mechanism": engine.accountant.mechanism(),
        }
    )
    return engine, hooks, dp_optimizer, dp_loader


def _log_budget_reached(
    site_name: str, global_round: int, privacy: PrivacyConfig, outcome: PrivateTraining
) -> None:
    log.warning(
        "site %s: privacy budget reached in round %d: epsilon %.3f spent of target %.3f "
        "(delta %g); trained %d of %d local epochs%s",
        site_name,
        global_round,
        outcome.epsilon,
        privacy.target_epsilon,
        privacy.target_delta,
        outcome.epochs_trained,
        outcome.epochs_requested,
        "; no further local training, the global weights go back unchanged"
        if outcome.epochs_trained == 0
        else "",
    )


def planned_epochs(planned_rounds: int, local_epochs: int) -> int:
    """Epochs the accountant plans for: every planned round runs the local epochs (an
    upper bound when a site is not sampled every round, so the noise errs on the safe side)."""
    return max(1, planned_rounds) * local_epochs

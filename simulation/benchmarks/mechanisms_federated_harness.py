"""In-process federation for the mechanism suite: the deployed site and server functions, no Flower.

Each round every site runs ``client.local_training.train_round`` (what the ClientApp calls)
from the global weights with its round instructions (``RoundInstructions``: the run's
``TrainConfig`` with the per-site round seed ``omnifuse_model.round_plan.site_round_seed``,
and the lazy combination the site mined last round, the default ``tla-scope = site``), and
the server combines the replies with ``server.aggregation.aggregate_states`` (what the
ServerApp's strategy calls), FedAvg weighted by the counts the sites publish, modality-aware
or plain. The global model is scored with ``omnifuse_model.training.evaluate``. A site alone
is the same loop over a federation of one site, so it gets the same optimiser resets, epochs
and round seeds as a federated site.

Pairing: ``initial_state`` draws a model's initial weights from the seed; a second
configuration (e.g. without the imputation cascades) takes every parameter it shares by
name and shape with a reference initial state, so compared methods start from the same
weights wherever they have the same parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field

from client.local_training import RoundInstructions, train_round
from omnifuse_model.batch import InMemoryMultimodalDataset
from omnifuse_model.config import OmniFuseConfig, StrictModel, TrainConfig
from omnifuse_model.model import OmniFuse
from omnifuse_model.round_plan import site_round_seed
from omnifuse_model.site_data import SiteDatasets
from omnifuse_model.training import evaluate
from server.aggregation import aggregate_states

State = dict[str, np.ndarray]


class LocalTraining(StrictModel):
    """What every site does per round (the run config's local-epochs, batch-size, lr)."""

    rounds: int = Field(gt=0, description="Federated rounds.")
    local_epochs: int = Field(default=1, gt=0)
    batch_size: int = Field(default=32, gt=0)
    lr: float = Field(default=3e-3, gt=0)

    def train_config(self, seed: int, global_round: int, site: str) -> TrainConfig:
        """One site's round: no early stopping (as a federated site), the deployed round seed."""
        return TrainConfig(
            epochs=self.local_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=site_round_seed(seed, global_round, site),
            patience=0,
            progress=False,
            bootstrap_samples=0,
        )


@dataclass(frozen=True)
class FederatedSite:
    """One site: its name, the modalities it holds and its train/val splits."""

    name: str
    modalities: tuple[str, ...]
    data: SiteDatasets


@dataclass
class SiteReply:
    """What one site sent in one round: weights and the counts used for weighting."""

    state: State
    counts: dict[str, float | int]
    lazy_combination: tuple[str, ...] | None


def held_only(
    data: InMemoryMultimodalDataset, names: Sequence[str], held: Sequence[str]
) -> InMemoryMultimodalDataset:
    """A copy in which the modalities outside ``held`` are absent (inputs zeroed); samples
    left with no modality are dropped. ``names`` is the model's modality order."""
    unknown = sorted(set(held) - set(names))
    if unknown:
        raise ValueError(f"held modalities {unknown}: expected a subset of {list(names)}")
    mask = torch.tensor([name in held for name in names])
    availability = data.availability & mask
    inputs = {
        name: data.inputs[name] * availability[:, i].view(-1, *[1] * (data.inputs[name].dim() - 1))
        for i, name in enumerate(names)
    }
    view = InMemoryMultimodalDataset(inputs, availability, data.labels, data.masks, data.sample_ids)
    return view.subset(availability.any(dim=1).nonzero().squeeze(1))


def initial_state(
    model_config: OmniFuseConfig, seed: int, reference: Mapping[str, np.ndarray] | None = None
) -> State:
    """The model's initial weights under ``seed``; parameters that ``reference`` holds with the
    same name and shape are taken from it (paired starts across configurations)."""
    torch.manual_seed(seed)
    state = {k: v.numpy().copy() for k, v in OmniFuse(model_config).state_dict().items()}
    if reference is not None:
        for key, value in state.items():
            if key in reference and reference[key].shape == value.shape:
                state[key] = reference[key].copy()
    return state


def _torch_state(state: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}


def site_round(
    site: FederatedSite,
    model_config: OmniFuseConfig,
    training: LocalTraining,
    global_state: Mapping[str, np.ndarray],
    seed: int,
    global_round: int,
    lazy: tuple[str, ...] | None = None,
) -> SiteReply:
    """The site's ``train_round`` from the global weights, as the ClientApp runs it."""
    instructions = RoundInstructions(
        model_config,
        training.train_config(seed, global_round, site.name),
        global_round,
        lazy_combination=lazy,
    )
    result = train_round(site.name, site.data, instructions, _torch_state(global_state))
    combination = result.laziness.lazy_combination if result.laziness else None
    return SiteReply({k: v.numpy() for k, v in result.state.items()}, result.metrics, combination)


def federate(
    sites: Sequence[FederatedSite],
    model_config: OmniFuseConfig,
    training: LocalTraining,
    initial: Mapping[str, np.ndarray],
    seed: int,
    modality_aware: bool = True,
) -> State:
    """``training.rounds`` rounds of (every site's train_round, aggregate_states); returns the
    final global weights."""
    if not sites:
        raise ValueError("federate: no sites")
    names = model_config.modality_names
    global_state: State = {k: np.array(v, copy=True) for k, v in initial.items()}
    lazy: dict[str, tuple[str, ...]] = {}
    for global_round in range(1, training.rounds + 1):
        replies = [
            site_round(
                site, model_config, training, global_state, seed, global_round, lazy.get(site.name)
            )
            for site in sites
        ]
        for site, reply in zip(sites, replies, strict=True):
            if reply.lazy_combination:
                lazy[site.name] = reply.lazy_combination
        global_state = aggregate_states(
            [r.state for r in replies],
            [r.counts for r in replies],
            names,
            global_state,
            modality_aware=modality_aware,
        )
    return global_state


def global_auroc(
    model_config: OmniFuseConfig, state: Mapping[str, np.ndarray], test: InMemoryMultimodalDataset
) -> float:
    """The global model's AUROC on ``test``, through ``omnifuse_model.training.evaluate``."""
    model = OmniFuse(model_config)
    model.load_state_dict(_torch_state(state))
    config = TrainConfig(batch_size=256, progress=False, bootstrap_samples=0)
    return float(evaluate(model, test, config, imputation_error=False).metrics["auroc"])


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch with one intra-op thread inside the block (the models are tiny; see
    ``mechanisms_federated``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

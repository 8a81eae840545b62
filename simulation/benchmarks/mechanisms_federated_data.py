"""Sites and test sets of the federated mechanism scenarios, drawn from ``mechanisms_data``.

A site is a share of one planted structure (``MechanismDataConfig``): its own draws of the
latent (its own sample seed), the modalities it holds (``held_only``: the others absent, as a
site that never collects them) and, for label skew, its own class prior. Label skew is prior
shift: from a pool of draws the site keeps the first ``round(prevalence * n)`` positives and
the first ``n`` minus that negatives, so P(x | y) is the same everywhere and only P(y)
differs between sites. Every draw is fixed by (scenario seed, site index, split), so the
methods compared on one seed see the same sites and the same test set.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pydantic import Field

from omnifuse_model.batch import InMemoryMultimodalDataset
from omnifuse_model.config import StrictModel
from omnifuse_model.metrics import auroc
from omnifuse_model.site_data import SiteDatasets
from simulation.benchmarks.mechanisms_data import (
    MechanismDataConfig,
    Split,
    make_mechanism_split,
)
from simulation.benchmarks.mechanisms_federated_harness import FederatedSite, held_only

POOL_FACTOR = 4  # draws per kept sample when a site's class prior is skewed


class SiteLayout(StrictModel):
    """One site of a scenario: what it holds, how many samples, its class prior."""

    name: str = Field(min_length=1)
    modalities: list[str] = Field(min_length=1)
    train: int = Field(gt=0, description="Training samples.")
    val: int = Field(default=20, gt=0, description="Validation samples (the site's audit pass).")
    prevalence: float | None = Field(
        default=None, gt=0, lt=1, description="Share of positives; None = the generator's."
    )


def sample_seed(seed: int, site_index: int) -> int:
    """The sample seed of site ``site_index`` under scenario seed ``seed`` (test set: -1)."""
    return 1000 * seed + 1 + site_index


def with_prevalence(
    data: MechanismDataConfig, n: int, prevalence: float, seed: int, split: Split, site: str
) -> InMemoryMultimodalDataset:
    """``n`` samples with ``round(prevalence * n)`` positives, the first of a larger draw."""
    pool = make_mechanism_split(data, POOL_FACTOR * n, seed, split).dataset
    labels = pool.labels.reshape(-1)
    positives = round(prevalence * n)
    chosen_pos = (labels == 1).nonzero().squeeze(1)[:positives]
    chosen_neg = (labels == 0).nonzero().squeeze(1)[: n - positives]
    if len(chosen_pos) < positives or len(chosen_neg) < n - positives:
        raise ValueError(
            f"site '{site}': prevalence {prevalence} of {n} samples needs {positives} positives "
            f"and {n - positives} negatives; a draw of {len(labels)} holds "
            f"{int(labels.sum())} positives"
        )
    return pool.subset(torch.cat([chosen_pos, chosen_neg]).sort().values)


def _draw(
    data: MechanismDataConfig, layout: SiteLayout, n: int, seed: int, split: Split
) -> InMemoryMultimodalDataset:
    if layout.prevalence is None:
        return make_mechanism_split(data, n, seed, split).dataset
    return with_prevalence(data, n, layout.prevalence, seed, split, layout.name)


def build_sites(
    data: MechanismDataConfig, layouts: Sequence[SiteLayout], seed: int
) -> list[FederatedSite]:
    """The scenario's sites under ``seed``: their own draws, restricted to what they hold."""
    names = [m.name for m in data.modalities]
    sites = []
    for index, layout in enumerate(layouts):
        site_seed = sample_seed(seed, index)
        train = _draw(data, layout, layout.train, site_seed, "train")
        val = _draw(data, layout, layout.val, site_seed, "val")
        held = tuple(layout.modalities)
        datasets = SiteDatasets(held_only(train, names, held), held_only(val, names, held))
        sites.append(FederatedSite(layout.name, held, datasets))
    return sites


class HeldOutTest:
    """A test split, restricted to ``held`` modalities, with its Bayes (oracle) AUROC."""

    def __init__(
        self, data: MechanismDataConfig, n: int, seed: int, held: Sequence[str] | None = None
    ) -> None:
        split = make_mechanism_split(data, n, sample_seed(seed, -1), "test")
        names = [m.name for m in data.modalities]
        dataset = split.dataset
        if held is not None:
            kept = dataset.availability[:, [names.index(h) for h in held]].any(dim=1)
            if not bool(kept.all()):
                raise ValueError(
                    f"test set restricted to {list(held)}: {int((~kept).sum())} samples hold "
                    "none of them; expected every sample to keep one (missing_test 0)"
                )
            dataset = held_only(dataset, names, tuple(held))
        self.dataset = dataset
        labels = dataset.labels.reshape(-1).numpy()
        probability = split.bayes_probability.numpy().astype(np.float64)
        self.oracle_auroc = float(auroc(labels, probability, "binary"))

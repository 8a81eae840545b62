"""What the server asks of every site in one round, as one typed message.

The strategy builds a :class:`RoundPlan` each round and sends it as JSON under
``federation_schema.ROUND_PLAN``; a ClientApp validates it and turns it into its own local
training settings with :meth:`RoundPlan.site_train_config`: the federation's
``TrainConfig``, the site's overrides (``SiteConfig.training``), its device and its seed for
the round (:func:`site_round_seed`).
"""

from __future__ import annotations

import zlib
from typing import Literal

from pydantic import Field

from omnifuse_model.config import OmniFuseConfig, StrictModel, TrainConfig
from omnifuse_model.data.ehr.normalizer import EHRNormalizer
from omnifuse_model.site_config import SiteConfig
from omnifuse_model.wire_format import WireFormat


def site_round_seed(seed: int, global_round: int, site_name: str) -> int:
    """The seed of one site's local training in one round.

    Different at every site and round, reproducible, and the same when a resumed run replays
    a round (it depends on the global round number, not on the process).
    """
    return seed * 1_000_003 + global_round * 7919 + (zlib.crc32(site_name.encode()) % 7919)


class NormalizerState(StrictModel):
    """The federation's EHR normaliser as it travels: per-column means and stds."""

    means: list[float]
    stds: list[float]
    columns: list[int]
    count: int | None = Field(default=None, ge=0, description="Bins the statistics pooled.")

    @classmethod
    def of(cls, normalizer: EHRNormalizer) -> NormalizerState:
        return cls(
            means=normalizer.means.tolist(),
            stds=normalizer.stds.tolist(),
            columns=list(normalizer.columns),
            count=normalizer.count,
        )

    def normalizer(self) -> EHRNormalizer:
        return EHRNormalizer(self.means, self.stds, self.columns, count=self.count)


class RoundPlan(StrictModel):
    """The server's instructions for one round, the same for every site."""

    model: OmniFuseConfig = Field(description="The federation's model (every site builds it).")
    train: TrainConfig = Field(
        description="The federation's local training settings, before a site's overrides, "
        "device and round seed (see site_train_config)."
    )
    global_round: int = Field(ge=0, description="Round number that survives resumes.")
    tla_scope: Literal["site", "global"] = "site"
    lazy_combination: str = Field(
        default="",
        description="Global TLA: the '+'-joined combination every site trains first; '' = none.",
    )
    site_laziness: dict[str, str] = Field(
        default_factory=dict,
        description="Site name -> the '+'-joined lazy combination it mined last (the server "
        "keeps them, so a resumed run continues exactly).",
    )
    proximal_mu: float = Field(default=0.0, ge=0, description="FedProx mu; 0 = FedAvg.")
    audit_min_count: int = Field(default=5, ge=1, description="Audit suppression threshold.")
    planned_rounds: int | None = Field(
        default=None,
        ge=1,
        description="The run's total rounds (DP-SGD sites plan their noise for them); "
        "None = the rounds so far, a budget reached early rather than overspent.",
    )
    privacy_ledger: str = Field(
        default="default",
        description="Id of the run's privacy ledger at DP sites (the same across resumes).",
    )
    wire: WireFormat = Field(
        default_factory=WireFormat,
        description="How weights travel this round (omnifuse_model.wire_format).",
    )
    ehr_normalizer: NormalizerState | None = Field(
        default=None,
        description="The federation's EHR normaliser from the statistics phase; every site "
        "scales its EHR with it (None: no site sent EHR statistics).",
    )

    def site_train_config(self, site: SiteConfig) -> TrainConfig:
        """The site's local training this round: overrides, device, per-site round seed."""
        train = site.training.apply(self.train)
        update = {
            "device": site.resolved_device(),
            "seed": site_round_seed(self.train.seed, self.global_round, site.name),
        }
        return TrainConfig.model_validate({**train.model_dump(), **update})

    def lazy_combination_for(self, site_name: str) -> tuple[str, ...] | None:
        """The combination the site trains first: the global one when sent, else its own."""
        lazy = self.lazy_combination or self.site_laziness.get(site_name, "")
        return tuple(lazy.split("+")) if lazy else None

    def rounds_planned(self) -> int:
        """The rounds DP-SGD plans its noise for."""
        return self.planned_rounds if self.planned_rounds is not None else self.global_round

"""Central DP: Flower's fixed-clipping wrappers, with our screening before they read a reply.

Flower's ``DifferentialPrivacy{Server,Client}SideFixedClipping`` wrap a strategy and read
the replies before it does. Left alone, one site could stop or stall a DP federation:
- server-side clipping zips each reply's arrays with the global ones by position, so a reply
  missing a key or with a wrong shape raises in ``compute_clip_model_update`` and stops the
  server, and one with its keys reordered is silently subtracted from the wrong tensors;
- one error reply makes ``validate_replies`` skip aggregation: a failing site would keep
  the global model in every round;
- client-side clipping trusts the site to clip; an update sent unclipped would carry more
  than the noise is calibrated for and dominate the uniform average.

So here every reply is first screened by the strategy (``OmniFuseStrategy.screen``: wire
format, bound site, finiteness, ``max-update-norm``; with client-side clipping also the
clipping norm); only accepted replies, their arrays in the global model's key order, reach
Flower's clipping, averaging and noise. The rejections are recorded by the strategy like
any other round's. The Gaussian noise is calibrated to the number of updates actually
averaged, std = noise_multiplier * clipping_norm / accepted, never to fewer: a dropped reply
raises the noise, it never weakens the guarantee of the release.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from omnifuse_model import federation_schema as wire
from server.reply_screening import AcceptedTrain, Rejection, node_of
from server.run_config import FederationRunConfig
from server.strategy import OmniFuseStrategy
from server.update_rows import exact_norm

log = logging.getLogger(__name__)

# A site clips in float32 on weights near the global ones, the server measures the norm in
# float64 from the float32 weights it receives: rounding alone may exceed the clipping norm
# by a hair, never by a thousandth.
CLIP_TOLERANCE = 1e-3
NOISE_STD = "central-dp-noise-std"
NOISE_UPDATES = "central-dp-updates"


class _ScreenFirst:
    """Mixin for Flower's fixed-clipping wrappers: screen, then let the wrapper clip, average
    (through our strategy) and add noise calibrated to the accepted updates."""

    strategy: OmniFuseStrategy
    num_sampled_clients: int
    clipping_norm: float
    noise_multiplier: float
    clip_at_sites: bool = False

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        strategy = self.strategy
        global_round = strategy.global_round(server_round)
        kept = self.screened(global_round, list(replies))
        if len(kept) < max(1, strategy.min_train_nodes):
            return strategy.aggregate_train(server_round, [])  # records why, keeps the model
        sampled, self.num_sampled_clients = self.num_sampled_clients, len(kept)
        try:
            arrays, metrics = super().aggregate_train(server_round, kept)  # type: ignore[misc]
        finally:
            self.num_sampled_clients = sampled
        if arrays is not None:
            train = strategy.record(global_round).train
            train[NOISE_STD] = self.noise_multiplier * self.clipping_norm / len(kept)
            train[NOISE_UPDATES] = float(len(kept))
            metrics = MetricRecord(train)
        return arrays, metrics

    def screened(self, global_round: int, replies: list[Message]) -> list[Message]:
        """The accepted replies, one per node in site order, arrays in the global order; the
        rejections are left with the strategy (``prescreened``) for the round's record."""
        strategy = self.strategy
        accepted, rejected = strategy.screen(global_round, replies)
        if self.clip_at_sites:
            accepted = self.clipped_only(accepted, rejected)
        strategy.prescreened[global_round] = rejected
        order = self.key_order()
        by_node: dict[int, Message] = {}
        for message in replies:
            by_node.setdefault(node_of(message), message)
        kept = []
        for item in accepted:
            message = by_node[item.node]
            arrays = message.content[wire.ARRAYS]
            message.content[wire.ARRAYS] = ArrayRecord({key: arrays[key] for key in order})
            kept.append(message)
        return kept

    def key_order(self) -> list[str]:
        """The order the wrapper reads the arrays in: the global model's."""
        return list(self.strategy.previous or {})

    def clipped_only(
        self, accepted: list[AcceptedTrain], rejected: list[Rejection]
    ) -> list[AcceptedTrain]:
        """With clipping at the sites: the updates within the clipping norm; each other one
        is rejected as ``not_clipped`` (a site that skipped fixedclipping_mod)."""
        strategy = self.strategy
        layout = strategy.layout()
        bound = self.clipping_norm * (1 + CLIP_TOLERANCE)
        kept = []
        for item in accepted:
            norm = exact_norm(item.update, layout, strategy.wire.deltas)
            if norm > bound:
                reason = f"not_clipped:{norm:.3g}>{self.clipping_norm:g}"
                rejected.append(Rejection(item.node, item.site, "rejected", reason, item.row))
                continue
            kept.append(item)
        return kept


class ScreenedServerSideClipping(_ScreenFirst, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, behind our screening."""

    def key_order(self) -> list[str]:
        """The order of the global arrays Flower's clipping zips each reply with."""
        return list(self.current_arrays.keys())


class ScreenedClientSideClipping(_ScreenFirst, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (sites run fixedclipping_mod), behind our
    screening, which also rejects an update larger than the clipping norm."""

    clip_at_sites = True


def with_central_dp(strategy: OmniFuseStrategy, run: FederationRunConfig, sites: int) -> Strategy:
    """The strategy behind the screened fixed-clipping wrapper when ``central-dp`` is on.

    The wrapper screens, clips each update (server side, or checks the sites' clipping),
    calls our aggregate_train (which then averages uniformly) and adds Gaussian noise of
    std noise_multiplier * clipping_norm / accepted updates to the aggregate.
    """
    if run.central_dp == "off":
        return strategy
    sampled = max(int(sites * run.fraction_train), run.min_train_nodes)
    wrapper = (
        ScreenedServerSideClipping if run.central_dp == "server" else ScreenedClientSideClipping
    )
    return wrapper(strategy, run.dp_noise_multiplier, run.dp_clipping_norm, sampled)

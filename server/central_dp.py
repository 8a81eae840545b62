"""Central DP: Flower's fixed-clipping wrappers, with our screening before a reply is read.

Flower's ``DifferentialPrivacy{Server,Client}SideFixedClipping`` wrap a strategy and read
the replies before it does. Left alone, one site could stop or stall a DP federation:
- server-side clipping zips each reply's arrays with the global ones by position, so a reply
  missing a key or with a wrong shape raises in ``compute_clip_model_update`` and stops the
  server (reordered keys are subtracted from the wrong tensors), and an update of norm 0
  (a site echoing the weights it was sent) divides by zero there;
- one error reply makes ``validate_replies`` skip aggregation: a failing site would keep
  the global model in every round;
- client-side clipping trusts the site to clip; an update sent unclipped would carry more
  than the noise is calibrated for and dominate the uniform average.

So here every reply is first screened by the strategy (``OmniFuseStrategy.screen``: wire
format, bound site, finiteness, ``max-update-norm``; with clipping at the sites also the
clipping norm, up to float32 rounding). Each accepted update is then clipped here, in
float64 (a no-op but for rounding when the site clipped), and only those replies reach our
uniform average; Flower's Gaussian noise is added to the aggregate, calibrated to the number
of updates actually averaged, std = noise_multiplier * clipping_norm / averaged, never to
fewer: a dropped reply raises the noise, it never weakens the guarantee of the release. The
wrappers' own ``configure_*`` hooks are kept (the clipping norm sent to the sites). The
rejections are recorded by the strategy like any other round's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv

from omnifuse_model import federation_schema as wire
from server.array_records import float32_record
from server.reply_screening import Rejection, node_of
from server.run_config import FederationRunConfig
from server.strategy import OmniFuseStrategy

log = logging.getLogger(__name__)

# A site clips in float32 and sends back weights rounded to float32: beyond the norm, the
# server allows a thousandth of it and the rounding of every returned weight (half an ulp).
CLIP_TOLERANCE = 1e-3
NOISE_STD = "central-dp-noise-std"
NOISE_UPDATES = "central-dp-updates"


class _ScreenFirst:
    """Mixin for Flower's fixed-clipping wrappers: screen, clip, average through our
    strategy, add noise calibrated to the updates averaged."""

    strategy: OmniFuseStrategy
    clipping_norm: float
    noise_multiplier: float
    clip_at_sites: bool = False

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        strategy = self.strategy
        global_round = strategy.global_round(server_round)
        kept = self.screened(global_round, list(replies))
        arrays, _ = strategy.aggregate_train(server_round, kept)  # records the rejections
        if arrays is None:
            return None, None
        record = strategy.record(global_round)
        averaged = len(record.accepted_sites)  # what the strategy averaged, whatever we kept
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, averaged)
        values = [np.array(array.numpy(), dtype=np.float32) for array in arrays.values()]
        add_gaussian_noise_inplace(values, std)
        log.info(
            "round %d: central DP noise of std %.4g on %d updates", global_round, std, averaged
        )
        record.train[NOISE_STD] = std
        record.train[NOISE_UPDATES] = float(averaged)
        noisy = ArrayRecord()
        for key, value in zip(arrays.keys(), values, strict=True):
            noisy[key] = Array(value)
        return noisy, MetricRecord(record.train)

    def screened(self, global_round: int, replies: list[Message]) -> list[Message]:
        """The accepted replies, one per node in site order, each update clipped to the
        clipping norm; the rejections are left with the strategy (``prescreened``).

        Central DP runs on the float32 wire: replies hold weights, not 16-bit updates. Each
        is decoded once: its update (weights - global) in float64 gives the norm that
        clipping at the sites is checked against and the scale of the clipping here."""
        strategy = self.strategy
        accepted, rejected = strategy.screen(global_round, replies)
        strategy.prescreened[global_round] = rejected
        by_node: dict[int, Message] = {}
        for message in replies:
            by_node.setdefault(node_of(message), message)
        layout = strategy.layout()
        master = layout.flat_master().astype(np.float64)
        shapes = {key: value.shape for key, value in layout.master.items()}
        kept = []
        for item in accepted:
            weights = item.update.row(layout)
            update = weights.astype(np.float64) - master
            norm = math.sqrt(float(np.dot(update, update)))
            if self.clip_at_sites and (reason := self.not_clipped(weights, norm)) is not None:
                rejected.append(Rejection(item.node, item.site, "rejected", reason, item.row))
                continue
            scale = 1.0 if norm <= self.clipping_norm else self.clipping_norm / norm
            row = np.ascontiguousarray((master + scale * update).astype(np.float32))
            message = by_node[item.node]
            message.content[wire.ARRAYS] = float32_record(row, layout.spans, shapes)
            kept.append(message)
        return kept

    def not_clipped(self, weights: np.ndarray, norm: float) -> str | None:
        """With clipping at the sites: why an update of L2 ``norm`` was not clipped by the
        site (fixedclipping_mod skipped), allowing float32 rounding of the returned
        ``weights`` (half an ulp each) and a thousandth of the norm; None when it was."""
        rounding = 0.5 * float(np.linalg.norm(np.spacing(weights).astype(np.float64)))
        if norm > self.clipping_norm * (1 + CLIP_TOLERANCE) + rounding:
            return f"not_clipped:{norm:.3g}>{self.clipping_norm:g}"
        return None


class ScreenedServerSideClipping(_ScreenFirst, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, screened, clipped here in float64."""


class ScreenedClientSideClipping(_ScreenFirst, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (sites run fixedclipping_mod), screened; an
    update larger than the clipping norm is rejected, and rounding clipped away."""

    clip_at_sites = True


def with_central_dp(strategy: OmniFuseStrategy, run: FederationRunConfig, sites: int) -> Strategy:
    """The strategy behind the screened fixed-clipping wrapper when ``central-dp`` is on.

    The wrapper screens every reply (with clipping at the sites, also its norm), clips each
    accepted update, calls our aggregate_train (which averages uniformly) and adds Gaussian
    noise of std noise_multiplier * clipping_norm / updates averaged to the aggregate.
    """
    if run.central_dp == "off":
        return strategy
    sampled = max(int(sites * run.fraction_train), run.min_train_nodes)
    wrapper = (
        ScreenedServerSideClipping if run.central_dp == "server" else ScreenedClientSideClipping
    )
    return wrapper(strategy, run.dp_noise_multiplier, run.dp_clipping_norm, sampled)

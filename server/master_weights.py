"""The server's float32 master weights from round to round: what Flower holds, what every
site is sent, and a round's accepted updates turned into the next master.

Per round, the strategy (``server.strategy``) asks :class:`MasterWeights` for:

- :meth:`~MasterWeights.round_arrays`: the float32 weights behind the ``ArrayRecord`` Flower
  passes to ``configure_train`` / ``configure_evaluate`` and the downlink made of them. When
  that record is the one the last aggregation returned, both were made by that aggregation
  and nothing is decoded or encoded again (the first round, or a resumed run, reads them);
- :meth:`~MasterWeights.screen_norms`: one streamed pass over the round's structurally
  accepted updates (``server.update_stream``) gives every norm and, with FedAvg, the
  aggregate of all of them; a non-finite or too large update is rejected (and only then is
  the aggregate taken again without it);
- :meth:`~MasterWeights.new_master` and :meth:`~MasterWeights.adopt`: the new master as one
  float32 row, its float32 record for Flower (``server.array_records``) and its 16-bit
  downlink, rounded chunk by chunk in the same pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

from omnifuse_model.federation_schema import parameter_modality
from omnifuse_model.wire_format import RAW_STYPE, WireFormat, encode16
from server.aggregation import aggregate_states, fedavg_weights
from server.array_records import NUMPY_STYPE, float32_record, raw16_record, record_of_bytes
from server.reply_screening import AcceptedTrain, Rejection, TrainContext, screen_norms
from server.run_config import FederationRunConfig
from server.update_rows import UpdateLayout
from server.update_stream import StreamResult, default_threads, stream_updates


@dataclass
class SentArrays:
    """A record of master weights Flower holds, the float32 weights behind it and the
    downlink made of them."""

    arrays: ArrayRecord
    master: dict[str, np.ndarray]
    downlink: ArrayRecord


def downlink_arrays(
    master: dict[str, np.ndarray], wire_format: WireFormat, arrays: ArrayRecord
) -> ArrayRecord:
    """What every site is sent: ``arrays`` as they are (float32), or the 16-bit rounding of
    the master weights as raw bytes (``omnifuse_model.wire_format``)."""
    if not wire_format.deltas:
        return arrays
    return ArrayRecord(
        {
            key: Array(
                wire_format.dtype, tuple(value.shape), RAW_STYPE, encode16(value, wire_format.dtype)
            )
            for key, value in master.items()
        }
    )


class MasterWeights:
    """The master weights' layout, records and aggregation for one run's strategy."""

    def __init__(self, run: FederationRunConfig, modality_names: list[str]) -> None:
        self.run = run
        self.modality_names = list(modality_names)
        self.wire = run.wire_format()
        self.threads = run.server_threads or default_threads()
        self._layout: UpdateLayout | None = None
        self._sent: SentArrays | None = None  # the master weights behind the last record
        # (ids of the updates, their stream) from the pass that screened them
        self._streamed: tuple[tuple[int, ...], StreamResult] | None = None

    def layout(self, master: dict[str, np.ndarray]) -> UpdateLayout:
        """The flat layout of ``master`` (rebuilt when the master changes)."""
        if self._layout is None or self._layout.master is not master:
            self._layout = UpdateLayout(master, self.modality_names)
        return self._layout

    def round_arrays(self, arrays: ArrayRecord) -> tuple[dict[str, np.ndarray], ArrayRecord]:
        """The float32 master weights behind ``arrays`` and what every site is sent."""
        sent = self._sent
        if sent is None or sent.arrays is not arrays:
            master = {k: v.numpy() for k, v in arrays.items()}
            sent = SentArrays(arrays, master, downlink_arrays(master, self.wire, arrays))
            self._sent = sent
        return sent.master, sent.downlink

    def fedavg_weights(self, accepted: list[AcceptedTrain]) -> dict[str, np.ndarray | None]:
        """Per layout group, the sites' normalised FedAvg weights (``server.aggregation``)."""
        assert self._layout is not None
        return fedavg_weights(
            [a.metrics.as_metrics() for a in accepted],
            {g: parameter_modality(g, self.modality_names) for g in self._layout.group_spans},
            modality_aware=self.run.modality_aware,
            uniform=self.run.central_dp != "off",
        )

    def screen_norms(
        self,
        candidates: list[AcceptedTrain],
        context: TrainContext,
        rejected: list[Rejection],
    ) -> list[AcceptedTrain]:
        """The candidates whose updates are finite and within the norm bound (the others
        appended to ``rejected``); with FedAvg the same pass leaves their aggregate ready
        for :meth:`new_master` when every candidate passes."""
        self._streamed = None
        if not candidates:
            return []
        assert context.layout is not None
        self._layout = context.layout
        weights = self.fedavg_weights(candidates) if self.run.aggregation == "fedavg" else None
        updates = [a.update for a in candidates]
        result = self._stream(updates, weights, norms=True)
        accepted, refused = screen_norms(candidates, result.squared_norms, context)
        rejected.extend(refused)
        if result.aggregate is not None and not refused:
            self._streamed = (tuple(map(id, updates)), result)
        return accepted

    def _stream(self, updates, weights, norms: bool) -> StreamResult:
        assert self._layout is not None
        deltas = self.wire.deltas
        return stream_updates(
            updates,
            self._layout,
            weights,
            deltas=deltas,
            norms=norms,
            threads=self.threads,
            encode=self.wire.dtype if deltas else None,
            serialise=weights is not None,
        )

    def new_master(
        self, accepted: list[AcceptedTrain], metrics: list[dict[str, float]]
    ) -> StreamResult:
        """The new float32 master weights as one row of the layout (``aggregate``) and, with
        FedAvg, their bytes per key and, with 16-bit transport, their 16-bit rounding (the
        next downlink).

        16-bit transport: master + the aggregate of the sites' updates (a group no site took
        part in gets update 0). float32 transport: the aggregate of the sites' weights (a
        group no site took part in keeps the master's value). A key left out of a site's reply
        is 0 in its row, and that site's weight for the key's group is 0 (``wire_format``).

        FedAvg streams the updates (``server.update_stream``; the pass that screened them
        already did when all were accepted); the robust rules sort every site's values, so
        they decode each update into a float32 row first."""
        layout = self._layout
        assert layout is not None
        deltas = self.wire.deltas
        if self.run.aggregation == "fedavg":
            updates = [a.update for a in accepted]
            streamed = self._streamed
            if streamed is not None and streamed[0] == tuple(map(id, updates)):
                return streamed[1]
            return self._stream(updates, self.fedavg_weights(accepted), norms=False)
        keep = np.zeros(layout.size, np.float32) if deltas else layout.flat_master()
        aggregate = aggregate_states(
            [layout.views(a.update.row(layout)) for a in accepted],
            metrics,
            self.modality_names,
            layout.views(keep),
            rule=self.run.aggregation,
            modality_aware=self.run.modality_aware,
            uniform=self.run.central_dp != "off",
            trim_fraction=self.run.trim_fraction,
        )
        flat = np.empty(layout.size, np.float32)
        for name, value in aggregate.items():
            start, stop = layout.spans[name]
            flat[start:stop] = value.reshape(-1)
        if deltas:
            flat += layout.flat_master()
        return StreamResult(flat, np.zeros(len(accepted)))

    def adopt(self, new: StreamResult) -> ArrayRecord:
        """Make ``new.aggregate`` (new master weights in the current layout) the next round's
        master: its float32 record (returned to Flower), views, layout and downlink, from
        the bytes the pass made when it did."""
        layout = self._layout
        assert layout is not None and new.aggregate is not None
        row = new.aggregate
        shapes = {key: value.shape for key, value in layout.master.items()}
        if new.float32_bytes:
            arrays = record_of_bytes(new.float32_bytes, "float32", NUMPY_STYPE, shapes)
        else:
            arrays = float32_record(row, layout.spans, shapes)
        master = layout.views(row)
        if new.encoded_bytes:
            downlink = record_of_bytes(new.encoded_bytes, self.wire.dtype, RAW_STYPE, shapes)
        elif new.encoded is not None:
            downlink = raw16_record(new.encoded, self.wire.dtype, layout.spans, shapes)
        else:
            downlink = downlink_arrays(master, self.wire, arrays)
        self._sent = SentArrays(arrays, master, downlink)
        self._layout = layout.rebased(master, row)
        return arrays

"""The ``ehr`` part of the feature cache: discretised episodes keyed by their CSV's content.

Ingest asks :class:`EpisodeCache` (its ``EpisodeStore``) before discretising an episode; an
entry holds the raw ``[bins, 76]`` array (none for a rejected episode) and, in its record, the
:class:`~omnifuse_model.data.ehr.episodes.EpisodeReport`, so a second run neither discretises
nor loses the repairs and rejections it must report. Keys hash the discretiser settings
(:attr:`EpisodeCache.identity`) and the sha256 of the episode CSV's bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnifuse_model.data.ehr.episodes import EpisodeReport, RejectReason, RepairReason
from omnifuse_model.data.features.store import FeatureStore, ModalityStats, entry_key
from omnifuse_model.data.ingest import EHR_WINDOW_HOURS

PLAUSIBILITY_VERSION = "plausible-ranges-v1"
"""Part of the ``ehr`` identity: bump when
:data:`~omnifuse_model.data.ehr.discretizer.PLAUSIBLE_RANGES` change, so episodes
discretised under other ranges are not reused."""


def _episode_report(data: dict[str, Any], path: Path) -> EpisodeReport:
    old = str(data["path"])
    reason = data.get("reject_reason")
    return EpisodeReport(
        path=str(path),
        reject_reason=None if reason is None else RejectReason(reason),
        detail=str(data.get("detail", "")).replace(old, str(path)),
        repairs={RepairReason(k): int(v) for k, v in data.get("repairs", {}).items()},
        rows_read=int(data.get("rows_read", 0)),
        rows_used=int(data.get("rows_used", 0)),
        implausible={str(k): int(v) for k, v in data.get("implausible", {}).items()},
    )


class EpisodeCache:
    """The ``ehr`` part of a :class:`FeatureStore`, as ingest's ``EpisodeStore``."""

    def __init__(
        self, store: FeatureStore, timestep: float, stats: ModalityStats, shard_size: int = 256
    ) -> None:
        self.store, self.stats, self.shard_size = store, stats, shard_size
        self.identity = (
            f"mimic3-discretizer:ts{timestep:g}:end{EHR_WINDOW_HOURS:g}:previous:zero-start:masks"
            f":{PLAUSIBILITY_VERSION}"
        )
        self._arrays: list[np.ndarray] = []
        self._records: dict[str, dict[str, Any]] = {}

    def key(self, digest: str) -> str:
        return entry_key("ehr", self.identity, digest)

    def get(self, digest: str, path: Path) -> tuple[np.ndarray | None, EpisodeReport] | None:
        key = self.key(digest)
        if key in self._records:  # the same content twice in one run
            record = self._records[key]
            row = record["row"]
            return (None if row is None else self._arrays[row]), _episode_report(
                record["report"], path
            )
        if ("ehr", key) not in self.store:
            return None
        entry = self.store.load("ehr", [key])[key]
        self.stats.items += 1
        self.stats.hits += 1
        self.stats.failed += entry.failed
        array = None if entry.failed else entry.tensors["ehr"].numpy().copy()
        return array, _episode_report(entry.record["report"], path)

    def put(self, digest: str, array: np.ndarray | None, report: EpisodeReport) -> None:
        key = self.key(digest)
        if key in self._records:
            return
        self.stats.items += 1
        self.stats.misses += 1
        self.stats.failed += array is None
        row = None
        if array is not None:
            row = len(self._arrays)
            self._arrays.append(np.asarray(array, dtype=np.float32))
        self._records[key] = {"row": row, "report": report.to_dict()}
        if len(self._records) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the pending entries as one shard."""
        if not self._records:
            return
        fields = {"ehr": torch.from_numpy(np.stack(self._arrays))} if self._arrays else {}
        self.store.write("ehr", fields, self._records)
        self._arrays, self._records = [], {}

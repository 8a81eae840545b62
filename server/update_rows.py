"""A round's site updates as rows of one float32 matrix: decoded, checked, ready to average.

A site's reply becomes one float32 row laid out key by key in the global model's key order
(``UpdateLayout``). With 16-bit transport the row is the site's update (``site weights -
master weights``), decoded straight into the row (``omnifuse_model.wire_format.decode16``);
the server aggregates updates and adds the result to the master. With float32 transport (the
original wire) the row is the site's weights, aggregated as they are (so one site's
aggregate is its weights, bit for bit). Keys a site was not asked to send (omission) stay
zero in its row; aggregation gives that site weight 0 for them anyway.

Decoding is strict: exactly the keys the site was asked for, each of the configured dtype
and stype, the global shape and the exact byte count; anything else is a ``ReplyError``
naming the key. Finiteness and the update's L2 norm are one float32 dot product per row (a
non-finite dot is then traced to its key).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord

from omnifuse_model.federation_replies import ReplyError
from omnifuse_model.federation_schema import parameter_modality
from omnifuse_model.wire_format import RAW_STYPE, WireFormat, decode16


@dataclass
class UpdateLayout:
    """Where each parameter lives in a flat float32 row.

    Keys are laid out group by group (``federation_schema.parameter_modality``: the shared
    parameters, then each modality's), so each aggregation group is one contiguous span of
    the row (``group_spans``) and FedAvg runs on four long vectors instead of 148 arrays."""

    master: Mapping[str, np.ndarray]
    modality_names: list[str] = field(default_factory=list)
    spans: dict[str, tuple[int, int]] = field(init=False)
    group_spans: dict[str, tuple[int, int]] = field(init=False)  # by a key of the group
    size: int = field(init=False)
    _flat: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        groups: dict[str | None, list[str]] = {}
        for key in self.master:
            groups.setdefault(parameter_modality(key, self.modality_names), []).append(key)
        offset, spans, self.group_spans = 0, {}, {}
        for keys in groups.values():
            start = offset
            for key in keys:
                spans[key] = (offset, offset + int(self.master[key].size))
                offset += int(self.master[key].size)
            self.group_spans[keys[0]] = (start, offset)
        self.spans = {key: spans[key] for key in self.master}  # the master's key order
        self.size = offset

    def flat_master(self) -> np.ndarray:
        """The master weights as one row (built once)."""
        if self._flat is None:
            self._flat = np.empty(self.size, np.float32)
            for key, (start, stop) in self.spans.items():
                self._flat[start:stop] = np.asarray(self.master[key]).reshape(-1)
        return self._flat

    def views(self, row: np.ndarray) -> dict[str, np.ndarray]:
        """The row as a state dict of views (no copies), shaped like the master weights."""
        return {
            key: row[start:stop].reshape(self.master[key].shape)
            for key, (start, stop) in self.spans.items()
        }

    def group_view(self, row: np.ndarray) -> dict[str, np.ndarray]:
        """The row as one flat vector per group, named by a key of the group (so
        ``parameter_modality`` maps it back to the group)."""
        return {key: row[start:stop] for key, (start, stop) in self.group_spans.items()}


def decode_update(
    record: ArrayRecord, layout: UpdateLayout, expected: list[str], wire: WireFormat
) -> np.ndarray:
    """The reply's update as one float32 row; ``ReplyError`` for anything not exactly asked."""
    keys = set(record.keys())
    missing = [k for k in expected if k not in keys]
    if missing:
        more = f"+{len(missing) - 1}" if len(missing) > 1 else ""
        raise ReplyError(f"missing_keys:{missing[0]}{more}")
    unexpected = sorted(keys - set(expected))
    if unexpected:
        raise ReplyError(f"unexpected_keys:{str(unexpected[0])[:80]}")
    row = np.empty(layout.size, np.float32)
    for key in set(layout.spans) - set(expected):  # left out: zero (weight 0 in its group)
        start, stop = layout.spans[key]
        row[start:stop] = 0.0
    for key in expected:
        start, stop = layout.spans[key]
        _decode_into(record[key], key, layout.master[key], wire, row[start:stop])
    return row


def _decode_into(array, key: str, reference: np.ndarray, wire: WireFormat, out: np.ndarray) -> None:
    if array.dtype != wire.dtype or tuple(array.shape) != reference.shape:
        raise ReplyError(f"declared_dtype_or_shape:{key}:{str(array.dtype)[:20]}")
    if wire.deltas:
        if array.stype != RAW_STYPE:
            raise ReplyError(f"stype:{key}:{str(array.stype)[:30]}")
        try:
            decode16(array.data, wire.dtype, reference.shape, out=out)
        except ValueError as error:
            raise ReplyError(f"undecodable_array:{key}:{error}") from error
        return
    try:
        value = array.numpy()
    except Exception as error:  # malformed bytes are the site's fault
        raise ReplyError(f"undecodable_array:{key}:{type(error).__name__}") from error
    if value.dtype != reference.dtype:
        raise ReplyError(f"dtype_mismatch:{key}:{value.dtype}!={reference.dtype}")
    if value.shape != reference.shape:
        raise ReplyError(f"shape_mismatch:{key}")
    out[:] = value.reshape(-1)


def update_norm(row: np.ndarray, layout: UpdateLayout, sent: list[str], deltas: bool) -> float:
    """The update's L2 norm (``row`` an update, or weights when not ``deltas``); ``ReplyError``
    naming the first key holding NaN or infinity."""
    update = row if deltas else np.subtract(row, layout.flat_master())
    squared = float(np.dot(update, update))
    if math.isfinite(squared):
        return math.sqrt(squared)
    for key in sent:
        start, stop = layout.spans[key]
        if not np.isfinite(row[start:stop]).all():
            raise ReplyError(f"non_finite:{key}")
    # every value finite, only the float32 sum of squares (or difference) overflowed
    difference = row.astype(np.float64) - (0.0 if deltas else layout.flat_master())
    return math.sqrt(float(np.sum(np.square(difference))))

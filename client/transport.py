"""The site's end of the wire format (``omnifuse_model.wire_format``): decode what the
server sent, encode the reply's weights.

Downlink: float32 arrays (Flower's numpy serialisation) or raw 16-bit values; either way the
site gets float32 tensors, exactly the values the server will add its update to. Uplink:
float32 weights (the original wire) or the 16-bit rounding of ``local - received``, for the
keys the server asked for (``UPLINK_MODALITIES`` in the round's config, with omission).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from torch import Tensor

from omnifuse_model.wire_format import (
    RAW_STYPE,
    UPLINK_MODALITIES,
    WireFormat,
    decode16,
    encode16,
    uplink_keys,
)


def decode_global(record: ArrayRecord) -> dict[str, Tensor]:
    """The global weights as float32 tensors, from float32 or raw 16-bit arrays."""
    state: dict[str, Tensor] = {}
    for key in record:
        array = record[key]
        if array.stype == RAW_STYPE:
            value = decode16(array.data, array.dtype, tuple(array.shape))
        else:
            value = array.numpy()
        state[key] = torch.from_numpy(value)
    return state


def sent_modalities(config: ConfigRecord, wire: WireFormat) -> list[str] | None:
    """The modalities whose groups go back (None: every key), as the server asked."""
    if not wire.omit_unheld:
        return None
    if UPLINK_MODALITIES not in config:
        raise ValueError(
            f"config record: omission is on but no '{UPLINK_MODALITIES}' key, got keys "
            f"{sorted(config)}"
        )
    return [str(m) for m in config[UPLINK_MODALITIES]]  # type: ignore[union-attr]


def encode_update(
    local: Mapping[str, Tensor],
    received: Mapping[str, Tensor],
    wire: WireFormat,
    modality_names: list[str],
    held: list[str] | None,
) -> ArrayRecord:
    """The reply's weights: float32 ``local`` (the original wire), else the raw 16-bit
    ``local - received`` of the keys asked for."""
    if not wire.deltas:
        return ArrayRecord(dict(local))
    arrays = {}
    for key in uplink_keys(local, modality_names, held):
        delta = (local[key].detach().float() - received[key].float()).cpu().numpy()
        arrays[key] = Array(wire.dtype, tuple(delta.shape), RAW_STYPE, encode16(delta, wire.dtype))
    return ArrayRecord(arrays)

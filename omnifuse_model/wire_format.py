"""How model weights travel: float32 weights (the original format) or 16-bit deltas.

numpy and torch (no Flower): the ClientApp and the server wrap these bytes in Flower ``Array``s.

``float32`` (the original wire): the server sends the float32 global weights, the site sends
its float32 weights back (Flower's ``numpy.ndarray`` serialisation). Central DP needs it:
Flower's clipping wrappers clip ``reply - global`` on full float32 weights.

``float16`` / ``bfloat16`` (16-bit transport):

- downlink: the server keeps float32 master weights ``W`` and sends ``R = round16(W)``; the
  site decodes ``R`` to float32 exactly and trains from it;
- uplink: the site sends ``round16(local - R)``, its update against exactly what it started
  from; the server adds the aggregated decoded updates to ``W`` (never to ``R``), so the
  global model is never rounded to 16 bits, only each round's update is;
- bytes: raw little-endian 16-bit values (``RAW_STYPE``), no per-array header; the declared
  dtype and shape must match and the byte count must be exactly ``2 * size``; a value that
  decodes to NaN or infinity is refused.

Omission (``omit_unheld``, only with 16-bit deltas and modality-aware aggregation): a site
sends back only the groups it can change that count in the aggregate: the shared parameters
and the groups (encoder, DWFuse head) of the modalities it registered as held. A site lacking
modality m still USES m's encoder (the missing placeholder ``e_m(0)``) and m's head, so the
downlink is always the whole model; but modality-aware aggregation averages m's group only
over sites with ``num-present.m > 0``, and a site that registered 0 samples of m can never
report more (``check_counts_bound``): its m-group update would get weight 0, so leaving it
out changes no aggregate (bit-equal; tests/federation/test_transport.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, get_args

import numpy as np
import torch
from pydantic import Field

from omnifuse_model.config import StrictModel
from omnifuse_model.federation_schema import parameter_modality

TransportDtype = Literal["float32", "float16", "bfloat16"]
TRANSPORT_DTYPES: tuple[str, ...] = get_args(TransportDtype)
RAW_STYPE = "omnifuse.raw-le"  # Flower Array stype of raw little-endian 16-bit values
# server -> site ConfigRecord key: the modalities whose groups the site sends back (list[str])
UPLINK_MODALITIES = "uplink-modalities"


class WireFormat(StrictModel):
    """How weights travel in one run (part of the round plan)."""

    dtype: TransportDtype = Field(
        default="float32",
        description="float32: weights both ways (the original wire); float16/bfloat16: the "
        "16-bit rounding of the master weights down, 16-bit deltas up.",
    )
    omit_unheld: bool = Field(
        default=False,
        description="A site sends back only the shared groups and those of its held modalities.",
    )

    @property
    def deltas(self) -> bool:
        return self.dtype != "float32"


# The smallest float32 magnitude each wire dtype rounds to infinity (round to nearest
# even): float16's largest finite value is 65504, and 65520 is the tie that rounds up;
# bfloat16 keeps float32's exponent, and 0x7F7F8000 is the tie above its largest finite.
OVERFLOW_AT = {
    "float16": 65520.0,
    "bfloat16": float(np.array(0x7F7F8000, np.uint32).view(np.float32)),
    "float32": math.inf,
}


def fits_wire(row: np.ndarray, dtype: str) -> bool:
    """Whether every value of the float32 ``row`` is finite and stays finite in ``dtype``
    (two reductions, as cheap as ``np.isfinite(row).all()``; NaN fails)."""
    if row.size == 0:
        return True
    limit = OVERFLOW_AT[dtype]
    return -limit < float(row.min()) and float(row.max()) < limit  # NaN: both False


def encode16(value: np.ndarray, dtype: str) -> bytes:
    """Raw little-endian 16-bit bytes of a float32 array (round to nearest even)."""
    flat = np.ascontiguousarray(value, dtype=np.float32).reshape(-1)
    if dtype == "float16":
        return flat.astype("<f2").tobytes()
    if dtype == "bfloat16":
        # torch's float32 -> bfloat16 is the rounding (bits + 0x7FFF + lsb) >> 16 for every
        # value but NaN (NaN stays NaN; the server refuses both), in one pass, not four
        source = torch.from_numpy(flat if flat.flags.writeable else flat.copy())
        rounded = source.to(torch.bfloat16).view(torch.int16).numpy()
        return rounded.astype("<i2", copy=False).tobytes()
    raise ValueError(f"16-bit dtype {dtype!r}: expected float16 or bfloat16")


def decode16(
    data: bytes, dtype: str, shape: Sequence[int], out: np.ndarray | None = None
) -> np.ndarray:
    """float32 values of raw 16-bit bytes, into ``out`` (flat float32) when given.

    Raises ``ValueError`` naming what is wrong: an unknown dtype or a byte count other than
    ``2 * prod(shape)``. Finiteness is the caller's check (one dot product per site)."""
    size = math.prod(int(n) for n in shape)
    if len(data) != 2 * size:
        raise ValueError(f"byte_count:{len(data)}!={2 * size}")
    target = np.empty(size, np.float32) if out is None else out
    if dtype == "float16":  # astype then copy: np.copyto's casting loop is 4x slower
        target[...] = np.frombuffer(data, "<f2").astype(np.float32)
    elif dtype == "bfloat16":
        np.left_shift(np.frombuffer(data, "<u2"), 16, out=target.view(np.uint32), dtype=np.uint32)
    else:
        raise ValueError(f"dtype:{str(dtype)[:20]}")
    return target.reshape(tuple(shape)) if out is None else target


def round16(value: np.ndarray, dtype: str) -> np.ndarray:
    """What a site receives for a float32 array: its 16-bit rounding, as float32."""
    return decode16(encode16(value, dtype), dtype, value.shape)


def held_modalities(num_present: Mapping[str, int]) -> list[str]:
    """The modalities a site registered as held (declared ``num-present.m > 0``)."""
    return sorted(m for m, n in num_present.items() if n > 0)


def uplink_keys(
    keys: Iterable[str], modality_names: list[str], held: Iterable[str] | None
) -> list[str]:
    """The parameter keys a site sends back: every key (``held`` None), else the shared
    ones and those of the modalities in ``held``."""
    keys = list(keys)
    if held is None:
        return keys
    kept = set(held)
    return [k for k in keys if (m := parameter_modality(k, modality_names)) is None or m in kept]

"""Flower ArrayRecords of the master weights, built from one flat row without per-array work.

``Array(ndarray)`` serialises each array with ``np.save`` into a ``BytesIO`` and builds the
``Array`` twice: about 60 microseconds per array plus two copies of its bytes, 8-10 ms per
round for the 148 arrays of the paper-size model. Here each array's bytes are the ``.npy``
header (numpy's own ``write_array_header_1_0``, made once per shape) joined with the row's
bytes in one copy: the same bytes as Flower's serialisation (tested), so ``Array.numpy()``
and every Flower tool read them unchanged.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from omnifuse_model.wire_format import RAW_STYPE

NUMPY_STYPE = "numpy.ndarray"  # Flower's SType.NUMPY


@functools.lru_cache(maxsize=4096)
def npy_header(shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` (v1.0) header of a little-endian float32 C-order array of ``shape``."""
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False}
    np.lib.format.write_array_header_1_0(buffer, {**header, "shape": shape})
    return buffer.getvalue()


def _array(dtype: str, shape: tuple[int, ...], stype: str, data: bytes) -> Array:
    """``Array(dtype, shape, stype, data)`` without its argument dispatch and per-field
    dirty tracking (5 attribute hooks, ~20 microseconds): the instance's fields set at once,
    as Flower's own ``Array(ndarray)`` does; a new Array is dirty by default (tested equal)."""
    array = Array.__new__(Array)
    array.__dict__.update(dtype=dtype, shape=shape, stype=stype, data=data)
    return array


def record_of_bytes(
    data: Mapping[str, bytes], dtype: str, stype: str, shapes: Mapping[str, tuple[int, ...]]
) -> ArrayRecord:
    """The ArrayRecord of each key's ready bytes (``shapes`` gives the keys and their order)."""
    record = ArrayRecord()
    for key, shape in shapes.items():
        record[key] = _array(dtype, tuple(int(n) for n in shape), stype, data[key])
    return record


def float32_record(
    row: np.ndarray, spans: Mapping[str, tuple[int, int]], shapes: Mapping[str, tuple[int, ...]]
) -> ArrayRecord:
    """The ArrayRecord of ``row``'s keys (float32, little-endian), byte for byte what
    ``ArrayRecord({k: Array(v)})`` of the same arrays holds."""
    if row.dtype != np.dtype("<f4") or not row.flags.c_contiguous:
        raise ValueError(f"row: expected contiguous little-endian float32, got {row.dtype}")
    record = ArrayRecord()  # filled key by key: ArrayRecord(dict) copies every Array again
    for key, (start, stop) in spans.items():
        shape = tuple(int(n) for n in shapes[key])
        data = b"".join((npy_header(shape), memoryview(row[start:stop])))
        record[key] = _array("float32", shape, NUMPY_STYPE, data)
    return record


def raw16_record(
    encoded: np.ndarray,
    dtype: str,
    spans: Mapping[str, tuple[int, int]],
    shapes: Mapping[str, tuple[int, ...]],
) -> ArrayRecord:
    """The ArrayRecord of 16-bit values (``encoded``: one ``uint16`` row) as raw
    little-endian bytes per key (``omnifuse_model.wire_format``)."""
    if encoded.dtype != np.dtype("<u2"):
        raise ValueError(f"encoded: expected little-endian uint16, got {encoded.dtype}")
    record = ArrayRecord()
    for key, (start, stop) in spans.items():
        shape = tuple(int(n) for n in shapes[key])
        record[key] = _array(dtype, shape, RAW_STYPE, encoded[start:stop].tobytes())
    return record

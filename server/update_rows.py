"""A round's site updates, checked in structure and laid out for one streamed pass.

A site's reply becomes a :class:`SiteUpdate`: for each key it sent, a flat view on the
reply's own bytes (16-bit transport: the raw ``uint16`` values, zero-copy; float32 transport:
the deserialised float32 weights). Nothing is decoded to float32 here: the update is read
once, in cache-sized chunks, by ``server.update_stream`` (norm, finiteness and FedAvg in the
same pass), or decoded into one float32 row (:meth:`SiteUpdate.row`) for the robust rules.

Values, by transport. 16-bit: the site's update (``site weights - master weights``), decoded
with one shift (``omnifuse_model.wire_format.decode16``); the server aggregates updates and
adds the result to the master. float32 (the original wire): the site's weights, aggregated as
they are (one site's aggregate is its weights, bit for bit). Keys a site was not asked to send
(omission) read as zero; aggregation gives that site weight 0 for them anyway.

Reading is strict: exactly the keys the site was asked for, each of the configured dtype and
stype, the global shape and the exact byte count; anything else is a ``ReplyError`` naming the
key.

Layout (:class:`UpdateLayout`): keys are laid out group by group
(``federation_schema.parameter_modality``: the shared parameters, then each modality's), so
each aggregation group is one contiguous span of a row, and cut into chunks of at most
``CHUNK_COORDINATES`` coordinates that never cross a group boundary.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord

from omnifuse_model.federation_replies import ReplyError
from omnifuse_model.federation_schema import parameter_modality
from omnifuse_model.wire_format import RAW_STYPE, WireFormat

# 2^16 float32 coordinates = 256 KB: a chunk's scratch and accumulator stay in the L2 cache
# while every site's values for it stream through (measured: 64K is the fastest of 16K-256K
# for the paper-size model at 10 sites)
CHUNK_COORDINATES = 1 << 16


@dataclass(frozen=True)
class Chunk:
    """Consecutive keys of one group: ``parts`` are (key, offset in the chunk, size)."""

    start: int
    stop: int
    group: str  # the first key of the group (``UpdateLayout.group_spans``)
    parts: tuple[tuple[str, int, int], ...]

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class UpdateLayout:
    """Where each parameter lives in a flat float32 row, and the row's chunks.

    Keys are laid out group by group, so each aggregation group is one contiguous span of the
    row (``group_spans``), named by its first key (``parameter_modality`` of that key names
    the group)."""

    master: Mapping[str, np.ndarray]
    modality_names: list[str] = field(default_factory=list)
    chunk_coordinates: int = CHUNK_COORDINATES
    spans: dict[str, tuple[int, int]] = field(init=False)
    group_spans: dict[str, tuple[int, int]] = field(init=False)  # by a key of the group
    chunks: list[Chunk] = field(init=False)
    size: int = field(init=False)
    _flat: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        groups: dict[str | None, list[str]] = {}
        for key in self.master:
            groups.setdefault(parameter_modality(key, self.modality_names), []).append(key)
        offset, spans, self.group_spans, self.chunks = 0, {}, {}, []
        for keys in groups.values():
            start = offset
            for key in keys:
                spans[key] = (offset, offset + int(self.master[key].size))
                offset += int(self.master[key].size)
            self.group_spans[keys[0]] = (start, offset)
            self.chunks.extend(self._chunks(keys, spans))
        self.spans = {key: spans[key] for key in self.master}  # the master's key order
        self.size = offset

    def _chunks(self, keys: list[str], spans: dict[str, tuple[int, int]]) -> list[Chunk]:
        """The group's keys cut into chunks of up to ``chunk_coordinates`` (a larger key
        alone)."""
        chunks: list[Chunk] = []
        parts: list[tuple[str, int, int]] = []
        start = spans[keys[0]][0]
        for key in keys:
            begin, end = spans[key]
            if parts and end - start > self.chunk_coordinates:
                chunks.append(Chunk(start, begin, keys[0], tuple(parts)))
                parts, start = [], begin
            parts.append((key, begin - start, end - begin))
        chunks.append(Chunk(start, spans[keys[-1]][1], keys[0], tuple(parts)))
        return chunks

    def rebased(self, master: Mapping[str, np.ndarray], flat: np.ndarray) -> UpdateLayout:
        """This layout for new master weights of the same keys and shapes, held as the
        row ``flat`` (nothing is laid out or copied again)."""
        if flat.shape != (self.size,) or flat.dtype != np.float32:
            raise ValueError(f"flat master: expected float32 [{self.size}], got {flat.shape}")
        layout = copy.copy(self)
        layout.master, layout._flat = master, flat
        return layout

    def flat_master(self) -> np.ndarray:
        """The master weights as one row (built once)."""
        if self._flat is None:  # filled before it is published (threads may ask at once)
            flat = np.empty(self.size, np.float32)
            for key, (start, stop) in self.spans.items():
                flat[start:stop] = np.asarray(self.master[key]).reshape(-1)
            self._flat = flat
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


@dataclass
class SiteUpdate:
    """A reply's weights as sent: per key a flat ``uint16`` view on the reply's bytes (16-bit
    transport) or float32 values (float32 transport). Keys not in ``parts`` read as zero."""

    parts: dict[str, np.ndarray]

    def decode_into(self, key: str, out: np.ndarray) -> None:
        """``key``'s values as float32 into ``out`` (zeros when the key was not sent)."""
        part = self.parts.get(key)
        if part is None:
            out[...] = 0.0
        elif part.dtype == np.uint16:  # bfloat16: the high half of a float32
            np.left_shift(part, 16, out=out.view(np.uint32), dtype=np.uint32)
        elif part.dtype == np.float16:
            out[...] = part.astype(np.float32)  # astype then copy: 4x np.copyto's cast loop
        else:
            out[...] = part

    def is_bfloat16(self) -> bool:
        """Raw bfloat16 values (``uint16`` views); False for float16, float32 or no keys."""
        return bool(self.parts) and next(iter(self.parts.values())).dtype == np.uint16

    def decode_chunk(self, parts: Sequence[tuple[str, int, int]], out: np.ndarray) -> None:
        """The keys ``parts`` ((key, offset, size) in ``out``) as float32 into ``out``: the
        streamed pass's inner loop, one numpy call per key."""
        get = self.parts.get
        if self.parts and next(iter(self.parts.values())).dtype == np.uint16:
            bits = out.view(np.uint32)  # bfloat16: the high half of a float32
            for key, offset, size in parts:
                part = get(key)
                if part is None:
                    out[offset : offset + size] = 0.0
                else:
                    np.left_shift(part, 16, out=bits[offset : offset + size], dtype=np.uint32)
            return
        for key, offset, size in parts:
            self.decode_into(key, out[offset : offset + size])

    def row(self, layout: UpdateLayout) -> np.ndarray:
        """The whole update (or weights) as one float32 row in ``layout``."""
        row = np.empty(layout.size, np.float32)
        for key, (start, stop) in layout.spans.items():
            self.decode_into(key, row[start:stop])
        return row

    def first_non_finite(self, layout: UpdateLayout) -> str | None:
        """The first sent key (layout order) holding NaN or infinity, else None."""
        for key, (start, stop) in layout.spans.items():
            if key in self.parts:
                values = np.empty(stop - start, np.float32)
                self.decode_into(key, values)
                if not np.isfinite(values).all():
                    return key
        return None


def read_update(
    record: ArrayRecord, layout: UpdateLayout, expected: list[str], wire: WireFormat
) -> SiteUpdate:
    """The reply's weights, checked in structure (not decoded); ``ReplyError`` for anything
    not exactly asked."""
    arrays = dict(record.items())
    missing = [k for k in expected if k not in arrays]
    if missing:
        more = f"+{len(missing) - 1}" if len(missing) > 1 else ""
        raise ReplyError(f"missing_keys:{missing[0]}{more}")
    unexpected = sorted(set(arrays) - set(expected))
    if unexpected:
        raise ReplyError(f"unexpected_keys:{str(unexpected[0])[:80]}")
    master = layout.master
    if not wire.deltas:
        return SiteUpdate({key: _read_float32(arrays[key], key, master[key]) for key in expected})
    raw = np.dtype("<u2" if wire.dtype == "bfloat16" else "<f2")
    parts = {}
    for key in expected:  # the hot loop of screening: 148 keys a reply at the paper's size
        array, reference = arrays[key], master[key]
        if array.dtype != wire.dtype or tuple(array.shape) != reference.shape:
            raise ReplyError(f"declared_dtype_or_shape:{key}:{str(array.dtype)[:20]}")
        if array.stype != RAW_STYPE:
            raise ReplyError(f"stype:{key}:{str(array.stype)[:30]}")
        data = array.data
        if type(data) is not bytes or len(data) != 2 * reference.size:
            size = len(data) if isinstance(data, bytes) else type(data).__name__
            raise ReplyError(f"undecodable_array:{key}:byte_count:{size}!={2 * reference.size}")
        parts[key] = np.frombuffer(data, raw)
    return SiteUpdate(parts)


def _read_float32(array, key: str, reference: np.ndarray) -> np.ndarray:
    if array.dtype != "float32" or tuple(array.shape) != reference.shape:
        raise ReplyError(f"declared_dtype_or_shape:{key}:{str(array.dtype)[:20]}")
    try:
        value = array.numpy()
    except Exception as error:  # malformed bytes are the site's fault
        raise ReplyError(f"undecodable_array:{key}:{type(error).__name__}") from error
    if value.dtype != reference.dtype:
        raise ReplyError(f"dtype_mismatch:{key}:{value.dtype}!={reference.dtype}")
    if value.shape != reference.shape:
        raise ReplyError(f"shape_mismatch:{key}")
    expected = _npy_data_offset(array.data) + value.nbytes
    if len(array.data) != expected:  # np.load ignores what follows the array
        raise ReplyError(f"undecodable_array:{key}:byte_count:{len(array.data)}!={expected}")
    return np.ascontiguousarray(value).reshape(-1)


def _npy_data_offset(data: bytes) -> int:
    """Where the values start in ``data``, a .npy file that np.load has already read."""
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        np.lib.format.read_array_header_1_0(stream)
    else:
        np.lib.format.read_array_header_2_0(stream)
    return stream.tell()


def exact_norm(update: SiteUpdate, layout: UpdateLayout, deltas: bool) -> float:
    """The update's L2 norm in float64 (the fallback when a float32 sum of squares
    overflowed although every value is finite)."""
    row = update.row(layout).astype(np.float64)
    difference = row if deltas else row - layout.flat_master()
    return math.sqrt(float(np.sum(np.square(difference))))

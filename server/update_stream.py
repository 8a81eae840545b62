"""One streamed pass over a round's site updates: norms, finiteness and FedAvg together.

The round's replies hold every site's update as 16-bit values (or float32 weights). The pass
walks the layout's chunks (``server.update_rows.Chunk``: at most 64K coordinates, one group
each); per chunk it decodes each site's values into a cache-resident scratch buffer, adds
their squares to the site's norm, and, for the sites taking part in the chunk's group,
multiplies them by the site's normalised weight and adds them to the chunk's accumulator.
Every byte of every reply is read once and no site is held as a float32 row: at 10 sites of
the paper-size model the decoded rows were 118 MB written and read again, and at 100 sites
1.2 GB of server memory.

Numerics equal ``server.aggregation``'s FedAvg bit for bit: per group the weights are
``(w / sum w)`` in float32 over the participating sites, the first participant's values times
its weight start the sum and each next one is multiplied then added, in site order (float32
throughout); with 16-bit deltas the master weights are added last. Norms are sums of float32
chunk dot products, accumulated in float64.

Chunks are spread over ``threads`` worker threads (numpy releases the GIL in its loops); a
chunk's arithmetic does not depend on the thread that runs it, so the aggregate is identical
for any thread count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from server.array_records import npy_header
from server.stream_kernels import bfloat16_step
from server.update_rows import Chunk, SiteUpdate, UpdateLayout


@dataclass
class StreamResult:
    """The aggregate row (None when not asked), each site's squared norm (float64), the
    aggregate's 16-bit rounding as raw ``uint16`` (when asked: the next downlink) and, when
    asked to serialise, each key's bytes: ``.npy`` float32 (Flower's ``Array(ndarray)``
    bytes) and raw 16-bit."""

    aggregate: np.ndarray | None
    squared_norms: np.ndarray
    encoded: np.ndarray | None = None
    float32_bytes: dict[str, bytes] = field(default_factory=dict)
    encoded_bytes: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _Pass:
    """What every worker of one pass reads and writes (disjoint chunks of the rows)."""

    updates: Sequence[SiteUpdate]
    layout: UpdateLayout
    master: np.ndarray  # the layout's flat master, built before the workers start
    weights: Mapping[str, np.ndarray | None] | None
    deltas: bool
    norms: bool
    aggregate: np.ndarray | None
    encoded: np.ndarray | None
    result: StreamResult
    serialise: bool


def default_threads() -> int:
    """Worker threads for the pass: 1. Measured on the 2-core machine (paper-size model, 10
    sites, idle): 18 ms on one thread, 26 ms on two with 64K chunks (numpy's many short calls
    contend for the GIL); threads only paid off with 1M-coordinate chunks (17.7 ms), which
    no longer fit the cache. ``server-threads`` overrides it."""
    return 1


def stream_updates(
    updates: Sequence[SiteUpdate],
    layout: UpdateLayout,
    weights: Mapping[str, np.ndarray | None] | None,
    *,
    deltas: bool,
    norms: bool = True,
    threads: int = 1,
    encode: str | None = None,
    serialise: bool = False,
) -> StreamResult:
    """Read every update once, chunk by chunk.

    Args:
        updates: the sites' updates, in the order sums are taken (site order).
        layout: the master weights' layout (its flat master is added / kept).
        weights: per group (``layout.group_spans`` key) the float32 weights of the sites,
            normalised over the participants (0: not taking part); None for a group no site
            takes part in (it keeps the master's values). ``weights=None``: norms only.
        deltas: values are updates (16-bit transport; the aggregate is master + the weighted
            mean) rather than weights (the aggregate is the weighted mean).
        norms: also compute each site's squared L2 norm (of the update: values - master when
            not ``deltas``).
        threads: worker threads; chunks are dealt round-robin.
        encode: ``float16`` / ``bfloat16``: also round the aggregate to 16 bits, chunk by
            chunk while it is in cache (round to nearest even, as
            ``omnifuse_model.wire_format.encode16``).
        serialise: also copy each key's aggregate (and 16-bit rounding) into the bytes of
            its Flower ``Array`` while the chunk is in cache (``server.array_records``).
    """
    aggregate = np.empty(layout.size, np.float32) if weights is not None else None
    encoded = None
    if encode is not None and aggregate is not None:
        if encode not in ("float16", "bfloat16"):
            raise ValueError(f"encode {encode!r}: expected float16 or bfloat16")
        encoded = np.empty(layout.size, np.uint16 if encode == "bfloat16" else np.float16)
    result = StreamResult(aggregate, np.zeros(len(updates)))
    master = layout.flat_master()
    work = _Pass(
        updates, layout, master, weights, deltas, norms, aggregate, encoded, result, serialise
    )
    workers = max(1, min(threads, len(layout.chunks)))
    shares = [layout.chunks[index::workers] for index in range(workers)]
    if workers == 1:
        partial = [_stream_chunks(shares[0], work)]
    else:
        with ThreadPoolExecutor(workers) as pool:
            partial = list(pool.map(lambda chunks: _stream_chunks(chunks, work), shares))
    result.squared_norms = np.sum(partial, axis=0)
    result.encoded = None if encoded is None else encoded.view(np.uint16)
    return result


def _stream_chunks(chunks: list[Chunk], work: _Pass) -> np.ndarray:
    """One worker's chunks; returns its part of the squared norms. Overflow is not warned
    about: a non-finite norm is traced to its key (``reply_screening.screen_norms``) and a
    non-finite aggregate refused (``OmniFuseStrategy.average``)."""
    with np.errstate(over="ignore", invalid="ignore"):  # per thread
        return _stream_chunks_quietly(chunks, work)


def _stream_chunks_quietly(chunks: list[Chunk], work: _Pass) -> np.ndarray:
    largest = max((chunk.size for chunk in chunks), default=0)
    scratch = np.empty(largest, np.float32)
    difference = np.empty(largest, np.float32)
    bits = np.empty(largest, np.uint32)
    squared = np.zeros(len(work.updates), np.float64)
    master, deltas, norms = work.master, work.deltas, work.norms
    compiled = [deltas and update.is_bfloat16() for update in work.updates]
    for chunk in chunks:
        values, old = scratch[: chunk.size], master[chunk.start : chunk.stop]
        group = None if work.weights is None else work.weights[chunk.group]
        out = None if work.aggregate is None else work.aggregate[chunk.start : chunk.stop]
        first = chunk.parts[0][0]  # a site sends a group whole or not at all (uplink_keys)
        started = False
        for site, update in enumerate(work.updates):
            weight = 0.0 if group is None or out is None else float(group[site])
            if not (weight > 0 or (norms and (first in update.parts or not deltas))):
                continue  # nothing sent here and no part in the sum: zeros, no work
            if compiled[site]:
                squared[site] += _bfloat16_chunk(
                    update, chunk, out, scratch, weight, not started, norms
                )
                started = started or weight > 0
                continue
            update.decode_chunk(chunk.parts, values)
            if norms:
                delta = values if deltas else np.subtract(values, old, out=difference[: chunk.size])
                squared[site] += float(np.dot(delta, delta))
            if weight > 0:
                if not started:
                    np.multiply(values, group[site], out=out)
                    started = True
                else:
                    np.multiply(values, group[site], out=values)
                    np.add(out, values, out=out)
        if out is not None:
            _finish_chunk(chunk, work, out, old, started, bits[: chunk.size])
    return squared


def _bfloat16_chunk(
    update: SiteUpdate,
    chunk: Chunk,
    out: np.ndarray | None,
    scratch: np.ndarray,
    weight: float,
    first: bool,
    norms: bool,
) -> float:
    """One bfloat16 site's part of a chunk through the compiled step, key by key (a key not
    sent is zeros: it starts the sum at 0, adds nothing and has no squares)."""
    squares = 0.0
    bits = scratch.view(np.uint32)
    for key, offset, size in chunk.parts:
        part = update.parts.get(key)
        target = out[offset : offset + size] if out is not None else scratch[:0]
        if part is None:
            if weight > 0 and first:
                target[...] = 0.0
            continue
        squares += bfloat16_step(part, target, bits[:size], scratch[:size], weight, first, norms)
    return squares


def _finish_chunk(
    chunk: Chunk, work: _Pass, out: np.ndarray, old: np.ndarray, started: bool, bits: np.ndarray
) -> None:
    """The chunk's aggregate complete (master kept or added), rounded and serialised while
    it is in cache."""
    if not started:  # no site takes part in the group: the master's values
        if work.deltas:  # update 0 + master, as server.aggregation (-0.0 becomes +0.0)
            out[...] = 0.0
            np.add(out, old, out=out)
        else:
            out[...] = old
    elif work.deltas:
        np.add(out, old, out=out)
    encoded = None
    if work.encoded is not None:
        encoded = work.encoded[chunk.start : chunk.stop]
        _encode16(out, encoded, bits)
    if not work.serialise:
        return
    for key, offset, size in chunk.parts:
        shape = work.layout.master[key].shape
        piece = out[offset : offset + size]
        work.result.float32_bytes[key] = b"".join((npy_header(shape), memoryview(piece)))
        if encoded is not None:
            work.result.encoded_bytes[key] = encoded[offset : offset + size].tobytes()


def _encode16(values: np.ndarray, out: np.ndarray, bits: np.ndarray) -> None:
    """``values`` rounded to nearest even into ``out`` (float16, or bfloat16 as ``uint16``):
    the same bits as ``omnifuse_model.wire_format.encode16``, without temporaries."""
    if out.dtype == np.float16:
        out[...] = values
        return
    source = values.view(np.uint32)
    np.right_shift(source, 16, out=bits)
    np.bitwise_and(bits, 1, out=bits)
    np.add(bits, 0x7FFF, out=bits)
    np.add(bits, source, out=bits)
    np.right_shift(bits, 16, out=bits)
    out[...] = bits

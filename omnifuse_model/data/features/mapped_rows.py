"""Feature shards read through a memory map, and a modality's rows gathered from them lazily.

A site's report token states are its bulk: ``[150, 768]`` float16 per stay (0.23 MB; a
full-MIMIC-sized site of 2,000 stays holds ~0.46 GB of them, ~0.92 GB as float32). Reading
them into one float32 tensor each round costs seconds and holds the whole split in memory
for the round. Instead:

* :class:`MappedShard` maps a ``.safetensors`` shard (``mmap``, copy-on-write, never written)
  and exposes its tensors as zero-copy views: nothing is read until a row is used, and the
  pages read are the kernel's page cache (dropped under memory pressure, shared by every
  process reading the same shard), not the process's own heap;
* :class:`MappedRows` is one modality's column of a split: for each sample, which shard view
  and row holds it (or none: an absent modality reads as zeros). Indexing it with a batch's
  rows gathers just those rows (one gather per shard) and converts them to float32.

A shard's header is parsed once per process per file identity
(:mod:`~omnifuse_model.data.features.shard_header`); the map itself is made anew each time
a store maps the shard and lives as long as the tensors that view it, so a site's pages are
mapped only while its dataset is alive.

Checksums: a shard's bytes are hashed against its name (``shard_checks.shard_problem``) the
first time this process maps it; shard files are content-addressed and never rewritten in
place, so a verified ``(path, inode, size, mtime, ctime)`` is not hashed again by the same
process (a file changed or replaced since is hashed again).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from omnifuse_model.data.features.shard_header import (
    ShardHeader,
    ShardIdentity,
    TensorLayout,
    cached_header,
    shard_identity,
)

_VERIFIED: set[ShardIdentity] = set()
"""(path, inode, size, mtime_ns, ctime_ns) of the shards this process hashed against their
names."""

_NUMPY_DTYPES = frozenset(
    {torch.float16, torch.float32, torch.float64, torch.bool, torch.uint8, torch.int8}
    | {torch.int16, torch.int32, torch.int64}
)
"""Dtypes NumPy holds as torch does (not bfloat16)."""

ShardCheck = Callable[[Path, mmap.mmap], str]
"""``check(path, buffer)``: the problem with a shard's bytes in words, "" when none."""


class ShardCheckFailed(ValueError):
    """A shard's bytes fail the check given to :meth:`MappedShard.open` (the problem)."""


class MappedShard:
    """One safetensors shard mapped read-only into memory; ``tensors`` are views on the map.

    ``header`` is parsed once per process per file identity
    (:mod:`~omnifuse_model.data.features.shard_header`); ``rows`` maps an entry key to its row
    (None: a failure record).
    """

    def __init__(
        self, path: Path, identity: ShardIdentity, buffer: mmap.mmap, header: ShardHeader
    ) -> None:
        self.path = path
        self.identity = identity
        self.buffer = buffer
        self.header = header
        self.tensors = {name: _view(buffer, layout) for name, layout in header.tensors.items()}

    @property
    def metadata(self) -> dict[str, str]:
        """The raw ``__metadata__``: entry key -> JSON record, and the format key."""
        return self.header.metadata

    @property
    def rows(self) -> dict[str, int | None]:
        """Entry key -> row in every tensor (None: a failure record)."""
        return self.header.rows

    @classmethod
    def open(cls, path: Path, check: ShardCheck | None = None) -> MappedShard:
        """Map ``path``. ``check(path, buffer)`` returns a problem in words ("" if none); it
        runs the first time this process maps the file (see the module docstring), and a
        problem raises :class:`ShardCheckFailed`."""
        shard = cls.map(path)
        if check is not None:
            shard.verify(check)
        return shard

    @classmethod
    def map(cls, path: Path) -> MappedShard:
        """Map ``path`` without checking its bytes (:meth:`verify` before using them)."""
        with open(path, "rb") as handle:
            # The identity of the file opened (not of whatever the path names a moment later).
            identity = shard_identity(path, os.fstat(handle.fileno()))
            # ACCESS_COPY: a writable (copy-on-write) map, so torch.frombuffer takes it without
            # a warning; nothing here writes to it, and the file is never changed.
            buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        header = cached_header(identity, lambda: buffer[: min(len(buffer), _prefix(buffer))])
        return cls(path, identity, buffer, header)

    @property
    def verified(self) -> bool:
        """Whether this process has hashed this file identity against its name."""
        return self.identity in _VERIFIED

    def verify(self, check: ShardCheck) -> None:
        """Run ``check`` on the mapped bytes unless this identity passed it before in this
        process; raises :class:`ShardCheckFailed` with the problem."""
        if self.verified:
            return
        problem = check(self.path, self.buffer)
        if problem:
            raise ShardCheckFailed(problem)
        _VERIFIED.add(self.identity)


def _prefix(buffer: mmap.mmap) -> int:
    """Bytes of the length field and the header (the rest of the file is tensors)."""
    return 8 + int.from_bytes(buffer[:8], "little") if len(buffer) >= 8 else len(buffer)


def _view(buffer: mmap.mmap, layout: TensorLayout) -> Tensor:
    """A zero-copy view of one tensor of the mapped shard."""
    count = layout.end - layout.begin
    if count == 0:
        return torch.empty(layout.shape, dtype=layout.dtype)
    size = torch.empty((), dtype=layout.dtype).element_size()
    flat = torch.frombuffer(buffer, dtype=layout.dtype, count=count // size, offset=layout.begin)
    return flat.view(layout.shape)


class MappedRows:
    """A modality's ``[n, *row_shape]`` column held as (shard view, row) per sample.

    ``views``: one tensor ``[rows, *row_shape]`` per shard (zero-copy maps); ``shard[i]`` is the
    view holding sample ``i`` (-1: absent, reads as zeros) and ``row[i]`` its row there.
    Indexing (an int, a slice or an index tensor) returns float32 rows, read from the maps;
    :meth:`take_rows` is a new column over some samples (nothing read).
    """

    def __init__(
        self, views: Sequence[Tensor], shard: Tensor, row: Tensor, row_shape: tuple[int, ...]
    ) -> None:
        if shard.shape != row.shape or shard.dim() != 1:
            raise ValueError(f"shard {tuple(shard.shape)} and row {tuple(row.shape)}: need [n]")
        for index, view in enumerate(views):
            if tuple(view.shape[1:]) != row_shape:
                raise ValueError(
                    f"shard view {index} has rows of shape {tuple(view.shape[1:])}, "
                    f"expected {row_shape}"
                )
        self.views = list(views)
        self.shard = shard.to(torch.int64)
        self.row = row.to(torch.int64)
        self.row_shape = row_shape

    @property
    def dtype(self) -> torch.dtype:
        """Rows read as float32, whatever the shards store."""
        return torch.float32

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.shard), *self.row_shape))

    def dim(self) -> int:
        return 1 + len(self.row_shape)

    def __len__(self) -> int:
        return len(self.shard)

    def _one(self, index: int) -> Tensor:
        shard = int(self.shard[index])
        if shard < 0:
            return torch.zeros(self.row_shape)
        return self.views[shard][int(self.row[index])].to(torch.float32)

    def __getitem__(self, index: int | slice | Tensor) -> Tensor:
        if isinstance(index, int):
            return self._one(index)
        return self.read(torch.arange(len(self))[index])

    def read(self, positions: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """The rows of ``positions`` (all when None) as one ``[k, *row_shape]`` tensor of
        ``dtype`` (values converted as ``Tensor.to`` does); absent rows are zeros. One
        gather per shard view, not one per row."""
        shard = (self.shard if positions is None else self.shard[positions]).numpy()
        row = (self.row if positions is None else self.row[positions]).numpy()
        out = torch.empty(len(shard), *self.row_shape, dtype=dtype)
        if len(shard) == 0:
            return out
        order = np.argsort(shard, kind="stable")
        bounds = np.flatnonzero(np.diff(shard[order])) + 1
        for where in np.split(order, bounds):
            value = int(shard[where[0]])
            if value < 0:
                _copy_rows(out, where, None, None)
            else:
                _copy_rows(out, where, self.views[value], row[where])
        return out

    def zero_rows(self, rows: Tensor) -> MappedRows:
        """The column with the samples where ``rows`` (bool ``[n]``) is True absent (zeros)."""
        shard = torch.where(rows, torch.full_like(self.shard, -1), self.shard)
        return MappedRows(self.views, shard, self.row, self.row_shape)

    def take_rows(self, indices: Tensor) -> MappedRows:
        """The column of the samples ``indices`` (same maps; nothing read)."""
        return MappedRows(self.views, self.shard[indices], self.row[indices], self.row_shape)


def _copy_rows(
    out: Tensor, where: np.ndarray, view: Tensor | None, rows: np.ndarray | None
) -> None:
    """``out[where] = view[rows]`` converted to ``out``'s dtype (``view`` None: zeros).

    Without a conversion the copy is NumPy's, on this thread: torch's OpenMP parallel
    indexing of a few hundred rows gains nothing and, on cores busy with other work, waits
    for its threads to be scheduled (measured: a site's load 4x slower with 2 torch threads
    on 2 busy cores). A conversion (float16 -> float32) uses torch's vectorised cast."""
    if out.dtype in _NUMPY_DTYPES and (view is None or _numpy_readable(view, out.dtype)):
        target = out.numpy()
        target[where] = 0 if view is None else view.numpy()[rows]
    elif view is None:
        out.index_fill_(0, torch.from_numpy(where), 0)
    else:
        picked = view.index_select(0, torch.from_numpy(rows)).to(out.dtype)
        out.index_copy_(0, torch.from_numpy(where), picked)


def _numpy_readable(view: Tensor, dtype: torch.dtype) -> bool:
    return view.dtype == dtype and view.dtype in _NUMPY_DTYPES and not view.requires_grad


def concat_columns(columns: Sequence[Tensor | MappedRows]) -> Tensor | MappedRows:
    """The columns one after another: ``torch.cat`` when all are tensors, else one lazy
    :class:`MappedRows` (a tensor column becomes one more view, nothing is read or copied)."""
    if all(isinstance(column, Tensor) for column in columns):
        return torch.cat(list(columns))
    row_shape = tuple(columns[0].shape[1:])
    views: list[Tensor] = []
    shards, rows = [], []
    for column in columns:
        if tuple(column.shape[1:]) != row_shape:
            raise ValueError(f"concat_columns: rows {tuple(column.shape[1:])} != {row_shape}")
        if isinstance(column, MappedRows):
            offset = torch.where(column.shard >= 0, column.shard + len(views), column.shard)
            shards.append(offset)
            rows.append(column.row)
            views.extend(column.views)
        else:
            shards.append(torch.full((len(column),), len(views), dtype=torch.int64))
            rows.append(torch.arange(len(column)))
            views.append(column)
    return MappedRows(views, torch.cat(shards), torch.cat(rows), row_shape)

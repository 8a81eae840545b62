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
  rows gathers just those rows and converts them to float32.

Checksums: a shard's bytes are hashed against its name (``store.shard_problem``) the first
time this process maps it; shard files are content-addressed and never rewritten in place, so
a verified ``(path, inode, size, mtime, ctime)`` is not hashed again by the same process (a
file changed or replaced since is hashed again).
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
}

_VERIFIED: set[tuple[str, int, int, int, int]] = set()
"""(path, inode, size, mtime_ns, ctime_ns) of the shards this process hashed against their
names."""


class ShardCheckFailed(ValueError):
    """A shard's bytes fail the check given to :meth:`MappedShard.open` (the problem)."""


class MappedShard:
    """One safetensors shard mapped read-only into memory; ``tensors`` are views on the map."""

    def __init__(self, path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]):
        self.path = path
        self.tensors = tensors
        self.metadata = metadata

    @classmethod
    def open(cls, path: Path, check=None) -> MappedShard:
        """Map ``path``. ``check(path, buffer)`` returns a problem in words ("" if none); it
        runs the first time this process maps the file (see the module docstring), and a
        problem raises ``ValueError`` naming the shard."""
        stat = path.stat()
        with open(path, "rb") as handle:
            # ACCESS_COPY: a writable (copy-on-write) map, so torch.frombuffer takes it without
            # a warning; nothing here writes to it, and the file is never changed.
            buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        identity = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        if check is not None and identity not in _VERIFIED:
            problem = check(path, buffer)
            if problem:
                raise ShardCheckFailed(problem)
            _VERIFIED.add(identity)
        return cls(path, *_parse(path, buffer))


def _parse(path: Path, buffer: mmap.mmap) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors (views on ``buffer``) and ``__metadata__`` of a safetensors file."""
    if len(buffer) < 8:
        raise ValueError(f"{path}: {len(buffer)} bytes, too short for a safetensors header")
    length = int.from_bytes(buffer[:8], "little")
    if 8 + length > len(buffer):
        raise ValueError(f"{path}: header of {length} bytes runs past the file's end")
    header = json.loads(bytes(buffer[8 : 8 + length]))
    metadata = dict(header.pop("__metadata__", None) or {})
    start = 8 + length
    tensors: dict[str, Tensor] = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor '{name}' has dtype {info['dtype']}, not supported")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=start + begin)
        tensors[name] = flat.view(shape)
    return tensors, metadata


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
        positions = torch.arange(len(self))[index]
        if len(positions) == 0:
            return torch.zeros(0, *self.row_shape)
        return torch.stack([self._one(i) for i in positions.tolist()])

    def zero_rows(self, rows: Tensor) -> MappedRows:
        """The column with the samples where ``rows`` (bool ``[n]``) is True absent (zeros)."""
        shard = torch.where(rows, torch.full_like(self.shard, -1), self.shard)
        return MappedRows(self.views, shard, self.row, self.row_shape)

    def take_rows(self, indices: Tensor) -> MappedRows:
        """The column of the samples ``indices`` (same maps; nothing read)."""
        return MappedRows(self.views, self.shard[indices], self.row[indices], self.row_shape)


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

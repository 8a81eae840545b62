"""The parsed header of a feature shard, read once per process per shard file.

A ``.safetensors`` shard starts with a JSON header: each tensor's dtype, shape and byte range,
and (``__metadata__``) one small JSON record per entry key (``{"row": i, ...}``, or ``{"row":
null, ...}`` for a failure). A site's split names ~2,500 entries in ~40 shards; parsing those
records one ``json.loads`` at a time on every load was most of the cost of loading a site
(~0.06 s warm, once per train and evaluate message). :class:`ShardHeader` is the header
parsed once, the entry records with one ``json.loads`` over all of them, kept per process:

* keyed by the file's **identity** ``(path, inode, size, mtime_ns, ctime_ns)``: shards are
  content-addressed (named by their SHA-256) and never rewritten in place, and a file that is
  changed or replaced since (a new inode, size or time) is a new identity and parsed again;
* it holds only parsed JSON, never a memory map or a file handle, so it keeps no file open
  and no page of a shard resident;
* least-recently used headers are dropped beyond :data:`HEADER_CACHE_BYTES` of header text.

A header is parsed from unverified bytes (as the store's index always was); nothing read from
a shard is *used* before the shard's bytes are hashed against its name
(:meth:`~omnifuse_model.data.features.mapped_rows.MappedShard.verify`).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT_KEY = "__format__"
"""The metadata key that names the shard format (not an entry)."""

HEADER_CACHE_BYTES = 32 * 2**20
"""Header text kept parsed per process (a full-MIMIC federation's shards hold ~10 MB)."""

DTYPES = {
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

ShardIdentity = tuple[str, int, int, int, int]
"""(path, inode, size, mtime_ns, ctime_ns) of a shard file."""


def shard_identity(path: Path, stat: os.stat_result | None = None) -> ShardIdentity:
    """The identity of the file at ``path`` now (``stat`` if already taken)."""
    stat = stat or path.stat()
    return (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


@dataclass(frozen=True)
class TensorLayout:
    """Where one tensor lies in a shard file: bytes ``[begin, end)`` of the whole file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class ShardHeader:
    """A shard's parsed header.

    ``tensors``: name -> layout; ``metadata``: the raw ``__metadata__`` (entry key -> JSON
    record text, and :data:`FORMAT_KEY`); ``rows``: entry key -> its row in every tensor
    (None: a failure record); ``entries``: entry key -> (shard path, JSON record text), the
    shape of :meth:`FeatureStore.index <omnifuse_model.data.features.store.FeatureStore.index>`.
    """

    path: Path
    tensors: dict[str, TensorLayout]
    metadata: dict[str, str]
    rows: dict[str, int | None]
    entries: dict[str, tuple[Path, str]]
    header_bytes: int


def parse_header(path: Path, prefix: bytes, file_size: int) -> ShardHeader:
    """The header of the shard ``path`` of ``file_size`` bytes, from ``prefix`` (its first
    bytes: at least the 8-byte length and the header). Raises ``ValueError`` naming the
    shard when the header is malformed or a tensor's bytes do not fit the file."""
    if len(prefix) < 8:
        raise ValueError(f"{path}: {file_size} bytes, too short for a safetensors header")
    length = int.from_bytes(prefix[:8], "little")
    if 8 + length > file_size or 8 + length > len(prefix):
        raise ValueError(f"{path}: header of {length} bytes runs past the file's end")
    header = json.loads(bytes(prefix[8 : 8 + length]))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is not a JSON object")
    metadata = dict(header.pop("__metadata__", None) or {})
    start = 8 + length
    tensors = {name: _layout(path, name, info, start, file_size) for name, info in header.items()}
    keys = [key for key in metadata if key != FORMAT_KEY]
    records = json.loads("[" + ",".join(metadata[key] for key in keys) + "]") if keys else []
    count = min((t.shape[0] if t.shape else 0 for t in tensors.values()), default=0)
    rows = _rows(path, keys, records, count)
    entries = {key: (path, metadata[key]) for key in keys}
    return ShardHeader(path, tensors, metadata, rows, entries, header_bytes=start)


def _rows(path: Path, keys: list[str], records: list, count: int) -> dict[str, int | None]:
    """Entry key -> row, each row checked to lie within every tensor (``count`` rows)."""
    rows: dict[str, int | None] = {}
    for key, record in zip(keys, records, strict=True):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: the record of entry {key} is not a JSON object")
        row = record.get("row")
        if row is not None and (type(row) is not int or not 0 <= row < count):
            raise ValueError(
                f"{path}: entry {key} has row {row!r}, expected null or an integer in [0, {count})"
            )
        rows[key] = row
    return rows


def _layout(path: Path, name: str, info: dict, start: int, file_size: int) -> TensorLayout:
    dtype = DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise ValueError(f"{path}: tensor '{name}' has dtype {info.get('dtype')}, not supported")
    begin, end = (start + offset for offset in info["data_offsets"])
    shape = tuple(int(size) for size in info["shape"])
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not start <= begin <= end <= file_size or end - begin != expected:
        raise ValueError(
            f"{path}: tensor '{name}' {list(shape)} {info['dtype']} at bytes {begin}..{end} "
            f"does not fit {expected} bytes within the file's {file_size}"
        )
    return TensorLayout(dtype, shape, begin, end)


class _HeaderCache:
    """Least-recently used :class:`ShardHeader` per shard identity, bounded in header bytes
    (safe to use from several threads)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self.headers: OrderedDict[ShardIdentity, ShardHeader] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, identity: ShardIdentity) -> ShardHeader | None:
        with self._lock:
            header = self.headers.get(identity)
            if header is not None:
                self.headers.move_to_end(identity)
            return header

    def put(self, identity: ShardIdentity, header: ShardHeader) -> None:
        with self._lock:
            if identity in self.headers:
                return
            self.headers[identity] = header
            self.held += header.header_bytes
            while self.held > self.capacity and len(self.headers) > 1:
                _, dropped = self.headers.popitem(last=False)
                self.held -= dropped.header_bytes


HEADERS = _HeaderCache(HEADER_CACHE_BYTES)
"""This process's parsed shard headers (see the module docstring)."""


def cached_header(identity: ShardIdentity, read_prefix: Callable[[], bytes]) -> ShardHeader:
    """The header of the shard file of ``identity``: parsed before by this process, or
    parsed now from ``read_prefix()`` (its first bytes) and kept."""
    header = HEADERS.get(identity)
    if header is None:
        path, size = Path(identity[0]), identity[2]
        header = parse_header(path, read_prefix(), size)
        HEADERS.put(identity, header)
    return header


def read_shard_header(path: Path) -> tuple[ShardIdentity, ShardHeader]:
    """The identity of the file at ``path`` and its header (parsed once per identity): reads
    the header bytes only, never the tensors."""
    with open(path, "rb") as handle:
        identity = shard_identity(path, os.fstat(handle.fileno()))

        def prefix() -> bytes:
            head = handle.read(8)
            length = int.from_bytes(head, "little")
            if len(head) < 8 or 8 + length > identity[2]:
                return head  # parse_header names the problem
            return head + handle.read(length)

        return identity, cached_header(identity, prefix)

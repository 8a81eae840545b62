"""Checksums of feature shards: a shard's file name is the SHA-256 of its bytes.

:func:`shard_problem` says why a shard's bytes do not match its name; :func:`verify_shards`
runs it on mapped shards that this process has not verified yet (once per file identity,
:meth:`~omnifuse_model.data.features.mapped_rows.MappedShard.verify`), several at once on
threads: ``hashlib`` releases the GIL while it hashes, so a site's first load in a process
(~100 MB of shards for 800 stays) hashes on every core it may use. Nothing is skipped: every
byte of every shard a load uses is hashed the first time this process maps that file.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omnifuse_model.data.features.mapped_rows import MappedShard, ShardCheckFailed

HASH_THREADS = 8
"""At most this many shards are hashed at once (and never more than the CPUs)."""


class CorruptShardError(OSError):
    """A feature shard whose bytes do not match its SHA-256 name, or that cannot be parsed."""


def shard_problem(shard: Path, data: bytes | memoryview | mmap.mmap) -> str:
    """Why ``data`` (the bytes of ``shard``) is not a valid shard, in words ("" when it is)."""
    digest = hashlib.sha256(data).hexdigest()
    if shard.stem != digest:
        if len(shard.stem) != 64:
            return "its name is not a SHA-256 (written before shards carried checksums)"
        return f"its bytes hash to sha256 {digest[:16]}..., not to its name (corrupted)"
    return ""


def _problem(shard: MappedShard) -> str:
    try:
        shard.verify(shard_problem)
    except ShardCheckFailed as problem:
        return str(problem)
    return ""


def verify_shards(shards: Sequence[MappedShard]) -> list[str]:
    """The checksum problem of each of ``shards`` ("" when it passes now or passed before in
    this process); the unverified ones are hashed on up to :data:`HASH_THREADS` threads."""
    pending = [shard for shard in shards if not shard.verified]
    workers = min(len(pending), HASH_THREADS, os.cpu_count() or 1)
    if workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="shard-sha256") as pool:
            found = dict(zip(map(id, pending), pool.map(_problem, pending), strict=True))
    else:
        found = {id(shard): _problem(shard) for shard in pending}
    return [found.get(id(shard), "") for shard in shards]

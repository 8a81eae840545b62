"""Content-addressed, sharded on-disk store of frozen-backbone features (safetensors).

Layout under a site's ``cache_dir``::

    features/<modality>/<shard>.safetensors

A shard holds the entries of one computed batch: one stacked tensor per field
(``features [n, 512]`` for ``cxr``; ``states [n, T, H]`` float16 and ``mask [n, T]`` bool for
``rep``; ``ehr [n, bins, 76]`` for ``ehr``) and, in the safetensors header metadata, one JSON
record per entry key: ``{"row": i, ...}`` for an entry with tensors, ``{"row": null,
"reason": ..., "detail": ...}`` for an input that could not be computed (e.g. an image that
fails to decode), so a failure is remembered too and not retried on every run. Shards, not one
file per item, keep writes and file counts small (one write per batch) while an interrupted
run still loses at most the batches in flight.

Entry keys (:func:`entry_key`) hash :data:`PREPROCESSING_VERSION`, the modality, the
producer's identity (backbone identity, or the discretiser settings) and the sha256 of the
input's content, so any change of backbone, preprocessing code or content gives a new key,
and identical content is computed once. Old entries are never overwritten or deleted.

Checksums: a shard's file name is the SHA-256 of its bytes (``<sha256>.safetensors``, as
git names objects), so no separate checksum list can go out of step with the shards. A shard is
written to a temporary file and renamed into place (``os.replace``, atomic on POSIX), so it is
either complete or absent; but files are not fsync-ed (for speed), and disks and copies fail,
so bytes are checked against the name:

* :meth:`FeatureStore.verify` (``prepare`` calls it under the lock, before anything is looked
  up) hashes every shard; one whose bytes do not match its name (random bytes, truncation,
  a shard of an older format without a checksum) is moved aside to ``<name>.corrupt``,
  reported, and its entries are computed again: never read, never a cache hit;
* :meth:`FeatureStore.load` and :meth:`FeatureStore.mapped_columns` hash each shard they map
  (the first time this process maps that file identity; several on threads,
  :mod:`~omnifuse_model.data.features.shard_checks`) and raise :class:`CorruptShardError`,
  naming the shard and saying to re-run ``omnifuse prepare``, on a mismatch.

Reading is cheap after the first time in a process: each shard's header (the entries' records)
is parsed once per file identity (:mod:`~omnifuse_model.data.features.shard_header`), so
listing a store is a directory scan and a ``stat`` per shard; :meth:`mapped_columns` gathers a
split's rows with one index per shard, not one Python step per entry.

One process at a time may write a store (:meth:`lock`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor

from omnifuse_model.data.features.mapped_rows import MappedRows, MappedShard
from omnifuse_model.data.features.shard_checks import (
    CorruptShardError,
    shard_problem,
    verify_shards,
)
from omnifuse_model.data.features.shard_header import FORMAT_KEY, read_shard_header

logger = logging.getLogger(__name__)

PREPROCESSING_VERSION = "omnifuse-prep-1"
"""Bump when reading, linking, image/text preprocessing or discretisation changes meaning:
every cache key changes with it."""

FEATURES_DIR = "features"
_FORMAT_KEY = FORMAT_KEY
_FORMAT = "omnifuse-feature-shard-v2"
_SHARD_CACHE_SIZE = 64
"""Shards a store keeps mapped (a load_cached_splits call: a site's shards, for all its splits)."""
_CORRUPT_SUFFIX = ".corrupt"
_FIX = "run `omnifuse prepare` for this site again to recompute it"


def entry_key(modality: str, identity: str, content_digest: str) -> str:
    """The cache key of one input: sha256 over version, modality, producer and content."""
    text = "\0".join((PREPROCESSING_VERSION, modality, identity, content_digest))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def text_sha256(text: str) -> str:
    """sha256 hex digest of a text's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class ModalityStats:
    """Distinct inputs of one modality in one preparation run: ``items = hits + misses``;
    ``failed`` of them could not be computed (remembered or new); ``seconds`` spent."""

    items: int = 0
    hits: int = 0
    misses: int = 0
    failed: int = 0
    seconds: float = 0.0


class CacheLockedError(RuntimeError):
    """Another process holds the feature store's write lock."""


class FailureRecordError(ValueError):
    """An entry asked for as data is a remembered failure (it has no tensors)."""

    def __init__(self, folder: Path, key: str) -> None:
        super().__init__(f"{folder}: entry {key} is a failure record")
        self.key = key


@dataclass(frozen=True)
class StoredEntry:
    """One cached entry: its fields (one row each, e.g. ``features [512]``) and its record."""

    tensors: dict[str, Tensor]
    record: dict[str, Any]

    @property
    def failed(self) -> bool:
        """True for a remembered failure (no tensors)."""
        return self.record.get("row") is None


class FeatureStore:
    """The sharded store of one cache directory (see the module docstring)."""

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self.root = Path(cache_dir)
        self._index: dict[str, dict[str, tuple[Path, str]]] = {}
        self._shards: OrderedDict[Path, tuple[dict[str, Tensor], dict[str, str]]] = OrderedDict()
        self._skipped: dict[str, dict[Path, str]] = {}

    def folder(self, modality: str) -> Path:
        """``<cache_dir>/features/<modality>``."""
        return self.root / FEATURES_DIR / modality

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store's write lock; removes temporary files left by interrupted runs."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".lock"
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CacheLockedError(
                    f"{self.root}: another process is preparing this feature cache ({path})"
                ) from None
            try:
                for pattern in (".*.tmp", f"{FEATURES_DIR}/*/.*.tmp"):
                    for stale in self.root.glob(pattern):
                        stale.unlink(missing_ok=True)
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def index(self, modality: str) -> dict[str, tuple[Path, str]]:
        """Entry key -> (shard path, JSON record) of every readable shard of ``modality``.

        A shard's header is parsed once per process per file identity
        (:mod:`~omnifuse_model.data.features.shard_header`); here each shard file is only
        listed and stat-ed."""
        if modality not in self._index:
            found: dict[str, tuple[Path, str]] = {}
            skipped: dict[Path, str] = {}
            for shard in self._shard_files(modality):
                try:
                    _, header = read_shard_header(shard)
                except Exception as error:  # OSError, or a malformed header (ValueError, ...)
                    logger.warning("%s: unreadable feature shard skipped: %s", shard, error)
                    skipped[shard] = f"unreadable: {error}"
                    continue
                if header.metadata.get(_FORMAT_KEY) != _FORMAT:
                    logger.warning("%s: not an %s shard, skipped", shard, _FORMAT)
                    skipped[shard] = f"not an {_FORMAT} shard"
                    continue
                found.update(header.entries)
            self._index[modality] = found
            self._skipped[modality] = skipped
        return self._index[modality]

    def _shard_files(self, modality: str) -> list[Path]:
        """The ``*.safetensors`` files of ``modality``'s folder, sorted by name."""
        folder = self.folder(modality)
        try:
            with os.scandir(folder) as entries:
                names = sorted(e.name for e in entries if e.name.endswith(".safetensors"))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [folder / name for name in names]

    def verify(self, modality: str) -> dict[str, str]:
        """Hash every shard of ``modality``; move a mismatching one aside (``<name>.corrupt``,
        so its entries are computed again) and return ``{shard name: problem}``. Call it
        while holding :meth:`lock`."""
        bad: dict[str, str] = {}
        for shard in sorted(self.folder(modality).glob("*.safetensors")):
            try:
                problem = shard_problem(shard, shard.read_bytes())
            except OSError as error:
                problem = f"cannot be read: {error}"
            if problem:
                bad[shard.name] = problem
                logger.warning(
                    "%s: feature shard fails its checksum, moved aside (%s.corrupt) and its "
                    "entries recomputed: %s",
                    shard,
                    shard.name,
                    problem,
                )
                os.replace(shard, shard.with_name(shard.name + _CORRUPT_SUFFIX))
                self._shards.pop(shard, None)
        if bad:
            self._index.pop(modality, None)
        return bad

    def __contains__(self, item: tuple[str, str]) -> bool:
        modality, key = item
        return key in self.index(modality)

    def record(self, modality: str, key: str) -> dict[str, Any] | None:
        """The JSON record of an entry (``row``, and ``reason``/``detail`` for failures)."""
        found = self.index(modality).get(key)
        return None if found is None else json.loads(found[1])

    def write(
        self,
        modality: str,
        fields: Mapping[str, Tensor],
        records: Mapping[str, Mapping[str, Any]],
    ) -> Path | None:
        """Write one shard atomically: ``fields`` name -> ``[n, ...]`` tensors whose row
        ``records[key]["row"]`` belongs to ``key`` (``row`` None: a failure, no tensors)."""
        if not records:
            return None
        sizes = {len(t) for t in fields.values()} or {0}
        rows = [r["row"] for r in records.values() if r.get("row") is not None]
        if (
            len(sizes) != 1
            or len(set(rows)) != len(rows)
            or not set(rows) <= set(range(min(sizes)))
        ):
            raise ValueError(
                f"{modality}: shard fields hold {sorted(sizes)} rows, records use rows {rows}"
            )
        folder = self.folder(modality)
        folder.mkdir(parents=True, exist_ok=True)
        metadata = {key: json.dumps(dict(record)) for key, record in records.items()}
        metadata[_FORMAT_KEY] = _FORMAT
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in fields.items() if len(v)}
        data = save_safetensors(tensors, metadata=metadata)
        name = hashlib.sha256(data).hexdigest()
        final = folder / f"{name}.safetensors"
        temporary = folder / f".{name}.{os.getpid()}.tmp"
        temporary.write_bytes(data)
        os.replace(temporary, final)
        index = self.index(modality)
        for key in records:
            index[key] = (final, metadata[key])
        self._shards.pop(final, None)
        return final

    def _mapped(self, shard: Path) -> MappedShard:
        """``shard`` mapped (tensors are zero-copy views: rows are read when used), not yet
        verified; a few recently used ones are kept by this store."""
        if shard in self._shards:
            self._shards.move_to_end(shard)
            return self._shards[shard]
        try:
            mapped = MappedShard.map(shard)
        except OSError as error:
            raise CorruptShardError(
                f"{shard}: cannot read feature shard: {error}; {_FIX}"
            ) from error
        except Exception as error:  # a bad header: JSON, offsets, dtype
            raise CorruptShardError(f"{shard}: cannot parse feature shard: {error}; {_FIX}") from (
                error
            )
        self._shards[shard] = mapped
        while len(self._shards) > _SHARD_CACHE_SIZE:
            self._shards.popitem(last=False)
        return mapped

    def _load_shards(self, paths: Sequence[Path]) -> list[MappedShard]:
        """The shards mapped, each hashed against its name the first time this process maps
        that file (:mod:`~omnifuse_model.data.features.mapped_rows`); several new ones are
        hashed on threads. Raises :class:`CorruptShardError` naming the first shard (in
        ``paths`` order) that cannot be read or fails its checksum."""
        shards = [self._mapped(path) for path in paths]
        for shard, problem in zip(shards, verify_shards(shards), strict=True):
            if problem:
                self._shards.pop(shard.path, None)
                raise CorruptShardError(
                    f"{shard.path}: feature shard fails its checksum: {problem}; {_FIX}"
                )
        return shards

    def _by_shard(self, modality: str, keys: Sequence[str | None]) -> dict[Path, list[str]]:
        """The distinct ``keys`` (None skipped) grouped by the shard holding them, shards in
        order of first use. Raises like :meth:`load` for a key that is not cached."""
        index = self.index(modality)
        by_shard: dict[Path, list[str]] = {}
        for key in dict.fromkeys(keys):
            if key is None:
                continue
            if key not in index and self._skipped.get(modality):
                names = "; ".join(f"{p} ({why})" for p, why in self._skipped[modality].items())
                raise CorruptShardError(
                    f"{self.folder(modality)}: no cached entry {key}, and feature shard(s) "
                    f"cannot be read: {names}; run `omnifuse prepare` for this site again to "
                    "recompute them"
                )
            if key not in index:
                raise KeyError(f"{self.folder(modality)}: no cached entry {key}")
            by_shard.setdefault(index[key][0], []).append(key)
        return by_shard

    def mapped_columns(
        self, modality: str, fields: Sequence[str], keys: Sequence[str | None]
    ) -> dict[str, MappedRows]:
        """``fields`` of the entries ``keys`` (None: absent, zeros) as lazily read columns.

        Raises like :meth:`load`, :class:`FailureRecordError` (a ``ValueError``) for a key
        whose entry is a failure record, and ``ValueError`` when the shards hold rows of
        different shapes."""
        by_shard = self._by_shard(modality, keys)
        shards = self._load_shards(list(by_shard))
        slot = {key: position for position, group in enumerate(by_shard.values()) for key in group}
        rows_of = [shard.rows for shard in shards]
        slots: list[int] = []
        rows: list[int] = []
        for key in keys:
            if key is None:
                slots.append(-1)
                rows.append(0)
                continue
            position = slot[key]
            row = rows_of[position].get(key, -1)
            if row is None:
                raise FailureRecordError(self.folder(modality), key)
            if row < 0:  # the file changed between listing and mapping
                raise KeyError(f"{shards[position].path}: no cached entry {key}")
            slots.append(position)
            rows.append(row)
        shard_of = torch.tensor(slots, dtype=torch.int64)
        row_of = torch.tensor(rows, dtype=torch.int64)
        return {field: self._column(modality, field, shards, shard_of, row_of) for field in fields}

    def _column(
        self, modality: str, field: str, shards: list[MappedShard], shard: Tensor, row: Tensor
    ) -> MappedRows:
        views = [mapped.tensors[field] for mapped in shards]
        shapes = {tuple(view.shape[1:]) for view in views}
        if len(shapes) > 1:
            found = {m.path.name: tuple(v.shape[1:]) for m, v in zip(shards, views, strict=True)}
            raise ValueError(
                f"{self.folder(modality)}: shards hold {field} rows of different shapes {found}"
            )
        return MappedRows(views, shard, row, shapes.pop() if shapes else ())

    def mapped_rows(self, modality: str, field: str, keys: Sequence[str | None]) -> MappedRows:
        """``field`` of the entries ``keys`` (None: absent, zeros) as a lazily read column
        (see :meth:`mapped_columns`)."""
        return self.mapped_columns(modality, [field], keys)[field]

    def load(self, modality: str, keys: Sequence[str]) -> dict[str, StoredEntry]:
        """The entries of ``keys`` (each shard read once), checksums verified.

        Raises :class:`CorruptShardError` naming the shard when a shard fails its checksum, or
        when a key is missing while unreadable shards (which may have held it) are present;
        ``KeyError`` naming a key that is simply not cached.
        """
        by_shard = self._by_shard(modality, keys)
        shards = self._load_shards(list(by_shard))
        entries: dict[str, StoredEntry] = {}
        for shard, wanted in zip(shards, by_shard.values(), strict=True):
            for key in wanted:
                record = json.loads(shard.metadata[key])
                row = record.get("row")
                tensors = shard.tensors
                fields = {} if row is None else {name: t[row] for name, t in tensors.items()}
                entries[key] = StoredEntry(fields, record)
        return entries

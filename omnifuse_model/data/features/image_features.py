"""The ``cxr`` pass of feature preparation: images -> frozen trunk features, overlapped.

Images are hashed and decoded (:func:`~omnifuse_model.data.cxr.images.load_cxr_image`) in
``torch.utils.data.DataLoader`` workers; an image whose key is already cached is recognised in
the worker and not decoded. The main thread runs the trunk under ``torch.inference_mode()``;
batch k+1 is launched on the device before batch k's features are copied back, and each batch
becomes one shard written by a background thread. A decode failure is cached as a failure
record and turned into a counted rejection of that stay's ``cxr``.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.progress import Progress
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from omnifuse_model.data.cxr.images import IMAGE_SIZE, ImageReadError, load_cxr_image
from omnifuse_model.data.features.store import FeatureStore, ModalityStats, entry_key
from omnifuse_model.data.ingest import IngestResult, file_sha256


class ImageBackbone(Protocol):
    """A frozen image trunk: ``[B, 3, 224, 224]`` -> ``[B, F]``, named by ``identity``."""

    identity: str

    def __call__(self, images: Tensor) -> Tensor: ...


def image_identity(backbone: ImageBackbone) -> str:
    """The producer identity of ``cxr`` keys: the trunk's identity and the input size."""
    return f"{backbone.identity}:img{IMAGE_SIZE}"


class _ImageFiles(Dataset):
    """Item i: (i, key, image [3, 224, 224] or None, status, detail); status '' = decoded,
    'hit' = already cached, else an image rejection reason."""

    def __init__(self, paths: Sequence[str], identity: str, known: frozenset[str]) -> None:
        self.paths, self.identity, self.known = list(paths), identity, known

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, str, Tensor | None, str, str]:
        path = self.paths[index]
        try:
            key = entry_key("cxr", self.identity, file_sha256(Path(path)))
        except FileNotFoundError:
            return index, "", None, "missing_image", f"{path}: no such file"
        except OSError as error:
            return index, "", None, "unreadable_image", f"{path}: {error}"
        if key in self.known:
            return index, key, None, "hit", ""
        try:
            return index, key, load_cxr_image(path), "", ""
        except ImageReadError as error:
            return index, key, None, error.reason, error.detail


def _collate_images(items: list[tuple]) -> tuple[list[tuple], Tensor | None]:
    images = [item[2] for item in items if item[2] is not None]
    meta = [(i, key, status, detail) for i, key, _, status, detail in items]
    return meta, (torch.stack(images) if images else None)


class _ImagePass:
    """Runs the image backbone over the decoded misses; writes one shard per batch."""

    def __init__(self, store: FeatureStore, backbone: ImageBackbone, device: torch.device) -> None:
        self.store, self.backbone, self.device = store, backbone, device
        self.writer = ThreadPoolExecutor(max_workers=1)
        self.writes: list[Future] = []
        self.pending: tuple[Tensor, dict[str, dict[str, Any]]] | None = None

    def submit(self, images: Tensor | None, keys: list[str], failures: dict) -> None:
        features = None
        if images is not None:
            with torch.inference_mode():
                features = self.backbone(images.to(self.device, non_blocking=True))
        self.finish()  # batch k is copied back while batch k+1 runs on the device
        records: dict[str, dict[str, Any]] = dict(failures)
        for row, key in enumerate(keys):  # identical content at two paths: keep the first
            records.setdefault(key, {"row": row})
        self.pending = (features, records)

    def finish(self) -> None:
        if self.pending is not None:
            features, records = self.pending
            self.pending = None
            fields = {} if features is None else {"features": features.float().cpu()}
            self.writes.append(self.writer.submit(self.store.write, "cxr", fields, records))
            done = [w for w in self.writes if w.done()]
            for write in done:
                write.result()
                self.writes.remove(write)

    def close(self) -> None:
        try:
            self.finish()
        finally:
            self.writer.shutdown(wait=True)
            for write in self.writes:
                write.result()


def prepare_images(
    store: FeatureStore,
    result: IngestResult,
    backbone: ImageBackbone,
    device: torch.device,
    loader_options: dict[str, Any],
    stats: ModalityStats,
    progress: Progress,
) -> dict[str, str]:
    """Features of every linked image; decode failures become rejections in ``result``."""
    stays = [s for s in result.stays if s.image_path is not None]
    paths = list(dict.fromkeys(str(s.image_path) for s in stays))
    identity = image_identity(backbone)
    known = frozenset(store.index("cxr"))
    dataset = _ImageFiles(paths, identity, known)
    loader = DataLoader(dataset, collate_fn=_collate_images, **loader_options)
    outcome: dict[str, tuple[str, str, str]] = {}  # path -> (key, reason, detail)
    bar = progress.add_task("cxr features", total=len(paths))
    batches = iter(loader)  # start (fork) the workers before the writer thread exists
    runner = _ImagePass(store, backbone, device)
    try:
        for meta, images in batches:
            keys, failures = [], {}
            for index, key, status, detail in meta:
                path = paths[index]
                stats.items += 1
                if status == "hit":
                    stats.hits += 1
                    record = store.record("cxr", key) or {}
                    outcome[path] = (key, record.get("reason", ""), record.get("detail", ""))
                else:
                    stats.misses += 1
                    outcome[path] = (key, status, detail)
                    if status == "":
                        keys.append(key)
                    elif key:
                        failures[key] = {"row": None, "reason": status, "detail": detail}
                stats.failed += bool(outcome[path][1])
            if keys or failures:
                runner.submit(images, keys, failures)
            progress.advance(bar, len(meta))
    finally:
        runner.close()
    for stay in stays:
        key, reason, detail = outcome[str(stay.image_path)]
        if reason:
            result.reject_modality(stay, "cxr", reason, detail)
    return {path: key for path, (key, reason, _) in outcome.items() if not reason}

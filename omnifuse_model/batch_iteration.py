"""Batches of a dataset for the training and evaluation loops."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from omnifuse_model.batch import Batch, InMemoryMultimodalDataset, collate_samples


def iterate_batches(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
) -> Iterator[Batch]:
    """Batches of a dataset; in-memory datasets are sliced directly (no per-sample Python)."""
    if isinstance(dataset, InMemoryMultimodalDataset):
        n = len(dataset)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            # In order: slices are views (no copy of the ~100 MB of token states per batch).
            index = rows if shuffle else slice(start, start + batch_size)
            yield Batch(
                inputs={k: v[index] for k, v in dataset.inputs.items()},
                masks={k: v[index] for k, v in dataset.masks.items()},
                availability=dataset.availability[index],
                labels=dataset.labels[index],
                sample_ids=[dataset.sample_ids[i] for i in rows.tolist()],
            )
        return
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        collate_fn=collate_samples,
    )
    yield from loader

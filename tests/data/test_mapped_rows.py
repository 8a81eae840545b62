"""Token states read lazily from memory-mapped shards (omnifuse_model.data.features.mapped_rows)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omnifuse_model.batch import InMemoryMultimodalDataset
from omnifuse_model.data.features.mapped_rows import MappedRows, MappedShard
from omnifuse_model.data.features.store import CorruptShardError, FeatureStore
from omnifuse_model.training import iterate_batches


def _write_two_shards(root: Path) -> tuple[FeatureStore, dict[str, torch.Tensor]]:
    store = FeatureStore(root)
    generator = torch.Generator().manual_seed(0)
    expected = {}
    for shard in range(2):
        states = torch.randn(3, 4, 5, generator=generator).to(torch.float16)
        mask = torch.rand(3, 4, generator=generator) > 0.5
        records = {f"k{shard}{row}": {"row": row} for row in range(3)}
        records[f"failed{shard}"] = {"row": None, "reason": "unreadable"}
        store.write("rep", {"states": states, "mask": mask}, records)
        for row in range(3):
            expected[f"k{shard}{row}"] = states[row].float()
    return FeatureStore(root), expected


def test_rows_are_read_from_the_maps_in_any_order(tmp_path: Path) -> None:
    store, expected = _write_two_shards(tmp_path)
    keys = ["k12", None, "k00", "k10", "k01"]
    column = store.mapped_rows("rep", "states", keys)
    assert isinstance(column, MappedRows) and len(column.views) == 2
    assert column.shape == (5, 4, 5) and column.dtype == torch.float32 and column.dim() == 3
    torch.testing.assert_close(column[0], expected["k12"])
    assert not column[1].any()
    batch = column[torch.tensor([4, 2, 1])]
    assert batch.dtype == torch.float32
    torch.testing.assert_close(batch[0], expected["k01"])
    torch.testing.assert_close(batch[1], expected["k00"])
    assert not batch[2].any()
    torch.testing.assert_close(column[2:4][1], expected["k10"])
    subset = column.take_rows(torch.tensor([3, 0]))
    assert isinstance(subset, MappedRows) and subset.views is not column.views
    torch.testing.assert_close(subset[0], expected["k10"])
    with pytest.raises(ValueError, match="failure record"):
        store.mapped_rows("rep", "states", ["k00", "failed1"])


def test_a_dataset_with_a_mapped_column_batches_and_subsets_lazily(tmp_path: Path) -> None:
    store, expected = _write_two_shards(tmp_path)
    keys = ["k00", "k11", "k02", None]
    column = store.mapped_rows("rep", "states", keys)
    availability = torch.tensor([[True], [True], [True], [False]])
    data = InMemoryMultimodalDataset({"rep": column}, availability, torch.zeros(4, 1))
    kept = data.subset(torch.tensor([0, 1, 2]))
    assert isinstance(kept.inputs["rep"], MappedRows)
    batches = list(iterate_batches(kept, batch_size=2))
    assert [len(b) for b in batches] == [2, 1]
    torch.testing.assert_close(batches[0].inputs["rep"][1], expected["k11"])
    torch.testing.assert_close(batches[1].inputs["rep"][0], expected["k02"])
    shuffled = list(iterate_batches(kept, 3, shuffle=True, generator=torch.Generator()))
    by_id = dict(zip(shuffled[0].sample_ids, shuffled[0].inputs["rep"], strict=True))
    torch.testing.assert_close(by_id["1"], expected["k11"])
    torch.testing.assert_close(kept[2]["inputs"]["rep"], expected["k02"])


def test_a_shard_changed_after_it_was_verified_is_hashed_again(tmp_path: Path) -> None:
    store, _ = _write_two_shards(tmp_path)
    store.mapped_rows("rep", "states", ["k00"])
    shard = store.index("rep")["k00"][0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=rf"{shard.name}.*fails its checksum.*prepare"):
        FeatureStore(tmp_path).mapped_rows("rep", "states", ["k00"])


def test_a_mapped_shard_parses_every_stored_dtype(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path)
    fields = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([[True, False], [False, True]]),
        "c": torch.arange(4, dtype=torch.int64).reshape(2, 2),
    }
    path = store.write("x", fields, {"k0": {"row": 0}, "k1": {"row": 1}})
    mapped = MappedShard.open(path)
    for name, tensor in fields.items():
        assert torch.equal(mapped.tensors[name], tensor)
    assert set(mapped.metadata) == {"k0", "k1", "__format__"}


def test_concat_columns_keeps_rows_in_order_across_maps_and_tensors():
    """Pooling sites: a mapped column, a plain tensor and an absent row concatenate lazily
    and read back exactly the rows of each part, in order (absent rows as zeros)."""
    from omnifuse_model.data.features.mapped_rows import MappedRows, concat_columns

    view_a = torch.arange(12, dtype=torch.float16).reshape(3, 2, 2)
    view_b = torch.arange(100, 108, dtype=torch.float16).reshape(2, 2, 2)
    mapped = MappedRows([view_a, view_b], torch.tensor([1, -1, 0]), torch.tensor([1, 0, 2]), (2, 2))
    plain = torch.full((2, 2, 2), 7.0)
    pooled = concat_columns([mapped, plain, mapped.take_rows(torch.tensor([0]))])
    assert isinstance(pooled, MappedRows) and pooled.shape == (6, 2, 2)
    expected = torch.cat([mapped[:], plain, view_b[1:2].float()])
    assert torch.equal(pooled[:], expected)
    assert torch.equal(pooled[1], torch.zeros(2, 2))
    assert torch.equal(concat_columns([plain, plain]), torch.cat([plain, plain]))
    with pytest.raises(ValueError, match="rows"):
        concat_columns([mapped, torch.zeros(1, 3)])


def test_zero_absent_hides_rows_of_mapped_and_plain_columns_alike():
    """Masking modalities at a rate (experiments) or outside a site: hidden rows read as zeros,
    the others unchanged, a mapped column stays lazy, and the original is not changed."""
    from omnifuse_model.batch import zero_absent
    from omnifuse_model.data.features.mapped_rows import MappedRows

    view = torch.arange(12, dtype=torch.float16).reshape(3, 2, 2)
    mapped = MappedRows([view], torch.tensor([0, 0, -1]), torch.tensor([2, 0, 0]), (2, 2))
    keep = torch.tensor([False, True, True])
    hidden = zero_absent(mapped, keep)
    assert isinstance(hidden, MappedRows)
    assert torch.equal(
        hidden[:], torch.stack([torch.zeros(2, 2), view[0].float(), torch.zeros(2, 2)])
    )
    assert torch.equal(mapped[0], view[2].float())  # the original column is untouched
    plain = mapped[:]
    assert torch.equal(zero_absent(plain, keep), hidden[:])

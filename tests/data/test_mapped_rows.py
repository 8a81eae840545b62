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


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Count the shards hashed and the headers parsed from now on (by file name)."""
    from omnifuse_model.data.features import shard_checks, shard_header

    seen: dict[str, list[str]] = {"hashed": [], "parsed": []}
    hash_shard, parse = shard_checks.shard_problem, shard_header.parse_header

    def counted_hash(shard, data):
        seen["hashed"].append(shard.name)
        return hash_shard(shard, data)

    def counted_parse(path, prefix, size):
        seen["parsed"].append(path.name)
        return parse(path, prefix, size)

    monkeypatch.setattr(shard_checks, "shard_problem", counted_hash)
    monkeypatch.setattr(shard_header, "parse_header", counted_parse)
    return seen


def test_headers_are_parsed_and_shards_hashed_once_per_file(tmp_path, monkeypatch) -> None:
    """A new store over the same files (each load makes one) stats the shards and parses
    nothing again; a shard file replaced by a copy of itself (a new inode) is parsed and
    hashed again, the other shard is not."""
    _write_two_shards(tmp_path)
    seen = _counting(monkeypatch)
    keys = ["k00", "k01", "k10", "k11"]
    first = FeatureStore(tmp_path).mapped_rows("rep", "states", keys)
    names = sorted(path.name for path in (tmp_path / "features" / "rep").glob("*.safetensors"))
    assert sorted(seen["hashed"]) == names  # (headers: parsed when written, in this process)
    seen["parsed"].clear(), seen["hashed"].clear()
    again = FeatureStore(tmp_path).mapped_rows("rep", "states", keys)
    assert seen == {"hashed": [], "parsed": []}
    assert torch.equal(first[:], again[:])

    shard = FeatureStore(tmp_path).index("rep")["k10"][0]
    copy = shard.with_name(".copy.tmp")
    copy.write_bytes(shard.read_bytes())
    copy.replace(shard)  # same name and bytes, a new file
    replaced = FeatureStore(tmp_path).mapped_rows("rep", "states", keys)
    assert seen == {"hashed": [shard.name], "parsed": [shard.name]}
    assert torch.equal(replaced[:], first[:])


def test_a_replaced_shard_is_indexed_anew_and_refused_when_its_bytes_are_not_its_name(
    tmp_path: Path,
) -> None:
    """The per-process header cache follows the file: a shard replaced by another shard's
    bytes (its records list other entries) is listed with its new entries at once, and
    loading from it fails the checksum naming it; nothing stale is served."""
    _write_two_shards(tmp_path)
    store = FeatureStore(tmp_path)
    store.mapped_rows("rep", "states", ["k00", "k10"])
    first, second = store.index("rep")["k00"][0], store.index("rep")["k10"][0]
    impostor = first.with_name(".impostor.tmp")
    impostor.write_bytes(second.read_bytes())
    impostor.replace(first)  # `first` now holds the records of k1*, under k0*'s hash name
    second.unlink()
    index = FeatureStore(tmp_path).index("rep")
    assert "k00" not in index and index["k10"][0] == first
    with pytest.raises(KeyError, match="no cached entry k00"):
        FeatureStore(tmp_path).mapped_rows("rep", "states", ["k00"])
    with pytest.raises(CorruptShardError, match=rf"{first.name}: feature shard fails its checksum"):
        FeatureStore(tmp_path).mapped_rows("rep", "states", ["k10"])


def test_reading_rows_gathers_per_shard_in_any_dtype() -> None:
    """``read``: rows in the asked order from several views, absent rows zero, in the asked
    dtype (float16 -> float32 cast, bool kept, bfloat16 through torch); the same as row by row."""
    generator = torch.Generator().manual_seed(3)
    half = [torch.randn(4, 2, 3, generator=generator).to(torch.float16) for _ in range(3)]
    shard = torch.tensor([2, -1, 0, 2, 1, -1, 0])
    row = torch.tensor([3, 0, 1, 0, 2, 0, 1])
    column = MappedRows(half, shard, row, (2, 3))
    expected = torch.stack([column._one(i) for i in range(len(column))])
    assert torch.equal(column.read(), expected) and torch.equal(column[:], expected)
    assert torch.equal(column[torch.tensor([6, 1, 0])], expected[[6, 1, 0]])
    assert column.read(torch.tensor([], dtype=torch.int64)).shape == (0, 2, 3)
    masks = MappedRows([h > 0 for h in half], shard, row, (2, 3))
    read = masks.read(dtype=torch.bool)
    assert read.dtype == torch.bool and torch.equal(read, expected > 0)
    brain = MappedRows([h.to(torch.bfloat16) for h in half], shard, row, (2, 3))
    assert torch.equal(brain.read(), torch.stack([brain._one(i) for i in range(len(brain))]))

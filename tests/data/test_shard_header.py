"""Shard headers parsed once per process (omnifuse_model.data.features.shard_header)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from omnifuse_model.data.features.shard_header import (
    FORMAT_KEY,
    _HeaderCache,
    parse_header,
    read_shard_header,
)


def _shard(records: dict[str, dict], rows: int = 3) -> bytes:
    metadata = {key: json.dumps(record) for key, record in records.items()}
    metadata[FORMAT_KEY] = "test-format"
    return save({"x": torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2)}, metadata)


def test_the_records_are_parsed_into_rows_and_entries(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(_shard({"k0": {"row": 2}, "bad": {"row": None, "reason": "unreadable"}}))
    identity, header = read_shard_header(path)
    assert identity[0] == str(path) and identity[2] == path.stat().st_size
    assert header.rows == {"k0": 2, "bad": None}
    assert header.entries == {"k0": (path, '{"row": 2}'), "bad": (path, header.metadata["bad"])}
    layout = header.tensors["x"]
    assert (layout.dtype, layout.shape, layout.end - layout.begin) == (torch.float32, (3, 2), 24)
    assert read_shard_header(path)[1] is header  # the same file: parsed once


@pytest.mark.parametrize(
    "records, problem",
    [
        ({"k0": {"row": 3}}, "row 3, expected null or an integer in"),
        ({"k0": {"row": "1"}}, "row '1'"),
        ({"k0": [1]}, "not a JSON object"),
    ],
)
def test_a_record_that_does_not_fit_the_tensors_is_refused(records, problem) -> None:
    data = _shard(records)
    with pytest.raises(ValueError, match=problem):
        parse_header(Path("s.safetensors"), data, len(data))


def test_tensor_bytes_past_the_end_of_the_file_are_refused() -> None:
    data = _shard({"k0": {"row": 0}})
    with pytest.raises(ValueError, match="does not fit"):
        parse_header(Path("s.safetensors"), data, len(data) - 4)
    with pytest.raises(ValueError, match="too short"):
        parse_header(Path("s.safetensors"), data[:5], 5)


def test_the_cache_drops_the_least_recently_used_beyond_its_bytes(tmp_path: Path) -> None:
    paths = []
    for index in range(3):
        paths.append(tmp_path / f"{index}.safetensors")
        paths[-1].write_bytes(_shard({f"k{index}": {"row": 0}}))
    cache = _HeaderCache(capacity=1)  # smaller than one header: keeps only the newest
    for path in paths:
        data = path.read_bytes()
        cache.put((str(path), 0, 0, 0, 0), parse_header(path, data, len(data)))
    assert list(cache.headers) == [(str(paths[2]), 0, 0, 0, 0)]
    assert cache.held == cache.headers[(str(paths[2]), 0, 0, 0, 0)].header_bytes

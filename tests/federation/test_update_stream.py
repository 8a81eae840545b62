"""The streamed pass over a round's updates (``server.update_stream``) and the records it
feeds (``server.array_records``).

- FedAvg from the stream is bit-equal to ``server.aggregation.aggregate_states`` on the
  decoded rows, for every pattern of held modalities of three sites, with and without 16-bit
  deltas, for any chunk size and thread count;
- a hand-computed two-site example; a group nobody took part in keeps the master;
- norms equal the float64 norms of the decoded updates; the 16-bit rounding of the aggregate
  equals ``encode16``;
- the float32 record is byte for byte what Flower's ``Array(ndarray)`` makes.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from omnifuse_model import federation_schema as wire
from omnifuse_model.wire_format import RAW_STYPE, decode16, encode16
from server.aggregation import aggregate_states, fedavg_weights
from server.array_records import float32_record, raw16_record
from server.update_rows import SiteUpdate, UpdateLayout
from server.update_stream import stream_updates

NAMES = ["ehr", "cxr", "rep"]
SHAPES = {
    "forward_cra.w": (5, 7),
    "encoders.encoders.ehr.w": (3, 4),
    "encoders.encoders.ehr.b": (3,),
    "encoders.encoders.cxr.w": (6,),
    "heads.modality_heads.0.w": (2, 2),
    "heads.modality_heads.1.w": (2, 2),
    "heads.modality_heads.2.w": (4,),
    "encoders.encoders.rep.w": (9,),
    "joint.scale": (),
}


def master_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights with a -0.0 in every key (bit-level comparisons see its sign)."""
    rng = np.random.default_rng(seed)
    weights = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    for value in weights.values():
        value.reshape(-1)[:1] = -0.0
    return weights


def site_counts(held: set[str], n: int) -> dict[str, float]:
    return {
        wire.NUM_EXAMPLES: float(n),
        **{wire.present_key(m): float(n // 2 if m in held else 0) for m in NAMES},
    }


def make_update(rng, master, held: set[str], dtype: str, omit: bool) -> SiteUpdate:
    """A site's reply values: 16-bit updates (only the held groups with omission) or
    float32 weights."""
    parts = {}
    for key, value in master.items():
        modality = wire.parameter_modality(key, NAMES)
        if omit and modality is not None and modality not in held:
            continue
        delta = (0.01 * rng.standard_normal(value.shape)).astype(np.float32)
        if dtype == "float32":
            parts[key] = (value + delta).reshape(-1)
        else:
            raw = np.frombuffer(encode16(delta, dtype), "<u2" if dtype == "bfloat16" else "<f2")
            parts[key] = raw
    return SiteUpdate(parts)


def groups_of(layout: UpdateLayout) -> dict[str, str | None]:
    return {g: wire.parameter_modality(g, NAMES) for g in layout.group_spans}


def reference(updates, layout, counts, deltas):
    """aggregate_states (the robust rules' and the experiments' code) on decoded rows."""
    keep = np.zeros(layout.size, np.float32) if deltas else layout.flat_master()
    result = aggregate_states(
        [layout.group_view(u.row(layout)) for u in updates],
        counts,
        NAMES,
        layout.group_view(keep),
        rule="fedavg",
    )
    flat = np.empty(layout.size, np.float32)
    for name, value in result.items():
        start, stop = layout.group_spans[name]
        flat[start:stop] = value
    if deltas:
        flat += layout.flat_master()
    return flat


HELD_PATTERNS = [set(c) for r in range(len(NAMES) + 1) for c in itertools.combinations(NAMES, r)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("chunk", [1, 5, 1 << 16])
def test_streamed_fedavg_is_bit_equal_to_aggregate_states(dtype, chunk):
    master = master_weights()
    layout = UpdateLayout(master, NAMES, chunk_coordinates=chunk)
    rng = np.random.default_rng(1)
    deltas = dtype != "float32"
    patterns = 0
    for held in itertools.product(HELD_PATTERNS, repeat=2):  # sites 0 and 1; site 2 holds all
        held = [*held, set(NAMES)]
        updates = [make_update(rng, master, h, dtype, omit=deltas) for h in held]
        counts = [site_counts(h, 20 + 10 * i) for i, h in enumerate(held)]
        weights = fedavg_weights(counts, groups_of(layout))
        expected = reference(updates, layout, counts, deltas)
        for threads in (1, 3):
            got = stream_updates(updates, layout, weights, deltas=deltas, threads=threads)
            assert got.aggregate.tobytes() == expected.tobytes(), (held, threads)  # bits
        patterns += 1
    assert patterns == len(HELD_PATTERNS) ** 2 == 64


def test_a_hand_computed_two_site_average_and_a_group_nobody_held():
    master = {"forward_cra.w": np.array([1.0, 2.0], np.float32),
              "encoders.encoders.cxr.w": np.array([5.0], np.float32)}  # fmt: skip
    layout = UpdateLayout(master, NAMES)
    # 16-bit updates: +1 and +3 (exact in bfloat16), weights 1 : 3 -> +2.5
    updates = [
        SiteUpdate({"forward_cra.w": np.frombuffer(encode16(np.full(2, d, np.float32),
                                                            "bfloat16"), "<u2")})
        for d in (1.0, 3.0)
    ]  # fmt: skip
    counts = [site_counts(set(), 10), site_counts(set(), 30)]
    weights = fedavg_weights(counts, groups_of(layout))
    assert weights["encoders.encoders.cxr.w"] is None  # nobody held cxr
    got = stream_updates(updates, layout, weights, deltas=True, encode="bfloat16")
    np.testing.assert_array_equal(got.aggregate, [1.0 + 2.5, 2.0 + 2.5, 5.0])
    np.testing.assert_array_equal(got.squared_norms, [2.0, 18.0])
    assert decode16(got.encoded.tobytes(), "bfloat16", (3,)).tolist() == [3.5, 4.5, 5.0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_norms_are_those_of_the_decoded_updates(dtype):
    master = master_weights(2)
    layout = UpdateLayout(master, NAMES, chunk_coordinates=4)
    rng = np.random.default_rng(3)
    deltas = dtype != "float32"
    updates = [make_update(rng, master, h, dtype, omit=deltas) for h in HELD_PATTERNS]
    got = stream_updates(updates, layout, None, deltas=deltas, threads=2)
    assert got.aggregate is None
    for update, squared in zip(updates, got.squared_norms, strict=True):
        row = update.row(layout).astype(np.float64)
        change = row if deltas else row - layout.flat_master()
        assert squared == pytest.approx(float(np.sum(change**2)), rel=1e-6)


def test_a_non_finite_value_makes_the_norm_non_finite_and_is_traced_to_its_key():
    master = master_weights()
    layout = UpdateLayout(master, NAMES, chunk_coordinates=8)
    delta = np.zeros(master["encoders.encoders.cxr.w"].shape, np.float32)
    delta[3] = np.inf
    update = make_update(np.random.default_rng(0), master, set(NAMES), "bfloat16", omit=False)
    update.parts["encoders.encoders.cxr.w"] = np.frombuffer(encode16(delta, "bfloat16"), "<u2")
    squared = stream_updates([update], layout, None, deltas=True).squared_norms
    assert not np.isfinite(squared[0])
    assert update.first_non_finite(layout) == "encoders.encoders.cxr.w"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_aggregates_16bit_rounding_is_encode16(dtype):
    master = master_weights(4)
    layout = UpdateLayout(master, NAMES, chunk_coordinates=6)
    rng = np.random.default_rng(5)
    updates = [make_update(rng, master, set(NAMES), dtype, omit=False) for _ in range(3)]
    counts = [site_counts(set(NAMES), 10 * (i + 1)) for i in range(3)]
    weights = fedavg_weights(counts, groups_of(layout))
    got = stream_updates(updates, layout, weights, deltas=True, threads=2, encode=dtype)
    assert got.encoded.dtype == np.uint16
    assert got.encoded.tobytes() == encode16(got.aggregate, dtype)


@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3), (4, 1, 2)])
def test_float32_records_are_flowers_own_bytes(shape):
    value = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    row = np.concatenate([value.reshape(-1), np.ones(3, np.float32)])
    record = float32_record(row, {"a": (0, value.size)}, {"a": shape})
    flower = ArrayRecord({"a": Array(value)})
    mine, theirs = record["a"], flower["a"]
    assert (mine.dtype, mine.shape, mine.stype, mine.data) == (
        theirs.dtype, theirs.shape, theirs.stype, theirs.data,
    )  # fmt: skip
    assert mine.is_dirty and mine.object_id == theirs.object_id
    np.testing.assert_array_equal(record["a"].numpy(), value)
    assert record.count_bytes() == flower.count_bytes()


def test_raw16_records_hold_each_keys_16bit_values():
    values = np.arange(10, dtype=np.float32) / 3
    encoded = np.frombuffer(encode16(values, "bfloat16"), "<u2")
    record = raw16_record(
        encoded, "bfloat16", {"a": (0, 4), "b": (4, 10)}, {"a": (2, 2), "b": (6,)}
    )
    assert record["a"].stype == RAW_STYPE and record["b"].shape == (6,)
    decoded = decode16(record["b"].data, "bfloat16", (6,))
    assert decoded.tolist() == decode16(encode16(values[4:], "bfloat16"), "bfloat16", (6,)).tolist()
    with pytest.raises(ValueError, match="float32"):
        float32_record(values.astype(np.float64), {"a": (0, 4)}, {"a": (4,)})


def test_bytes_serialised_in_the_pass_are_those_of_the_records_of_the_row():
    master = master_weights(6)
    layout = UpdateLayout(master, NAMES, chunk_coordinates=5)
    rng = np.random.default_rng(7)
    updates = [make_update(rng, master, set(NAMES), "bfloat16", omit=False) for _ in range(2)]
    weights = fedavg_weights([site_counts(set(NAMES), 10)] * 2, groups_of(layout))
    got = stream_updates(
        updates, layout, weights, deltas=True, threads=2, encode="bfloat16", serialise=True
    )
    shapes = {k: v.shape for k, v in master.items()}
    floats = float32_record(got.aggregate, layout.spans, shapes)
    raw = raw16_record(got.encoded, "bfloat16", layout.spans, shapes)
    assert got.float32_bytes == {k: floats[k].data for k in floats}
    assert got.encoded_bytes == {k: raw[k].data for k in raw}


def test_a_fresh_layout_streamed_on_threads_gives_the_single_thread_aggregate():
    """The flat master is built once, before the workers start (it used to be built lazily
    by whichever worker asked first, and another could read it half filled)."""
    master = master_weights(8)
    rng = np.random.default_rng(9)
    updates = [make_update(rng, master, set(NAMES), "bfloat16", omit=False) for _ in range(3)]
    counts = [site_counts(set(NAMES), 10 * (i + 1)) for i in range(3)]
    expected = None
    for _ in range(20):
        layout = UpdateLayout(master, NAMES, chunk_coordinates=2)
        weights = fedavg_weights(counts, groups_of(layout))
        got = stream_updates(updates, layout, weights, deltas=True, threads=4).aggregate
        if expected is None:
            expected = stream_updates(updates, layout, weights, deltas=True).aggregate
        assert np.array_equal(got, expected)


def test_the_compiled_bfloat16_step_keeps_nan_and_infinity_and_rounds_like_numpy():
    from server.stream_kernels import bfloat16_step

    values = np.array([1.5, -2.0, 3.25, 0.5, 7.0], np.float32)
    part = np.frombuffer(encode16(values, "bfloat16"), "<u2")
    scratch = np.empty(5, np.float32)
    out = np.zeros(5, np.float32)
    squares = bfloat16_step(part, out, scratch.view(np.uint32), scratch, 0.3, True, True)
    assert squares == pytest.approx(float(np.sum(values.astype(np.float64) ** 2)))
    np.testing.assert_array_equal(out, values * np.float32(0.3))
    again = out.copy()
    bfloat16_step(part, out, scratch.view(np.uint32), scratch, 0.7, False, False)
    np.testing.assert_array_equal(out, again + values * np.float32(0.7))
    for bad in (np.nan, np.inf, -np.inf):
        broken = np.frombuffer(encode16(np.array([1.0, bad, 2.0], np.float32), "bfloat16"), "<u2")
        squares = bfloat16_step(broken, out[:3], scratch[:3].view(np.uint32), scratch[:3], 0.0,
                                False, True)  # fmt: skip
        assert not np.isfinite(squares), bad


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_groups_nobody_held_match_aggregate_states_to_the_bit(dtype):
    """-0.0 in the master of a group nobody took part in: 16-bit transport adds update 0 to
    it (+0.0, as aggregate_states does), float32 transport keeps it (-0.0)."""
    master = master_weights(10)
    layout = UpdateLayout(master, NAMES, chunk_coordinates=3)
    rng = np.random.default_rng(11)
    deltas = dtype != "float32"
    updates = [make_update(rng, master, {"ehr"}, dtype, omit=deltas) for _ in range(2)]
    counts = [site_counts({"ehr"}, 10), site_counts({"ehr"}, 30)]
    weights = fedavg_weights(counts, groups_of(layout))
    assert weights["encoders.encoders.cxr.w"] is None
    got = stream_updates(updates, layout, weights, deltas=deltas)
    assert got.aggregate.tobytes() == reference(updates, layout, counts, deltas).tobytes()


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_float32_replies_are_read_to_the_exact_byte_in_every_npy_version(version):
    """A float32 reply is a .npy file (any version np.load reads); bytes after its values
    (which np.load ignores, and which would be counted as received) are a rejection."""
    import io

    from omnifuse_model.wire_format import WireFormat
    from server.reply_screening import ReplyError
    from server.update_rows import read_update

    reference = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    layout = UpdateLayout(reference)
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, reference["w"] + 1, version=version)
    exact = buffer.getvalue()
    wire32 = WireFormat(dtype="float32", omit_unheld=False)

    def record(data: bytes) -> ArrayRecord:
        return ArrayRecord({"w": Array("float32", (2, 3), "numpy.ndarray", data)})

    update = read_update(record(exact), layout, ["w"], wire32)
    np.testing.assert_array_equal(update.row(layout), (reference["w"] + 1).ravel())
    for tail in (b"\x00", b"x" * 1000):
        with pytest.raises(ReplyError, match=r"undecodable_array:w:byte_count"):
            read_update(record(exact + tail), layout, ["w"], wire32)

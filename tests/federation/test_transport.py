"""16-bit transport and omission (issue #14 point 3): the real ClientApp and strategy ends.

- 16-bit encoding rounds to nearest like torch's own casts; a byte count, dtype or stype
  other than configured is refused;
- a ClientApp round trip: the site gets the master's 16-bit rounding, sends 16-bit updates of
  exactly the keys it was asked for, the server's aggregate is within 16-bit rounding of the
  float32 wire's;
- omission changes no aggregate: bit-equal to the same 16-bit round without it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import train
from client.transport import decode_global, encode_update
from omnifuse_model import federation_schema as wire
from omnifuse_model.config import TrainConfig
from omnifuse_model.round_plan import RoundPlan
from omnifuse_model.wire_format import (
    OVERFLOW_AT,
    RAW_STYPE,
    UPLINK_MODALITIES,
    WireFormat,
    decode16,
    encode16,
    fits_wire,
    held_modalities,
    round16,
    uplink_keys,
)
from server.master_weights import downlink_arrays
from server.run_config import FederationRunConfig
from server.strategy import OmniFuseStrategy
from tests.federation.conftest import ROUND_SITES, make_site

NAMES = ["ehr", "cxr"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_encoding_rounds_like_torch(dtype):
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(5000) * 10.0 ** rng.integers(-6, 3, 5000)).astype(np.float32)
    decoded = decode16(encode16(values, dtype), dtype, values.shape)
    expected = torch.from_numpy(values).to(getattr(torch, dtype)).float().numpy()
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, expected)
    assert len(encode16(values, dtype)) == 2 * values.size


def test_bfloat16_bytes_are_the_round_to_nearest_even_bits():
    """encode16's bfloat16 bytes are (bits + 0x7FFF + lsb) >> 16, little-endian, for random
    values, exact ties (both parities), subnormals, signed zeros, the largest floats and
    infinities."""
    rng = np.random.default_rng(1)
    ties = (rng.integers(0, 1 << 16, 200, dtype=np.uint32) << 16) | np.uint32(0x8000)
    values = np.concatenate(
        [
            (rng.standard_normal(2000) * 10.0 ** rng.integers(-40, 38, 2000)).astype(np.float32),
            ties.view(np.float32),
            np.array([0.0, -0.0, 1e-45, -1e-45, 3.4028235e38, -3.4028235e38], np.float32),
            np.array([np.inf, -np.inf], np.float32),
        ]
    )
    values = values[~np.isnan(values)]
    bits = values.view(np.uint32)
    expected = ((bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype("<u2")
    assert encode16(values, "bfloat16") == expected.tobytes()
    readonly = values.copy()
    readonly.flags.writeable = False
    assert encode16(readonly, "bfloat16") == expected.tobytes()


def test_16bit_bytes_of_another_length_or_dtype_are_refused():
    data = encode16(np.ones(6, np.float32), "float16")
    with pytest.raises(ValueError, match="byte_count:12!=14"):
        decode16(data, "float16", (7,))
    with pytest.raises(ValueError, match="dtype:float32"):
        decode16(data, "float32", (6,))


def test_uplink_keys_leave_out_only_unheld_modality_groups(model_config):
    keys = list(make_state(model_config))
    kept = uplink_keys(keys, NAMES, ["ehr"])
    dropped = set(keys) - set(kept)
    assert dropped and all(wire.parameter_modality(k, NAMES) == "cxr" for k in dropped)
    assert uplink_keys(keys, NAMES, None) == keys
    assert held_modalities({"ehr": 10, "cxr": 0}) == ["ehr"]


def make_state(model_config) -> dict[str, torch.Tensor]:
    from omnifuse_model.model import OmniFuse

    torch.manual_seed(0)
    return OmniFuse(model_config).state_dict()


def encoded_replies(site_round, site_registry, wire_format: WireFormat, reply_from):
    """``site_round``'s results as the ClientApp encodes them for ``wire_format``: the
    updates against the global weights they trained from."""
    global_state, results, replies = site_round
    encoded = []
    for result, reply in zip(results, replies, strict=True):
        declared = site_registry.declarations[result.audit.site].num_present
        held = held_modalities(declared) if wire_format.omit_unheld else None
        arrays = encode_update(result.state, global_state, wire_format, NAMES, held)
        content = RecordDict({k: reply.content[k] for k in reply.content})
        content[wire.ARRAYS] = arrays
        encoded.append(reply_from(content, reply.metadata.src_node_id))
    return encoded


def aggregate(run: FederationRunConfig, model_config, registry, global_state, replies):
    strategy = OmniFuseStrategy(run, model_config, registry=registry)
    strategy.previous = {k: v.numpy() for k, v in global_state.items()}
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.records[1].problems == []
    return {k: v.numpy() for k, v in arrays.items()}, strategy


def run_config(tmp_path, transport: str, omit: bool = True) -> FederationRunConfig:
    return FederationRunConfig(
        scenario_dir=tmp_path,
        run_dir=tmp_path,
        min_train_nodes=1,
        transport=transport,
        omit_unheld=omit,
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_omission_changes_no_aggregate_bit_for_bit(
    dtype, site_round, site_registry, model_config, reply_from, tmp_path
):
    global_state = site_round[0]
    results = {}
    for omit in (True, False):
        wire_format = WireFormat(dtype=dtype, omit_unheld=omit)
        replies = encoded_replies(site_round, site_registry, wire_format, reply_from)
        run = run_config(tmp_path, dtype, omit)
        results[omit], strategy = aggregate(run, model_config, site_registry, global_state, replies)
        received = strategy.records[1].bytes["received"]
        results[(omit, "bytes")] = received
    assert results[True].keys() == results[False].keys()
    for key in results[False]:
        assert np.array_equal(results[True][key], results[False][key]), key
    assert results[(True, "bytes")] < results[(False, "bytes")]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_16bit_aggregate_is_within_rounding_of_the_float32_one(
    dtype, site_round, site_registry, model_config, reply_from, tmp_path
):
    global_state, _, float32_replies = site_round
    exact, _ = aggregate(
        run_config(tmp_path, "float32"), model_config, site_registry, global_state, float32_replies
    )
    run = run_config(tmp_path, dtype)
    replies = encoded_replies(site_round, site_registry, run.wire_format(), reply_from)
    got, strategy = aggregate(run, model_config, site_registry, global_state, replies)
    step = 2.0**-8 if dtype == "bfloat16" else 2.0**-11  # relative rounding of one update
    for key, value in exact.items():
        update = np.abs(value - global_state[key].numpy())
        assert got[key].dtype == np.float32
        np.testing.assert_allclose(got[key], value, rtol=0, atol=float(update.max()) * step + 1e-7)
    assert strategy.records[1].bytes["received"] < 0.52 * sum(
        r.content[wire.ARRAYS].count_bytes() for r in float32_replies
    )


def test_downlink_is_the_masters_16bit_rounding_and_decodes_to_it(model_config):
    master = {k: v.numpy() for k, v in make_state(model_config).items()}
    float32 = ArrayRecord({k: v for k, v in make_state(model_config).items()})
    for dtype in ("float16", "bfloat16"):
        record = downlink_arrays(master, WireFormat(dtype=dtype), float32)
        assert all(record[k].stype == RAW_STYPE and record[k].dtype == dtype for k in record)
        decoded = decode_global(record)
        for key, value in master.items():
            assert torch.equal(decoded[key], torch.from_numpy(round16(value, dtype)))
        assert record.count_bytes() <= 0.5 * float32.count_bytes()
    assert downlink_arrays(master, WireFormat(), float32) is float32


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_client_app_round_trip_sends_exactly_the_asked_keys(
    dtype, flower_task_identity, site_registry, model_config, tmp_path, reply_from
):
    """The real ClientApp ``train``: 16-bit downlink in, 16-bit updates of its held
    modalities out; the strategy accepts the reply and moves the master by it."""
    name = "b_no_cxr"
    modalities, seed, node = ROUND_SITES[name]
    site = make_site(name, modalities, seed)
    toml = tmp_path / "site.toml"
    toml.write_text(site.to_toml())
    run = run_config(tmp_path, dtype)
    strategy = OmniFuseStrategy(run, model_config, registry=site_registry)
    master = {k: v.numpy() for k, v in make_state(model_config).items()}
    strategy.previous = master
    plan = RoundPlan(
        model=model_config,
        train=TrainConfig(epochs=1, batch_size=32, progress=False, bootstrap_samples=0),
        global_round=1,
        wire=run.wire_format(),
    )
    content = RecordDict(
        {
            wire.ARRAYS: downlink_arrays(master, run.wire_format(), ArrayRecord()),
            wire.CONFIG: ConfigRecord({wire.ROUND_PLAN: plan.model_dump_json()}),
        }
    )
    [request] = strategy.with_uplink_keys(
        [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)]
    )
    assert list(request.content[wire.CONFIG][UPLINK_MODALITIES]) == ["ehr"]
    context = Context(
        run_id=1, node_id=node, node_config={"site-config": str(toml)}, state=RecordDict(),
        run_config={},
    )  # fmt: skip
    reply = train(request, context)
    arrays = reply.content[wire.ARRAYS]
    assert set(arrays.keys()) == set(uplink_keys(master, NAMES, ["ehr"]))
    assert {arrays[k].dtype for k in arrays} == {dtype}
    answer = reply_from(RecordDict({k: reply.content[k] for k in reply.content}), node)
    new, _ = strategy.aggregate_train(1, [answer])
    assert strategy.records[1].accepted_sites == [name]
    moved = [k for k in master if not np.array_equal(new[k].numpy(), master[k])]
    assert moved and all(wire.parameter_modality(k, NAMES) != "cxr" for k in moved)


def test_central_dp_forces_the_float32_wire(tmp_path):
    run = FederationRunConfig(scenario_dir=tmp_path, run_dir=tmp_path, central_dp="server")
    assert run.wire_format() == WireFormat(dtype="float32", omit_unheld=False)
    plain = FederationRunConfig(scenario_dir=tmp_path, run_dir=tmp_path, modality_aware=False)
    assert plain.wire_format().omit_unheld is False


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_the_next_rounds_master_and_downlink_come_from_the_aggregation_unchanged(
    dtype, site_round, site_registry, model_config, reply_from, tmp_path
):
    """Flower hands the record aggregate_train returned back to configure_train/evaluate:
    the strategy's master weights and downlink for it are exactly what decoding and encoding
    the record would give (made once, in the aggregation's pass)."""
    global_state = site_round[0]
    run = run_config(tmp_path, dtype, omit=dtype != "float32")
    replies = (
        site_round[2]
        if dtype == "float32"
        else encoded_replies(site_round, site_registry, run.wire_format(), reply_from)
    )
    arrays, _ = aggregate(run, model_config, site_registry, global_state, replies)
    strategy = OmniFuseStrategy(run, model_config, registry=site_registry)
    strategy.previous = {k: v.numpy() for k, v in global_state.items()}
    new_record, _ = strategy.aggregate_train(1, replies)
    master, downlink = strategy.weights.round_arrays(new_record)
    assert master.keys() == arrays.keys()
    for key, value in new_record.items():
        assert np.array_equal(master[key], value.numpy()) and master[key].dtype == np.float32
        assert np.array_equal(master[key], arrays[key])
    expected = downlink_arrays(master, run.wire_format(), new_record)
    assert {k: downlink[k].data for k in downlink} == {k: expected[k].data for k in expected}
    again = strategy.weights.round_arrays(new_record)
    assert again[0] is master and again[1] is downlink  # made once
    foreign = ArrayRecord({k: v for k, v in make_state(model_config).items()})
    decoded, _ = strategy.weights.round_arrays(foreign)
    assert all(np.array_equal(decoded[k], foreign[k].numpy()) for k in foreign)


def test_apply_updates_on_other_replies_than_screened_averages_those(
    site_round, site_registry, model_config, reply_from, tmp_path
):
    """The aggregate the screening pass left is used only for exactly the updates it read."""
    global_state = site_round[0]
    run = run_config(tmp_path, "bfloat16")
    replies = encoded_replies(site_round, site_registry, run.wire_format(), reply_from)
    strategy = OmniFuseStrategy(run, model_config, registry=site_registry)
    strategy.previous = {k: v.numpy() for k, v in global_state.items()}
    accepted = strategy.screen_train(1, replies)
    both = strategy.apply_updates(accepted, [a.metrics.as_metrics() for a in accepted])
    one = strategy.apply_updates(accepted[:1], [accepted[0].metrics.as_metrics()])
    alone = OmniFuseStrategy(run, model_config, registry=site_registry)
    alone.previous = strategy.previous
    first = alone.screen_train(
        1, [r for r in replies if r.metadata.src_node_id == accepted[0].node]
    )
    expected = alone.apply_updates(first, [first[0].metrics.as_metrics()])
    assert all(np.array_equal(one[k], expected[k]) for k in expected)
    assert any(not np.array_equal(one[k], both[k]) for k in both)


LARGE_KEY = "forward_cra.blocks.0.encoder.0.weight"


def _round_near_the_limit(
    site_round,
    site_registry,
    model_config,
    reply_from,
    tmp_path,
    transport: str,
    update: float,
    master: float,
) -> OmniFuseStrategy:
    """Round 1 of a strategy on ``transport`` (norm bound off) whose master holds ``master``
    and every site's update ``update`` in every value of LARGE_KEY; its replies aggregated."""
    global_state = site_round[0]
    run = FederationRunConfig(
        scenario_dir=tmp_path,
        run_dir=tmp_path,
        min_train_nodes=1,
        transport=transport,
        max_update_norm=0.0,
    )
    replies = encoded_replies(site_round, site_registry, run.wire_format(), reply_from)
    values = np.full(global_state[LARGE_KEY].shape, update, np.float32)
    for reply in replies:
        reply.content[wire.ARRAYS][LARGE_KEY] = Array(
            transport, tuple(values.shape), RAW_STYPE, encode16(values, transport)
        )
    strategy = OmniFuseStrategy(run, model_config, registry=site_registry)
    strategy.previous = {k: v.numpy() for k, v in global_state.items()}
    strategy.previous[LARGE_KEY] = np.full_like(values, master)
    assert strategy.aggregate_train(1, replies) == (None, None)
    return strategy


def test_a_non_finite_aggregate_is_refused_and_the_global_model_kept(
    site_round, site_registry, model_config, reply_from, tmp_path
):
    """Finite updates whose sum leaves float32's range (norm bound off, master near the
    top of the range): the round's aggregate is refused by name, nothing is returned."""
    strategy = _round_near_the_limit(
        site_round, site_registry, model_config, reply_from, tmp_path, "bfloat16", 3e38, 3e38
    )
    record = strategy.records[1]
    assert record.problems == [  # each update was finite: only the aggregate is refused
        {"site": "(aggregate)", "status": "rejected", "reason": "non_finite_aggregate"}
    ]
    assert record.accepted_sites == []  # no site's update was used this round
    assert {row.site: row.update_status for row in record.audit} == {
        "a_full": "not_aggregated:non_finite_aggregate",
        "b_no_cxr": "not_aggregated:non_finite_aggregate",
    }


def test_a_master_the_float16_downlink_cannot_hold_is_refused(
    site_round, site_registry, model_config, reply_from, tmp_path
):
    """float16 holds at most 65504: a master of 90000 is finite in float32 but would be sent
    to every site as inf; it is refused by name and the global model kept."""
    strategy = _round_near_the_limit(  # 60000 is finite in float16
        site_round, site_registry, model_config, reply_from, tmp_path, "float16", 60000, 30000
    )
    assert strategy.records[1].problems == [
        {"site": "(aggregate)", "status": "rejected", "reason": "downlink_overflow:float16"}
    ]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fits_wire_is_exactly_where_the_16bit_rounding_overflows(dtype):
    threshold = np.float32(OVERFLOW_AT[dtype])
    below = np.nextafter(threshold, np.float32(0))
    for value, fits in ((below, True), (threshold, False), (-below, True), (-threshold, False)):
        row = np.array([0.5, value], np.float32)
        with np.errstate(over="ignore"):  # the cast to float16 warns where it overflows
            sent = decode16(encode16(row, dtype), dtype, row.shape)
        assert bool(np.isfinite(sent).all()) is fits  # what the site would receive
        assert fits_wire(row, dtype) is fits
    for bad in (np.nan, np.inf, -np.inf):
        assert not fits_wire(np.array([1.0, bad], np.float32), dtype)
    assert fits_wire(np.array([3e38], np.float32), "float32")
    assert not fits_wire(np.array([np.nan], np.float32), "float32")


def test_too_few_accepted_updates_are_named_and_no_site_counts_as_accepted(
    site_round, site_registry, model_config, tmp_path
):
    """min-train-nodes 3 with two valid replies: the model is kept, and the record says so
    (the sites' audit rows too) instead of listing both as accepted."""
    global_state, _, replies = site_round
    run = FederationRunConfig(
        scenario_dir=tmp_path, run_dir=tmp_path, min_train_nodes=3, transport="float32"
    )
    strategy = OmniFuseStrategy(run, model_config, registry=site_registry)
    strategy.previous = {k: v.numpy() for k, v in global_state.items()}
    assert strategy.aggregate_train(1, replies) == (None, None)
    record = strategy.records[1]
    assert record.problems == [
        {"site": "(aggregate)", "status": "skipped", "reason": "too_few_accepted:2<3"}
    ]
    assert record.accepted_sites == []
    assert {row.update_status for row in record.audit} == {"not_aggregated:too_few_accepted:2<3"}

"""Hostile replies: every field of a valid reply mutated into something the server may not use.

Property (Hypothesis, on real Flower records): the server does not raise, the mutated reply
is rejected (or recorded as failed) with a short reason naming the sender, and the round's
aggregate equals the aggregate of the same round without that reply. The numbers of
mutations tried are printed at the end of the module (``pytest -s``).
"""

from __future__ import annotations

import copy
import io
import json
from collections import Counter

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.transport import encode_update
from omnifuse_model import federation_schema as wire
from omnifuse_model.wire_format import RAW_STYPE, decode16, encode16, held_modalities
from server.run_config import FederationRunConfig
from server.site_registry import REASON_CHARS
from server.strategy import OmniFuseStrategy

BAD_SITE, BAD_NODE = "b_no_cxr", 12
SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
FEW = settings(SETTINGS, max_examples=50)
TRIED: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_mutation_counts():
    yield
    total = sum(TRIED.values())
    print(f"\nhostile-reply mutations tried: {total} " + json.dumps(dict(sorted(TRIED.items()))))


# -- values a field may not hold ----------------------------------------------------------------
def not_a_count(upper: int):
    """Never an acceptable count bounded by ``upper``: too big, negative, a float, a list."""
    return st.one_of(
        st.integers(min_value=upper + 1, max_value=2**62),
        st.integers(min_value=-(2**62), max_value=-1),
        st.floats(allow_nan=True, allow_infinity=True),
        st.lists(st.integers(0, 10), max_size=3),
    )


def outside(low: float, high: float, undefined: float | None = None):
    """Floats outside [low, high] (NaN and infinities included), or a list."""
    return st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).filter(
            lambda x: not low <= x <= high and x != undefined
        ),
        st.lists(st.floats(0, 1), min_size=1, max_size=3),
    )


def odd_name(known):
    return st.text(min_size=1, max_size=12).filter(lambda k: k not in known)


# -- mutations of one record of a train reply -----------------------------------------------
def mutate_metrics(data, records: dict, declared) -> str:
    metrics = dict(records[wire.METRICS])
    n = int(metrics[wire.NUM_EXAMPLES])
    bad = {
        wire.NUM_EXAMPLES: not_a_count(declared.num_train),
        wire.present_key("ehr"): not_a_count(n),
        wire.present_key("cxr"): not_a_count(n),
        wire.TRAIN_LOSS: outside(-1e12, 1e12),
        wire.TRAIN_SECONDS: outside(0.0, 1e7),
        wire.VAL_AUROC: outside(0.0, 1.0, undefined=-1.0),
        wire.VAL_AUPRC: outside(0.0, 1.0, undefined=-1.0),
        wire.EPSILON: outside(0.0, 1e12),
    }
    how = data.draw(st.sampled_from(["value", "delete", "extra"]))
    if how == "value":
        key = data.draw(st.sampled_from(sorted(bad)))
        metrics[key] = data.draw(bad[key])
    elif how == "delete":
        del metrics[data.draw(st.sampled_from(sorted(k for k in metrics if k != wire.EPSILON)))]
    else:
        metrics[data.draw(odd_name(bad))] = data.draw(st.one_of(st.integers(0, 5), st.floats()))
    records[wire.METRICS] = MetricRecord(metrics)
    return f"metrics.{how}"


def _npy(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


def mutate_arrays(data, records: dict, declared) -> str:
    arrays = {k: records[wire.ARRAYS][k] for k in records[wire.ARRAYS]}
    key = data.draw(st.sampled_from(sorted(arrays)))
    value = arrays[key].numpy()
    how = data.draw(
        st.sampled_from(
            [
                "dtype",
                "string",
                "shape",
                "non_finite",
                "huge",
                "missing",
                "extra",
                "lie",
                "bytes",
                "trailing",
            ]
        )
    )
    if how == "dtype":
        dtype = data.draw(
            st.sampled_from(["float64", "float16", "int8", "int64", "uint8", "bool", "complex64"])
        )
        arrays[key] = Array(value.astype(dtype))
    elif how == "string":
        arrays[key] = Array(np.full(value.shape, "x", dtype="<U3"))
    elif how == "shape":
        arrays[key] = Array(
            data.draw(
                st.sampled_from([value.reshape(-1, 1), np.zeros(value.size + 1, np.float32)])
            ).astype(np.float32)
        )
    elif how == "non_finite":
        flat = value.copy().ravel()
        flat[data.draw(st.integers(0, flat.size - 1))] = data.draw(
            st.sampled_from([np.nan, np.inf, -np.inf])
        )
        arrays[key] = Array(flat.reshape(value.shape))
    elif how == "huge":
        arrays[key] = Array((value + np.float32(1e6)).astype(np.float32))
    elif how == "missing":
        del arrays[key]
    elif how == "extra":
        arrays[data.draw(odd_name(arrays))] = Array(np.zeros(2, np.float32))
    elif how == "lie":  # the header says float32, the bytes hold float64
        arrays[key] = Array("float32", value.shape, "numpy.ndarray", _npy(value.astype("float64")))
    elif how == "trailing":  # a valid .npy with bytes after it (np.load ignores them)
        tail = data.draw(st.binary(min_size=1, max_size=64))
        arrays[key] = Array("float32", value.shape, "numpy.ndarray", _npy(value) + tail)
    else:
        junk = data.draw(st.binary(max_size=64))
        arrays[key] = Array("float32", value.shape, "numpy.ndarray", junk)
    records[wire.ARRAYS] = ArrayRecord(arrays)
    return f"arrays.{how}"


AUDIT_REQUIRED = [
    "site",
    "round",
    "num_examples",
    "availability_counts",
    "tla_scores",
    "lazy_combination",
    "mean_dwfuse_weight",
    "imputation_error",
    "val_auroc",
]


def mutate_audit(data, records: dict, declared) -> str:
    row = json.loads(str(records[wire.AUDIT]["row"]))
    n = declared.num_train
    labels = ["ehr", "cxr", "ehr+cxr"]
    choices = {
        "site": st.one_of(st.text(max_size=10).filter(lambda s: s != BAD_SITE), st.integers()),
        "round": st.one_of(st.integers().filter(lambda r: r != 1), st.just("1"), st.just(1.0)),
        "update_status": st.text(max_size=10).filter(lambda s: s != "accepted"),
        "num_examples": st.integers(min_value=0).filter(lambda v: v != row["num_examples"]),
        "lazy_combination": odd_name(labels),
        "val_auroc": outside(0.0, 1.0),
        "epsilon": outside(0.0, 1e12),
    }
    stats = {
        "availability_counts": (labels, not_a_count(n)),
        "tla_scores": (labels, outside(0.0, 1e12)),
        "mean_dwfuse_weight": (["ehr", "cxr"], outside(0.0, 1.0)),
        "imputation_error": (["ehr", "cxr"], outside(0.0, 1e12)),
    }
    how = data.draw(st.sampled_from(["field", "stat", "stat_key", "drop", "extra", "text", "key"]))
    text = None
    if how == "field":
        name = data.draw(st.sampled_from(sorted(choices)))
        row[name] = data.draw(choices[name])
    elif how in ("stat", "stat_key"):
        name = data.draw(st.sampled_from(sorted(stats)))
        keys, values = stats[name]
        key = data.draw(st.sampled_from(keys) if how == "stat" else odd_name(keys))
        value = data.draw(values) if how == "stat" else 0
        row[name] = {**row[name], key: value}
    elif how == "drop":
        del row[data.draw(st.sampled_from(AUDIT_REQUIRED))]
    elif how == "extra":
        row[data.draw(odd_name(row))] = 1
    elif how == "text":
        text = data.draw(st.one_of(st.text(max_size=40), st.integers(), st.floats()))
    audit = {"row": json.dumps(row) if text is None else text}
    if how == "key":
        audit[data.draw(odd_name(audit))] = "x"
    records[wire.AUDIT] = ConfigRecord(audit)
    return f"audit.{how}"


def mutate_tla(data, records: dict, declared) -> str:
    tla = dict(records[wire.TLA_SUMS])
    assert tla, "the fixture's site must send TLA sums"
    key = data.draw(st.sampled_from(sorted(tla)))
    how = data.draw(st.sampled_from(["value", "unknown_key", "unpaired"]))
    if how == "value":
        if key.startswith("count."):
            bad = st.one_of(not_a_count(declared.num_train), st.just(0), st.text(max_size=5))
        else:
            bad = st.one_of(outside(0.0, 1e15), st.text(max_size=5), st.binary(max_size=4))
        tla[key] = data.draw(bad)
    elif how == "unknown_key":
        tla[data.draw(odd_name(tla))] = 1.0
    else:
        del tla[key]
    records[wire.TLA_SUMS] = ConfigRecord(tla)
    return f"tla.{how}"


def mutate_records(data, records: dict, declared) -> str:
    how = data.draw(st.sampled_from(["missing", "extra", "type"]))
    if how == "missing":
        del records[data.draw(st.sampled_from([wire.ARRAYS, wire.METRICS, wire.AUDIT]))]
    elif how == "extra":
        records[data.draw(odd_name(records))] = ConfigRecord({"x": 1})
    else:
        key = data.draw(st.sampled_from([wire.ARRAYS, wire.METRICS, wire.AUDIT, wire.TLA_SUMS]))
        records[key] = (
            ConfigRecord({"x": 1}) if key in (wire.ARRAYS, wire.METRICS) else ArrayRecord()
        )
    return f"records.{how}"


MUTATIONS = [mutate_metrics, mutate_arrays, mutate_audit, mutate_tla, mutate_records]


# -- the property ----------------------------------------------------------------------------
@pytest.fixture
def hostile_round(site_round, site_registry, model_config, tmp_path):
    """(strategy factory, good reply, the bad site's valid reply, baseline aggregate)."""
    global_state, _, replies = site_round
    bad_reply, good_reply = replies  # site_round lists b_no_cxr (node 12), then a_full
    assert bad_reply.metadata.src_node_id == BAD_NODE
    run = FederationRunConfig(
        transport="float32",
        scenario_dir=tmp_path,
        run_dir=tmp_path,
        min_train_nodes=1,
        tla_scope="global",
    )
    previous = {k: v.numpy() for k, v in global_state.items()}

    def fresh() -> OmniFuseStrategy:
        strategy = OmniFuseStrategy(run, model_config, registry=copy.deepcopy(site_registry))
        strategy.previous = previous
        return strategy

    baseline = fresh()
    arrays, metrics = baseline.aggregate_train(1, [good_reply])
    return fresh, good_reply, bad_reply, (arrays, metrics, baseline)


def _assert_same_as_without(strategy, result, baseline, node: int, site: str | None) -> None:
    arrays, metrics = result
    expected_arrays, expected_metrics, expected = baseline
    assert arrays is not None and arrays.keys() == expected_arrays.keys()
    for key in expected_arrays:
        got, want = arrays[key].numpy(), expected_arrays[key].numpy()
        assert got.dtype == np.float32 and np.array_equal(got, want), key
    assert dict(metrics) == dict(expected_metrics)
    assert strategy.global_laziness == expected.global_laziness
    assert strategy.site_laziness == expected.site_laziness
    record = strategy.records[1]
    assert record.accepted_sites == ["a_full"]
    [problem] = record.problems
    assert problem["node"] == node and problem.get("site") == site
    assert problem["status"] in ("rejected", "failed")
    assert 0 < len(problem["reason"]) <= REASON_CHARS


@SETTINGS
@given(data=st.data())
def test_a_mutated_train_reply_is_rejected_and_the_aggregate_is_the_same_without_it(
    data, hostile_round, site_registry, reply_from
):
    fresh, good, bad, baseline = hostile_round
    records = {key: bad.content[key] for key in bad.content}
    mutation = data.draw(st.sampled_from(MUTATIONS))
    TRIED[mutation(data, records, site_registry.declarations[BAD_SITE])] += 1
    strategy = fresh()
    result = strategy.aggregate_train(1, [reply_from(RecordDict(records), BAD_NODE), good])
    _assert_same_as_without(strategy, result, baseline, BAD_NODE, BAD_SITE)


@FEW
@given(reason=st.text(max_size=2000), code=st.integers(0, 2**31))
def test_an_error_reply_is_a_failure_with_a_truncated_reason(
    reason, code, hostile_round, flower_task_identity
):
    fresh, good, _, baseline = hostile_round
    request = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=BAD_NODE)
    failed = Message(error=Error(code=code, reason=reason), reply_to=request)
    TRIED["error_reply"] += 1
    strategy = fresh()
    result = strategy.aggregate_train(1, [failed, good])
    _assert_same_as_without(strategy, result, baseline, BAD_NODE, BAD_SITE)
    assert strategy.records[1].problems[0]["status"] == "failed"


@FEW
@given(node=st.integers(13, 2**63 - 1))
def test_a_reply_from_an_unregistered_node_is_rejected(node, hostile_round, reply_from):
    fresh, good, bad, baseline = hostile_round
    TRIED["unregistered_node"] += 1
    strategy = fresh()
    result = strategy.aggregate_train(1, [reply_from(bad.content, node), good])
    _assert_same_as_without(strategy, result, baseline, node, None)


@pytest.mark.parametrize(
    ("claim", "reason"),
    [
        ({"site": "a_full"}, "bad_audit:site_mismatch"),
        ({"round": 2}, "bad_audit:round_mismatch"),
        # the report suppresses every site's counts below the largest threshold a row names
        ({"min_count": 10**12}, "bad_audit:min_count:1000000000000!=5"),
        ({"min_count": None}, "bad_audit:min_count:None!=5"),
    ],
)
def test_a_reply_claiming_another_site_or_round_is_rejected(
    claim, reason, hostile_round, reply_from
):
    """Node 12 is bound to b_no_cxr: its audit row may not speak for a_full, or round 2, or
    name another suppression threshold than the run's."""
    fresh, good, bad, _ = hostile_round
    row = json.loads(str(bad.content[wire.AUDIT]["row"]))
    records = {key: bad.content[key] for key in bad.content}
    records[wire.AUDIT] = ConfigRecord({"row": json.dumps({**row, **claim})})
    strategy = fresh()
    strategy.aggregate_train(1, [reply_from(RecordDict(records), BAD_NODE), good])
    [problem] = strategy.records[1].problems
    assert problem["site"] == BAD_SITE and problem["reason"].startswith(reason)
    assert strategy.records[1].accepted_sites == ["a_full"]
    # no row under a_full twice: the rejected round shows under the node's own site
    audit = {r.site: r.update_status for r in strategy.records[1].audit}
    assert audit == {"a_full": "accepted", BAD_SITE: f"rejected:{problem['reason']}"}


def test_a_node_sending_another_sites_reply_is_named_by_its_own_site(hostile_round, reply_from):
    fresh, good, _, _ = hostile_round
    strategy = fresh()
    strategy.aggregate_train(1, [reply_from(good.content, BAD_NODE), good])
    [problem] = strategy.records[1].problems
    assert problem["site"] == BAD_SITE and problem["status"] == "rejected"
    assert strategy.records[1].accepted_sites == ["a_full"]


def test_a_second_reply_from_one_node_is_rejected(hostile_round):
    fresh, good, bad, _ = hostile_round
    strategy = fresh()
    strategy.aggregate_train(1, [good, good, bad])
    assert strategy.records[1].accepted_sites == ["a_full", BAD_SITE]
    assert [p["reason"] for p in strategy.records[1].problems] == ["duplicate_reply"]


def test_an_int8_reply_cannot_zero_the_global_model(hostile_round, reply_from):
    """Issue #9.1: an int8 reply ordered first made every checkpoint all zeros."""
    fresh, good, bad, baseline = hostile_round
    arrays = {k: Array(v.numpy().astype(np.int8)) for k, v in bad.content[wire.ARRAYS].items()}
    records = {key: bad.content[key] for key in bad.content}
    records[wire.ARRAYS] = ArrayRecord(arrays)
    strategy = fresh()
    result = strategy.aggregate_train(1, [reply_from(RecordDict(records), BAD_NODE), good])
    _assert_same_as_without(strategy, result, baseline, BAD_NODE, BAD_SITE)
    assert strategy.records[1].problems[0]["reason"].startswith("declared_dtype_or_shape")


def test_counts_above_the_last_accepted_round_are_rejected(hostile_round, reply_from):
    fresh, good, bad, _ = hostile_round
    strategy = fresh()
    strategy.registry.last_counts[BAD_SITE] = {wire.NUM_EXAMPLES: 1}
    strategy.aggregate_train(1, [bad, good])
    assert strategy.records[1].problems[0]["reason"].startswith("num-examples:above_last_round")


def test_published_counts_fit_the_declaration_and_one_above_it_is_rejected(
    hostile_round, reply_from
):
    """Honest sites declare and report counts rounded the same way (multiples of
    audit-min-count 5): both sites are accepted; a count one above the declared one is not."""
    fresh, good, bad, _ = hostile_round
    strategy = fresh()
    declared = strategy.registry.declarations[BAD_SITE]
    metrics = dict(bad.content[wire.METRICS])
    assert metrics[wire.NUM_EXAMPLES] == declared.num_train and declared.num_train % 5 == 0
    assert all(metrics[wire.present_key(m)] % 5 == 0 for m in declared.num_present)
    strategy.aggregate_train(1, [bad, good])
    assert strategy.records[1].accepted_sites == ["a_full", BAD_SITE]
    records = {key: bad.content[key] for key in bad.content}
    records[wire.METRICS] = MetricRecord({**metrics, wire.NUM_EXAMPLES: declared.num_train + 1})
    strategy = fresh()
    strategy.aggregate_train(1, [reply_from(RecordDict(records), BAD_NODE), good])
    assert strategy.records[1].problems[0]["reason"] == (
        f"num-examples:above_declared:{declared.num_train + 1}>{declared.num_train}"
    )


# -- 16-bit transport with omission (issue #14 point 3) --------------------------------------
def mutate_arrays16(data, records: dict, dtype: str, reference: dict) -> str:
    """A 16-bit reply's arrays broken in a way the server must refuse: another dtype, stype,
    shape or byte count, a value decoding to NaN/inf, a huge update, a key missing, a key it
    was not asked for (a modality group it does not hold, or an unknown name)."""
    arrays = {k: records[wire.ARRAYS][k] for k in records[wire.ARRAYS]}
    key = data.draw(st.sampled_from(sorted(arrays)))
    shape = tuple(arrays[key].shape)
    value = decode16(arrays[key].data, dtype, shape)
    how = data.draw(
        st.sampled_from(
            ["dtype", "stype", "shape", "bytes", "non_finite", "huge", "missing", "unasked"]
        )
    )
    if how == "dtype":
        other = data.draw(st.sampled_from(["float32", "int16", "uint16", "float16", "bfloat16"]))
        if other == dtype:
            other = "float32"
        arrays[key] = Array(other, shape, RAW_STYPE, arrays[key].data)
    elif how == "stype":  # the same values in Flower's numpy serialisation
        arrays[key] = Array(value.astype(np.float16))
    elif how == "shape":  # the same bytes declared with an extra axis
        arrays[key] = Array(dtype, (*shape, 1), RAW_STYPE, arrays[key].data)
    elif how == "bytes":  # two bytes short, or some bytes too many
        raw = arrays[key].data
        extra = data.draw(st.binary(min_size=1, max_size=8))
        arrays[key] = Array(
            dtype, shape, RAW_STYPE, raw[:-2] if data.draw(st.booleans()) else raw + extra
        )
    elif how == "non_finite":
        flat = value.copy().ravel()
        flat[data.draw(st.integers(0, flat.size - 1))] = data.draw(
            st.sampled_from([np.nan, np.inf, -np.inf])
        )
        arrays[key] = Array(dtype, shape, RAW_STYPE, encode16(flat, dtype))
    elif how == "huge":
        arrays[key] = Array(dtype, shape, RAW_STYPE, encode16(value + np.float32(1e4), dtype))
    elif how == "missing":
        del arrays[key]
    else:  # a key the site was not asked for: a group of a modality it lacks, or a made-up one
        unasked = sorted(set(reference) - set(arrays))
        extra = data.draw(st.sampled_from(unasked) if unasked else odd_name(arrays))
        size = reference[extra].shape if extra in reference else (2,)
        zeros = np.zeros(size, np.float32)
        arrays[extra] = Array(dtype, tuple(zeros.shape), RAW_STYPE, encode16(zeros, dtype))
    records[wire.ARRAYS] = ArrayRecord(arrays)
    return f"arrays16.{how}"


@pytest.fixture(params=["float16", "bfloat16"])
def hostile_round16(request, site_round, site_registry, model_config, tmp_path, reply_from):
    """``hostile_round`` with the 16-bit wire and omission: replies as the ClientApp encodes
    them (b_no_cxr sends no cxr group)."""
    dtype = request.param
    global_state, results, replies = site_round
    run = FederationRunConfig(
        scenario_dir=tmp_path, run_dir=tmp_path, min_train_nodes=1, tla_scope="global",
        transport=dtype, omit_unheld=True,
    )  # fmt: skip
    encoded = []
    for result, reply in zip(results, replies, strict=True):
        held = held_modalities(site_registry.declarations[result.audit.site].num_present)
        content = RecordDict({k: reply.content[k] for k in reply.content})
        content[wire.ARRAYS] = encode_update(
            result.state, global_state, run.wire_format(), model_config.modality_names, held
        )
        encoded.append(reply_from(content, reply.metadata.src_node_id))
    bad_reply, good_reply = encoded
    previous = {k: v.numpy() for k, v in global_state.items()}

    def fresh() -> OmniFuseStrategy:
        strategy = OmniFuseStrategy(run, model_config, registry=copy.deepcopy(site_registry))
        strategy.previous = previous
        return strategy

    baseline = fresh()
    arrays, metrics = baseline.aggregate_train(1, [good_reply])
    both = fresh()
    both.aggregate_train(1, [bad_reply, good_reply])
    assert both.records[1].accepted_sites == ["a_full", BAD_SITE]  # the valid replies pass
    return fresh, good_reply, bad_reply, (arrays, metrics, baseline), dtype, previous


@SETTINGS
@given(data=st.data())
def test_a_mutated_16bit_reply_is_rejected_and_the_aggregate_is_the_same_without_it(
    data, hostile_round16, reply_from
):
    fresh, good, bad, baseline, dtype, reference = hostile_round16
    records = {key: bad.content[key] for key in bad.content}
    TRIED[mutate_arrays16(data, records, dtype, reference)] += 1
    strategy = fresh()
    result = strategy.aggregate_train(1, [reply_from(RecordDict(records), BAD_NODE), good])
    _assert_same_as_without(strategy, result, baseline, BAD_NODE, BAD_SITE)


# -- evaluate replies ------------------------------------------------------------------------
@pytest.fixture
def evaluate_round(site_registry, model_config, tmp_path, reply_from):
    run = FederationRunConfig(
        transport="float32", scenario_dir=tmp_path, run_dir=tmp_path, min_train_nodes=1
    )

    def reply(node: int, metrics: dict) -> Message:
        content = RecordDict({wire.METRICS: MetricRecord(metrics)})
        return reply_from(content, node, MessageType.EVALUATE)

    def fresh() -> OmniFuseStrategy:
        return OmniFuseStrategy(run, model_config, registry=copy.deepcopy(site_registry))

    good = reply(11, {wire.NUM_EXAMPLES: 50, wire.VAL_AUROC: 0.7, wire.VAL_AUPRC: 0.6})
    valid = {wire.NUM_EXAMPLES: 40, wire.VAL_AUROC: 0.6, wire.VAL_AUPRC: -1.0}
    expected = fresh().aggregate_evaluate(1, [good])
    return fresh, reply, good, valid, expected


@SETTINGS
@given(data=st.data())
def test_a_mutated_evaluate_reply_is_rejected_and_the_aggregate_is_the_same_without_it(
    data, evaluate_round, site_registry, reply_from
):
    fresh, _, good, valid, expected = evaluate_round
    declared = site_registry.declarations[BAD_SITE].num_val
    bad = {
        wire.NUM_EXAMPLES: not_a_count(declared),
        wire.VAL_AUROC: outside(0.0, 1.0, undefined=-1.0),
        wire.VAL_AUPRC: outside(0.0, 1.0, undefined=-1.0),
    }
    metrics = dict(valid)
    how = data.draw(st.sampled_from(["value", "delete", "extra", "record"]))
    content = None
    if how == "value":
        key = data.draw(st.sampled_from(sorted(bad)))
        metrics[key] = data.draw(bad[key])
    elif how == "delete":
        del metrics[data.draw(st.sampled_from(sorted(metrics)))]
    elif how == "extra":
        metrics[data.draw(odd_name(metrics))] = 1.0
    else:
        content = RecordDict(
            {
                wire.METRICS: MetricRecord(metrics),
                data.draw(odd_name([wire.METRICS])): ConfigRecord(),
            }
        )
    TRIED[f"evaluate.{how}"] += 1
    if content is None:
        content = RecordDict({wire.METRICS: MetricRecord(metrics)})
    mutated = reply_from(content, BAD_NODE, MessageType.EVALUATE)
    strategy = fresh()
    assert strategy.aggregate_evaluate(1, [mutated, good]) == expected
    [problem] = strategy.records[1].evaluate_problems
    assert problem["site"] == BAD_SITE and problem["status"] == "rejected" and problem["reason"]
    assert strategy.records[1].problems == []


def test_a_valid_evaluate_reply_is_averaged(evaluate_round):
    fresh, reply, good, valid, _ = evaluate_round
    merged = fresh().aggregate_evaluate(1, [reply(BAD_NODE, valid), good])
    assert merged[wire.NUM_EXAMPLES] == 90
    assert merged[wire.VAL_AUROC] == pytest.approx((0.7 * 50 + 0.6 * 40) / 90)
    assert merged[wire.VAL_AUPRC] == pytest.approx(0.6)  # -1 (undefined) is skipped


def test_global_tla_counts_for_a_modality_the_site_does_not_hold_are_rejected(
    hostile_round, reply_from
):
    """b_no_cxr trained no cxr sample (num-present.cxr 0): its vote for "cxr" as the
    federation's lazy combination, however large its distance sum, is refused by name."""
    fresh, good, bad, baseline = hostile_round
    records = {key: bad.content[key] for key in bad.content}
    assert dict(records[wire.METRICS])["num-present.cxr"] == 0
    records[wire.TLA_SUMS] = ConfigRecord({"sum.cxr": 1e15, "count.cxr": 5})
    strategy = fresh()
    result = strategy.aggregate_train(1, [reply_from(RecordDict(records), BAD_NODE), good])
    _assert_same_as_without(strategy, result, baseline, BAD_NODE, BAD_SITE)
    assert strategy.records[1].problems[0]["reason"] == "tla-sums:count.cxr:out_of_range:5>0"

"""Complementary suppression and rounded margins: the rounding by hand, the 9-sample example
(on counts, and end to end through a real round, evaluation and registration answer), and
brute-force checks over every integer table the server could infer that no suppressed cell
takes a single value in all of them."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from client.local_training import RoundInstructions, evaluate_global, train_round
from client.registration import site_declaration
from omnifuse_model import federation_schema as wire
from omnifuse_model.batch import InMemoryMultimodalDataset
from omnifuse_model.config import OmniFuseConfig, TrainConfig
from omnifuse_model.federation_replies import check_counts_bound, parse_audit, parse_train_metrics
from omnifuse_model.federation_schema import exact_combination_counts
from omnifuse_model.model import OmniFuse
from omnifuse_model.site_data import SiteDatasets, load_site_datasets
from omnifuse_model.suppression import (
    margin_interval,
    protect_combination_counts,
    published_count,
    statistic_or_none,
    tla_intervals,
)
from tests.federation.conftest import make_site

THREE = ["ehr", "cxr", "rep"]
TWO = ["ehr", "cxr"]


def _cells(names: list[str], values) -> dict[str, int]:
    return dict(zip(exact_combination_counts([], names), values, strict=True))


def _holding(table: dict[str, int], modalities: set[str]) -> int:
    """Samples holding every one of ``modalities`` (a num-present margin for one name)."""
    return sum(v for label, v in table.items() if modalities <= set(label.split("+")))


def feasible_tables(
    reported: dict[str, int | None], intervals: dict[frozenset[str], tuple[int, int]]
) -> list[dict[str, int]]:
    """Brute force: every integer table with the published cells, suppressed cells >= 1 and
    each margin (samples holding every modality of a key; the empty key is the total) in its
    interval [low, high]."""
    hidden = [label for label, value in reported.items() if value is None]
    shown = {k: v for k, v in reported.items() if v is not None}
    low, high = intervals[frozenset()]
    tables = []
    for rest in range(max(0, low - sum(shown.values())), high - sum(shown.values()) + 1):
        for values in _compositions(rest, len(hidden)):
            table = {**shown, **dict(zip(hidden, values, strict=True))}
            if all(lo <= _holding(table, set(k)) <= hi for k, (lo, hi) in intervals.items()):
                tables.append(table)
    return tables


def _compositions(total: int, parts: int):
    """Every tuple of ``parts`` integers >= 1 summing to ``total``."""
    if parts == 0:
        if total == 0:
            yield ()
        return
    for first in range(1, total - parts + 2):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def seen_intervals(
    counts: dict[str, int], names: list[str], threshold: int, margins: bool, rounded: bool
) -> dict[frozenset[str], tuple[int, int]]:
    """What the server knows of the total and (``margins``) every num-present margin."""
    keys = [frozenset()] + ([frozenset([n]) for n in names] if margins else [])
    return {k: margin_interval(_holding(counts, set(k)), threshold, rounded) for k in keys}


def feasible_values(tables: list[dict[str, int]], labels) -> dict[str, set[int]]:
    return {label: {table[label] for table in tables} for label in labels}


def _check(
    counts: dict[str, int], names: list[str], threshold: int, margins: bool, rounded: bool
) -> None:
    result = protect_combination_counts(counts, names, threshold, margins, rounded)
    for label, count in counts.items():
        if 0 < count < threshold:
            assert result.reported[label] is None, (counts, label)
        assert result.reported[label] in (None, count)
        if count == 0:
            assert result.reported[label] == 0
    tables = feasible_tables(
        result.reported, seen_intervals(counts, names, threshold, margins, rounded)
    )
    assert counts in tables
    hidden = [label for label, value in result.reported.items() if value is None]
    for label, values in feasible_values(tables, hidden).items():
        if label in result.exposed:
            assert values == {counts[label]}, (counts, label, values)
        else:
            assert len(values) > 1, (counts, result, label, values)


def test_published_counts_are_rounded_up_to_a_multiple_of_the_threshold():
    assert [published_count(c, 5) for c in (0, 1, 3, 4, 5, 6, 9, 10, 11)] == [
        0,
        5,
        5,
        5,
        5,
        10,
        10,
        10,
        15,
    ]
    assert [published_count(c, 1) for c in (0, 1, 7)] == [0, 1, 7]  # threshold 1: exact
    assert published_count(120, 8) == 120 and published_count(121, 8) == 128
    for bad in ((-1, 5), (3, 0), (2.5, 5)):
        with pytest.raises(ValueError, match="published_count"):
            published_count(*bad)
    # what the server knows from the published value: (P - threshold, P], or exactly 0
    assert margin_interval(3, 5) == (1, 5) and margin_interval(6, 5) == (6, 10)
    assert margin_interval(0, 5) == (0, 0) and margin_interval(6, 5, rounded=False) == (6, 6)


def test_rounding_keeps_the_order_of_counts():
    for threshold in (1, 2, 3, 5, 8):
        published = [published_count(c, threshold) for c in range(60)]
        assert published == sorted(published)
        assert all(c <= p < c + threshold for c, p in zip(range(60), published, strict=True))


def test_the_nine_sample_example_on_counts():
    counts = _cells(THREE, [3, 0, 0, 6, 0, 0, 0])  # ehr 3, ehr+cxr 6
    # exact margins (as sent before rounding): ehr = 9 - num-present.cxr, whatever is hidden
    exact = protect_combination_counts(counts, THREE, 5, rounded=False)
    assert exact.exposed == ("ehr",) and exact.reported["ehr"] is None
    every_cell_hidden = {k: (None if v else 0) for k, v in counts.items()}
    exact_view = seen_intervals(counts, THREE, 5, margins=True, rounded=False)
    assert feasible_values(feasible_tables(every_cell_hidden, exact_view), ["ehr"]) == {"ehr": {3}}
    # rounded margins: num-examples 10, num-present ehr 10, cxr 10, rep 0
    deployed = protect_combination_counts(counts, THREE, 5)
    assert deployed.exposed == () and deployed.primary == ("ehr",)
    assert deployed.reported["ehr"] is None
    view = seen_intervals(counts, THREE, 5, margins=True, rounded=True)
    assert view == {
        frozenset(): (6, 10),
        frozenset(["ehr"]): (6, 10),
        frozenset(["cxr"]): (6, 10),
        frozenset(["rep"]): (0, 0),
    }
    tables = feasible_tables(deployed.reported, view)
    assert feasible_values(tables, ["ehr"]) == {"ehr": {1, 2, 3, 4}}
    assert deployed.complementary == ()  # ehr+cxr = 6 published: ehr still in 1..4
    assert feasible_values(feasible_tables(every_cell_hidden, view), ["ehr"])["ehr"] == {
        1,
        2,
        3,
        4,
    }


def test_with_two_modalities_exact_margins_determine_every_cell_rounded_ones_do_not():
    counts = _cells(TWO, [3, 40, 60])
    exact = protect_combination_counts(counts, TWO, 5, rounded=False)
    assert exact.exposed == ("ehr",) and exact.complementary == ()
    rounded = protect_combination_counts(counts, TWO, 5)
    assert rounded.exposed == () and rounded.reported["ehr"] is None
    audit_only = protect_combination_counts(counts, TWO, 5, public_margins=False)
    assert audit_only.exposed == () and audit_only.reported["ehr"] is None


def test_a_cell_the_rounded_total_would_pin_down_gets_a_complementary_cell():
    """ehr 9, cxr 1 (threshold 5): the total 10 is published as 10, so with ehr = 9 shown,
    cxr = 1 would follow; a further cell is suppressed."""
    counts = _cells(TWO, [9, 1, 0])
    result = protect_combination_counts(counts, TWO, 5, public_margins=False)
    assert result.primary == ("cxr",) and result.complementary == ("ehr",)
    _check(counts, TWO, 5, margins=False, rounded=True)


def test_complementary_cells_are_chosen_smallest_first_and_deterministically():
    counts = _cells(THREE, [40, 3, 7, 50, 60, 7, 300])
    first = protect_combination_counts(counts, THREE, 5, rounded=False)
    assert first == protect_combination_counts(dict(counts), THREE, 5, rounded=False)
    assert first.primary == ("cxr",) and first.complementary[0] == "rep"  # 7, before cxr+rep
    assert [counts[c] for c in first.complementary] == sorted(
        counts[c] for c in first.complementary
    )


def test_no_small_cell_no_suppression():
    counts = _cells(THREE, [40, 0, 7, 50, 60, 7, 300])
    result = protect_combination_counts(counts, THREE, 5)
    assert result.reported == counts and not result.complementary


@pytest.mark.parametrize("rounded", [True, False])
@pytest.mark.parametrize("margins", [True, False])
def test_brute_force_two_modalities(margins, rounded):
    for values in itertools.product(range(5), repeat=3):
        _check(_cells(TWO, values), TWO, 3, margins, rounded)


@pytest.mark.parametrize("rounded", [True, False])
@pytest.mark.parametrize("margins", [True, False])
def test_brute_force_three_modalities(margins, rounded):
    rng = random.Random(0)
    checked = 0
    while checked < 30:
        values = [rng.choice([0, 0, 1, 2, 3, 4, 6]) for _ in range(7)]
        if sum(values) > 14 or not any(0 < v < 3 for v in values):
            continue
        _check(_cells(THREE, values), THREE, 3, margins, rounded)
        checked += 1


def test_rounded_margins_expose_far_fewer_cells_than_exact_ones():
    """Two modalities, every table up to 4 per cell (threshold 3): exact margins expose a
    small cell in most tables, rounded ones only when each of three cells is 1 (the total 3
    is published as 3 and a suppressed cell is >= 1). Three modalities, threshold 5, random
    tables with a small cell: rounded margins expose none."""
    exposed = {True: [], False: []}
    for values in itertools.product(range(5), repeat=3):
        for rounded in (True, False):
            if protect_combination_counts(_cells(TWO, values), TWO, 3, rounded=rounded).exposed:
                exposed[rounded].append(values)
    assert exposed[True] == [(1, 1, 1)] and len(exposed[False]) > 40
    rng = random.Random(2)
    checked, exact_exposed = 0, 0
    while checked < 20:
        values = [rng.choice([0, 0, 1, 2, 3, 4, 5, 7, 10, 20]) for _ in range(7)]
        if not any(0 < v < 5 for v in values):
            continue
        counts = _cells(THREE, values)
        assert protect_combination_counts(counts, THREE, 5).exposed == (), values
        exact_exposed += bool(protect_combination_counts(counts, THREE, 5, rounded=False).exposed)
        checked += 1
    assert exact_exposed > 3


def test_the_tla_counts_a_site_sends_are_part_of_the_check():
    """With TLA sums the server also sees, per combination, the rounded count of samples
    holding all its modalities (or that it is below the threshold): brute force over two-
    and three-modality tables that what is suppressed is still not unique, or is flagged."""
    rng = random.Random(3)
    tables = [_cells(TWO, v) for v in itertools.product(range(5), repeat=3)]
    tables += [_cells(THREE, [rng.choice([0, 0, 1, 2, 3, 4]) for _ in range(7)]) for _ in range(15)]
    for counts in tables:
        names = TWO if len(counts) == 3 else THREE
        mined = {k: _holding(counts, set(k.split("+"))) for k in counts}
        mined = {k: v for k, v in mined.items() if v}
        result = protect_combination_counts(counts, names, 3, tla_counts=mined)
        view = seen_intervals(counts, names, 3, margins=True, rounded=True)
        view.update(
            {frozenset(k.split("+")): v for k, v in tla_intervals(mined, counts, 3).items()}
        )
        feasible = feasible_tables(result.reported, view)
        assert counts in feasible
        hidden = [k for k, v in result.reported.items() if v is None]
        for label, values in feasible_values(feasible, hidden).items():
            assert len(values) > 1 or label in result.exposed, (counts, result, label)
    # counts from a mining pass over other samples are not this table's margins: left out
    counts = _cells(THREE, [3, 0, 0, 6, 0, 0, 0])
    other = protect_combination_counts(counts, THREE, 5, tla_counts={"ehr": 40, "cxr": 2})
    assert other == protect_combination_counts(counts, THREE, 5)


def test_statistics_over_too_few_samples_are_withheld_and_bad_input_is_named():
    assert statistic_or_none(0.8, 4, 5) is None and statistic_or_none(0.8, 5, 5) == 0.8
    with pytest.raises(ValueError, match="threshold 0"):
        protect_combination_counts(_cells(TWO, [1, 2, 3]), TWO, 0)
    with pytest.raises(ValueError, match="'cxr': -1"):
        protect_combination_counts(_cells(TWO, [1, -1, 3]), TWO, 5)
    with pytest.raises(ValueError, match="not in"):
        protect_combination_counts({"ehr": 1, "pet": 2}, TWO, 5)
    with pytest.raises(ValueError, match="pet"):  # without a small cell too
        protect_combination_counts({"ehr": 10, "pet": 20}, TWO, 5)


# -- end to end -------------------------------------------------------------------------------
def _nine_sample_site() -> tuple[OmniFuseConfig, SiteDatasets]:
    """A site with 9 training samples: 3 hold only ehr, 6 hold ehr and cxr, none rep; and 7
    validation samples holding ehr and cxr."""
    config = OmniFuseConfig(
        modalities=[{"name": n, "kind": "vector", "input_dim": 8} for n in THREE],
        task="binary",
        d=8,
        cra_hidden=(16, 8),
        num_blocks=2,
    )
    generator = torch.Generator().manual_seed(0)

    def dataset(rows: list[list[bool]]) -> InMemoryMultimodalDataset:
        availability = torch.tensor(rows)
        inputs = {
            name: torch.randn(len(rows), 8, generator=generator) * availability[:, [i]]
            for i, name in enumerate(THREE)
        }
        labels = (torch.arange(len(rows)) % 2).float().unsqueeze(1)
        return InMemoryMultimodalDataset(inputs, availability, labels)

    train = dataset([[True, False, False]] * 3 + [[True, True, False]] * 6)
    return config, SiteDatasets(train=train, val=dataset([[True, True, False]] * 7))


def test_the_nine_sample_site_end_to_end(caplog):
    """What a real round, evaluation and registration answer of the 9-sample site (threshold
    5) publish; every integer table consistent with all of it leaves ehr-only open; the
    server's screening accepts the reply against the declaration."""
    config, datasets = _nine_sample_site()
    torch.manual_seed(0)
    state = OmniFuse(config).state_dict()
    train = TrainConfig(epochs=1, batch_size=4, progress=False, bootstrap_samples=0)
    instructions = RoundInstructions(config, train, global_round=1, audit_min_count=5)
    with caplog.at_level("WARNING", logger="client.local_training"):
        result = train_round("nine", datasets, instructions, state)
    assert "nine" not in caplog.text  # no cell exposed, nothing to warn about
    metrics = result.metrics
    counts = {
        wire.NUM_EXAMPLES: 10,
        **{wire.present_key(n): v for n, v in zip(THREE, (10, 10, 0), strict=True)},
    }
    assert {k: metrics[k] for k in counts} == counts
    audit = result.audit
    assert audit.num_examples == 10
    assert audit.availability_counts["ehr"] is None
    assert audit.availability_counts["ehr+cxr"] in (None, 6)
    tla = wire.encode_tla_sums(result.laziness, 5) if result.laziness else {}
    assert all(v % 5 == 0 for k, v in tla.items() if k.startswith("count."))
    declaration = site_declaration("nine", datasets, config, threshold=5)
    assert (declaration.num_train, declaration.num_val) == (10, 10)
    assert declaration.num_present == {"ehr": 10, "cxr": 10, "rep": 0}
    evaluated = evaluate_global(datasets, config, state, train, min_count=5)
    assert evaluated[wire.NUM_EXAMPLES] == 10

    # everything the server receives, as intervals on the margins of the training table
    published = {
        frozenset(): metrics[wire.NUM_EXAMPLES],
        **{frozenset([n]): metrics[wire.present_key(n)] for n in THREE},
        **{frozenset(k[6:].split("+")): v for k, v in tla.items() if k.startswith("count.")},
    }
    assert published[frozenset()] == declaration.num_train == audit.num_examples
    assert all(published[frozenset([n])] == declaration.num_present[n] for n in THREE)
    intervals = {k: (0, 0) if p == 0 else (p - 4, p) for k, p in published.items()}
    tables = feasible_tables(audit.availability_counts, intervals)
    truth = exact_combination_counts(datasets.train.availability.tolist(), THREE)
    assert truth in tables
    hidden = [k for k, v in audit.availability_counts.items() if v is None]
    for label, values in feasible_values(tables, hidden).items():
        assert len(values) > 1, (label, values)
    assert feasible_values(tables, ["ehr"])["ehr"] >= {1, 2, 3, 4}

    # the server's screening accepts the honest reply
    parsed = parse_train_metrics(metrics, THREE)
    check_counts_bound(parsed.counts(), declaration, None)
    row = parse_audit(wire.encode_audit(audit), "nine", 1, parsed, THREE)
    assert row.num_examples == 10


def test_a_round_at_a_small_site_withholds_what_too_few_samples_give(model_config):
    """A site with 4 validation samples (threshold 8) sends no validation statistics; its
    small availability cells are suppressed and its counts rounded up to multiples of 8."""
    site = make_site("tiny", ["ehr", "cxr"], 3).model_copy(deep=True)
    site.data.synthetic_sizes = (40, 4)
    datasets = load_site_datasets(site, model_config)
    torch.manual_seed(0)
    state = OmniFuse(model_config).state_dict()
    train = TrainConfig(epochs=1, batch_size=16, progress=False, bootstrap_samples=0)
    instructions = RoundInstructions(model_config, train, global_round=1, audit_min_count=8)
    result = train_round(site.name, datasets, instructions, state)
    assert result.metrics["val-auroc"] == -1.0 and result.metrics["val-auprc"] == -1.0
    assert result.metrics["train-loss"] != -1.0  # 40 training samples
    audit = result.audit
    assert audit.val_auroc is None
    assert set(audit.mean_dwfuse_weight.values()) == {None}
    assert set(audit.imputation_error.values()) == {None}
    availability = datasets.train.availability
    counts = exact_combination_counts(availability.tolist(), ["ehr", "cxr"])
    small = [label for label, count in counts.items() if 0 < count < 8]
    assert small, counts  # the fixture must exercise suppression
    for label, count in counts.items():
        assert audit.availability_counts[label] in ((None,) if label in small else (None, count))
    present = int(availability[:, 1].sum())
    assert result.metrics["num-present.cxr"] == published_count(present, 8)
    assert result.metrics["num-examples"] == audit.num_examples == 40
    metrics = evaluate_global(datasets, model_config, state, train, min_count=8)
    assert metrics["val-auroc"] == -1.0 and metrics["num-examples"] == 8
    assert evaluate_global(datasets, model_config, state, train, min_count=4)["val-auroc"] != -1.0


def test_certificates_decide_as_the_integer_programs_do():
    """``determined_cells`` skips the integer programs for cells a neighbouring feasible
    table moves; over random small tables (every margin and TLA setting) its answer is the
    integer programs' answer for every cell, and most cells need no program."""
    from omnifuse_model.suppression import determined_cells

    rng = random.Random(7)
    cells = skipped = 0
    for trial in range(40):
        names = THREE if trial % 2 else TWO
        labels = exact_combination_counts([], names)
        counts = {label: rng.choice([0, 1, 2, 3, 4, 6, 9, 15]) for label in labels}
        hidden = {label for label, count in counts.items() if count > 0}
        mined = {k: _holding(counts, set(k.split("+"))) for k in labels}
        for options in (
            {"threshold": 5},
            {"threshold": 3, "rounded": False},
            {"threshold": 5, "public_margins": False},
            {"threshold": 5, "tla_counts": mined},
        ):
            fast = determined_cells(counts, hidden, names, **options)
            exact = determined_cells(counts, hidden, names, **options, certificates=False)
            assert fast == exact, (counts, options)
            cells += len(hidden)
            skipped += len(hidden - exact)
    assert cells > 200 and skipped > cells // 2  # the comparison covered undetermined cells

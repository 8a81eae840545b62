"""Implausible EHR values (issue #9, point 7): read as not charted, counted and named, and kept
out of the pooled and the federated normaliser."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest

from client.statistics import site_statistics
from omnifuse_model.data.ehr.discretizer import (
    CHANNEL_OFFSETS,
    PLAUSIBLE_RANGES,
    discretize_episode,
)
from omnifuse_model.data.ehr.episodes import RepairReason, discretize_episode_tolerant
from omnifuse_model.data.ehr.normalizer import check_plausible_aggregates, compute_aggregates
from omnifuse_model.data.features.cache import prepare_site
from omnifuse_model.data.features.site_dataset import load_cached_split
from omnifuse_model.data.ingest import ingest_site
from omnifuse_model.site_config import SiteConfig
from server.statistics_phase import decide
from simulation.synthetic_mimic.writer import SyntheticMimicConfig, write_synthetic_mimic

IHM = "in-hospital-mortality"
WEIGHT = CHANNEL_OFFSETS["Weight"]


def test_an_implausible_value_reads_as_not_charted(write_episode, tmp_path):
    rows = [("1.0", {"hr": "80", "weight": "70.0"}), ("5.0", {"hr": "85", "weight": "-1e30"})]
    bad = write_episode(*rows)
    array, _, report = discretize_episode_tolerant(bad)
    clean = write_episode(rows[0], ("5.0", {"hr": "85"}), name="10011_episode2_timeseries.csv")
    expected, _, _ = discretize_episode_tolerant(clean)
    np.testing.assert_array_equal(array, expected)  # imputed from the previous bin, mask 0
    assert array[2, WEIGHT] == 70.0
    assert report.implausible == {"Weight": 1}
    assert report.repairs == {RepairReason.IMPLAUSIBLE_VALUE: 1}
    # The strict reference discretiser keeps it: that is what used to reach the normaliser.
    strict, _ = discretize_episode(bad)
    assert strict[2, WEIGHT] == np.float32(-1e30)
    with pytest.raises(ValueError, match=r"'Weight'.*\[1, 700\] kg"):
        check_plausible_aggregates(compute_aggregates([strict]), "test")


def test_range_bounds_are_inclusive(write_episode):
    low, high, _ = PLAUSIBLE_RANGES["pH"]
    path = write_episode(("1.0", {"ph": repr(low)}), ("3.0", {"ph": repr(high)}))
    array, _, report = discretize_episode_tolerant(path)
    assert report.implausible == {} and not report.repairs
    assert array[0, CHANNEL_OFFSETS["pH"]] == low


def make_site(root: Path, name: str, cache: Path) -> SiteConfig:
    return SiteConfig(
        name=name, task=IHM, modalities=["ehr"], cache_dir=cache, device="cpu",
        data={"benchmark_dir": root / IHM},
    )  # fmt: skip


def set_weight(episode: Path, value: str) -> None:
    """Set the Weight cell of the first data row to ``value``."""
    rows = list(csv.reader(io.StringIO(episode.read_text(encoding="utf-8"))))
    rows[1][rows[0].index("Weight")] = value
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    episode.write_text(buffer.getvalue(), encoding="utf-8")


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("plausible")
    write_synthetic_mimic(SyntheticMimicConfig(num_stays=24, seed=4, image_size=32), base / "a")
    write_synthetic_mimic(SyntheticMimicConfig(num_stays=24, seed=9, image_size=32), base / "b")
    shutil.copytree(base / "a", base / "a_bad")
    site = make_site(base / "a", "a", base / "unused")
    stay = ingest_site(site).split("train")[0].stay
    set_weight(base / "a" / IHM / "train" / stay, "")  # the same data without the value
    set_weight(base / "a_bad" / IHM / "train" / stay, "-1e30")
    return {"a": base / "a", "a_bad": base / "a_bad", "b": base / "b", "stay": Path(stay)}


def federated_normalizer(sites: list[SiteConfig]):
    """The normaliser the statistics phase builds from these sites' answers."""
    answers = {site.name: site_statistics(site, ["ehr"], min_count=1) for site in sites}
    decided = decide(answers, {})
    assert not decided.excluded
    return decided.normalizer.normalizer()


def test_one_extreme_value_leaves_the_federated_std_unchanged(roots, tmp_path):
    clean = make_site(roots["a"], "hospital_a", tmp_path / "clean")
    bad = make_site(roots["a_bad"], "hospital_a", tmp_path / "bad")
    other = make_site(roots["b"], "hospital_b", tmp_path / "other")
    for site in (clean, bad, other):
        prepare_site(site, progress=False)
    with_value = federated_normalizer([bad, other])
    without = federated_normalizer([clean, other])
    np.testing.assert_array_equal(with_value.stds, without.stds)
    np.testing.assert_array_equal(with_value.means, without.means)
    assert with_value.stds[WEIGHT] < 100  # was 2.1e29 before the range check

    result = ingest_site(bad)
    stay = next(s for s in result.stays if s.stay == str(roots["stay"]))
    assert stay.outcomes["ehr"].status == "repaired"
    assert "Weight x1 (expected [1, 700] kg)" in stay.outcomes["ehr"].detail
    report = result.report().to_dict()
    assert report["implausible_values"] == {
        "Weight": {"values": 1, "stays": 1, "expected": "[1, 700] kg"}
    }
    assert report["totals"]["ehr"]["repaired_by_reason"]["implausible_value"] == 1
    assert report["problems"] == []  # a repair, not a rejection of the stay's EHR
    assert ingest_site(clean).report().to_dict()["implausible_values"] == {}
    # The training features are the cleaned ones too.
    train = load_cached_split(bad, "train", normalizer=with_value)
    assert train.inputs["ehr"].abs().max() < 1e3

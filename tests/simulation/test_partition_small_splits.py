"""`omnifuse partition` warns about, or with --strict refuses, a site split too small to
score (fewer stays than the audit threshold, or no/too few positives or negatives)."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulation.cli import main
from simulation.split_scoring import split_problems
from simulation.synthetic_mimic.writer import SyntheticMimicConfig, write_synthetic_mimic

HEADER = ["stay", "period_length", "y_true"]


def _rows(positives: int, negatives: int) -> list[list[str]]:
    return [[f"{i}_e.csv", "48", "1"] for i in range(positives)] + [
        [f"{i}_e.csv", "48", "0"] for i in range(negatives)
    ]


def test_split_problems_counts_stays_and_each_class():
    task = "in-hospital-mortality"
    assert split_problems(_rows(5, 20), HEADER, task, 5) is None
    assert split_problems(_rows(0, 3), HEADER, task, 5) == "3 stays (fewer than 5)"
    assert split_problems(_rows(0, 30), HEADER, task, 5) == (
        "0 positive and 30 negative of 30 stays (fewer than 5 of a class)"
    )
    assert "4 positive" in split_problems(_rows(4, 30), HEADER, task, 5)
    assert split_problems(_rows(30, 2), HEADER, task, 2) is None
    assert split_problems([["1_e.csv"] + ["0"] * 25] * 6, ["stay"], "phenotyping", 5) is None


@pytest.fixture(scope="module")
def mimic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mimic") / "data"
    write_synthetic_mimic(
        SyntheticMimicConfig(num_stays=80, seed=5, image_size=32), out, progress=False
    )
    return out


def _partition(mimic: Path, out: Path, *extra: str) -> int:
    return main(["partition", "--data", str(mimic), "--out", str(out), "--sites", "4", *extra])


def test_small_validation_splits_are_warned_about_with_their_numbers(mimic, tmp_path, capsys):
    assert _partition(mimic, tmp_path / "p") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: site 'hospital_a' val split:" in out
    assert "too small to score" in out and "(fewer than 5" in out
    assert (tmp_path / "p" / "scenario.json").is_file()


def test_strict_refuses_before_writing_anything(mimic, tmp_path, capsys):
    code = _partition(mimic, tmp_path / "p", "--strict")
    captured = capsys.readouterr()
    assert code == 1
    (line,) = [x for x in captured.err.splitlines() if x.strip()]
    assert line.startswith("error: partition --strict: splits too small to score: site '")
    assert "smaller --min-count" in line and "Traceback" not in captured.err
    assert not (tmp_path / "p").exists()


def test_a_split_without_positives_is_flagged_even_at_threshold_one(mimic, tmp_path, capsys):
    assert _partition(mimic, tmp_path / "p", "--sites", "1", "--min-count", "1") == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "val split: 0 positive and 4 negative of 4 stays (fewer than 1 of a class)" in out


@pytest.mark.parametrize(
    "names", [["hospital_a", "hospital_b", "server_test"], ["hospital_north_general_long"]]
)
def test_the_sites_table_fits_80_columns_and_never_cuts_a_name(names):
    import io

    from rich.console import Console

    from simulation.partition import _print_table

    console = Console(width=80, record=True, file=io.StringIO())
    rows = [
        {"site": n, "modalities": "ehr+cxr+rep", "subjects": 1200, "train_stays": 3000}
        | {"val_stays": 400, "test_stays": 0, "train_positive": 400, "cxr_images": 2500}
        | {"reports": 2000}
        for n in names
    ]
    _print_table(console, rows)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    flat = " ".join(text.split())
    for name in names:
        assert f" {name} " in f" {flat} " or f"= {name}" in flat, name

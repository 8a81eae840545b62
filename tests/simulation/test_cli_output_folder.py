"""`omnifuse partition`, `train` and `synth` write only into a new or empty folder (or, for
partition and train, one holding an earlier run of theirs): never '/', the repository, a
file, another non-empty folder, or the input data's folder. Each refusal is one line naming
the option, exit code 1, and nothing is written. The inputs here are empty or missing, so
that even a command that ignored --out would fail before writing anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulation.cli import main
from simulation.safe_paths import REPOSITORY


def _refused(capsys, argv: list[str], *needles: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def data(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


@pytest.mark.parametrize(
    ("out", "expected"),
    [("/", "root folder"), (str(REPOSITORY), "repository"), (str(REPOSITORY.parent), "above it")],
)
def test_partition_refuses_root_and_repository(data, capsys, out, expected):
    _refused(capsys, ["partition", "--data", str(data), "--out", out], "partition --out", expected)


@pytest.mark.parametrize("inside", ["", "views"])
def test_partition_refuses_the_data_folder(data, capsys, inside):
    out = data / inside if inside else data
    _refused(
        capsys, ["partition", "--data", str(data), "--out", str(out)], "overlaps the input folder"
    )
    assert list(data.iterdir()) == []


def test_partition_refuses_a_file_and_a_foreign_folder(data, tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    _refused(capsys, ["partition", "--data", str(data), "--out", str(file)], "is a file")
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("keep me")
    argv = ["partition", "--data", str(data), "--out", str(folder)]
    _refused(capsys, argv, "not empty", "scenario.json")
    assert [p.name for p in folder.iterdir()] == ["thesis.tex"]


@pytest.mark.parametrize("out", ["/", str(REPOSITORY)])
def test_train_refuses_root_and_repository(tmp_path, capsys, out):
    argv = ["train", "--scenario", str(tmp_path / "missing"), "--out", out]
    _refused(capsys, argv, "train --out")


def test_train_refuses_the_scenario_folder(tmp_path, capsys):
    scenario = tmp_path / "scenario"
    scenario.mkdir()
    argv = ["train", "--scenario", str(scenario), "--out", str(scenario / "run")]
    _refused(capsys, argv, "train --out", "overlaps the input folder")


def test_synth_refuses_the_repository(capsys):
    argv = ["synth", "--out", str(REPOSITORY / "tests"), "--stays", "1"]
    _refused(capsys, argv, "synth --out", "not empty")

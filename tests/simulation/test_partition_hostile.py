"""`omnifuse partition` on hostile input: nothing outside --out is written, linked or
removed; a bad row is named by file and line and ends the command with exit code 1."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from omnifuse_model.site_config import SiteConfig
from simulation.cli import main
from simulation.partition import InputRowError, PartitionConfig, SitePlan, partition
from simulation.safe_paths import UnsafePathError, inside, link_or_copy, remove_tree
from simulation.synthetic_mimic.writer import SyntheticMimicConfig, write_synthetic_mimic

TRAVERSAL_ROW = "12345678_../../../../victim.txt,0"
TASK = "in-hospital-mortality"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mimic") / "data"
    write_synthetic_mimic(
        SyntheticMimicConfig(num_stays=60, seed=5, image_size=32), out, progress=False
    )
    return out


@pytest.fixture
def data(source, tmp_path) -> Path:
    """A private copy of the source whose listfiles a test may spoil."""
    copy = tmp_path / "data"
    shutil.copytree(source, copy, symlinks=True)
    return copy


def _edit_listfile(data: Path, split: str, edit) -> Path:
    listfile = data / TASK / f"{split}_listfile.csv"
    lines = listfile.read_text().splitlines()
    listfile.write_text("\n".join(edit(lines)) + "\n")
    return listfile


def _partition_cli(data: Path, out: Path, capsys) -> tuple[int, str]:
    code = main(["partition", "--data", str(data), "--out", str(out), "--sites", "2"])
    return code, capsys.readouterr().err


def test_traversal_row_is_refused_before_anything_is_touched(data, tmp_path, capsys):
    out = tmp_path / "deep" / "out"
    listfile = _edit_listfile(data, "train", lambda lines: [*lines, TRAVERSAL_ROW])
    line = len(listfile.read_text().splitlines())
    # every place the row's path leads to, from the site views and from the source
    victims = [tmp_path / "victim.txt", tmp_path / "deep" / "victim.txt"]
    for site in ("hospital_a", "hospital_b", "server_test"):
        for folder in ("train", "test"):
            landing = os.path.normpath(out / site / TASK / folder / TRAVERSAL_ROW.split(",")[0])
            victims.append(Path(landing))
    victims.append(Path(os.path.normpath(data / TASK / "train" / TRAVERSAL_ROW.split(",")[0])))
    for victim in victims:
        victim.parent.mkdir(parents=True, exist_ok=True)
        victim.write_text("precious\n")
    (out / "scenario.json").write_text("earlier run\n")  # else --out is refused as not empty

    code, err = _partition_cli(data, out, capsys)

    assert code == 1
    assert f"train_listfile.csv, line {line}" in err and "12345678_../../../../victim.txt" in err
    assert len(err.strip().splitlines()) == 1, err
    for victim in victims:
        assert not victim.is_symlink() and victim.read_text() == "precious\n", victim
    assert (out / "scenario.json").read_text() == "earlier run\n"


def test_link_stays_inside_its_folder_and_never_replaces_a_file(tmp_path):
    site = tmp_path / "site"
    train = site / TASK / "train"
    source = tmp_path / "source.csv"
    source.write_text("data\n")
    victim = site / "victim.txt"  # where the row leads from train/
    victim.parent.mkdir(parents=True)
    victim.write_text("precious\n")
    with pytest.raises(UnsafePathError, match="outside"):
        link_or_copy(source, train / TRAVERSAL_ROW.split(",")[0], root=train)
    assert not victim.is_symlink() and victim.read_text() == "precious\n"

    owned = train / "1_episode1_timeseries.csv"
    owned.parent.mkdir(parents=True, exist_ok=True)
    owned.write_text("not a link\n")
    with pytest.raises(FileExistsError, match="not replaced"):
        link_or_copy(source, owned, root=site)
    assert owned.read_text() == "not a link\n"

    link = train / "2_episode1_timeseries.csv"
    link_or_copy(source, link, root=site)
    link_or_copy(source, link, root=site)  # the same link again: kept
    assert link.is_symlink() and link.read_text() == "data\n"


def test_symlinked_folder_leading_out_is_caught(tmp_path):
    root, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "site").symlink_to(elsewhere)
    with pytest.raises(UnsafePathError):
        inside(root, root / "site" / "file.csv")
    (elsewhere / "keep").write_text("x")
    remove_tree(root, root / "site")  # the link itself is ours: removed, not its target
    assert (elsewhere / "keep").read_text() == "x"


def test_site_named_dotdot_is_refused_and_the_parent_survives(data, tmp_path, capsys):
    out = tmp_path / "parent" / "out"
    sibling = tmp_path / "parent" / "sibling.txt"
    sibling.parent.mkdir()
    sibling.write_text("keep\n")
    config = tmp_path / "partition.toml"
    config.write_text(f'data_dir = "{data}"\n\n[[sites]]\nname = ".."\n\n[[sites]]\nname = "b"\n')
    code = main(["partition", "--config", str(config), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "sites.0.name" in err and "'..'" in err
    assert sibling.read_text() == "keep\n"
    with pytest.raises(UnsafePathError):
        remove_tree(out, out / "..")
    assert sibling.read_text() == "keep\n"


@pytest.mark.parametrize("name", ["..", ".", "a.b", "../x", "a/b", "", "-x", "x" * 65, "a\\b"])
def test_unsafe_site_names_are_refused(name):
    with pytest.raises(ValidationError):
        SitePlan(name=name)
    with pytest.raises(ValidationError):
        SiteConfig(name=name, modalities=["ehr"])


def test_safe_site_names_pass():
    for name in ("hospital_a", "site-1", "A", "x" * 64):
        assert SitePlan(name=name).name == name
    with pytest.raises(ValidationError, match="server_test"):
        PartitionConfig(data_dir=Path("."), sites=[SitePlan(name="server_test")])


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda lines: [lines[0], "", *lines[1:]], "line 2: blank line"),
        (lambda lines: [*lines[:2], lines[2].rsplit(",", 1)[0] + ",nan", *lines[3:]], "line 3"),
        (lambda lines: [*lines[:2], lines[2].rsplit(",", 1)[0] + ",yes", *lines[3:]], "'yes'"),
        (lambda lines: [*lines[:2], lines[2].rsplit(",", 1)[0] + ",2", *lines[3:]], "0 or 1"),
        (lambda lines: [*lines, "notes.csv,1"], "'notes.csv'"),
        (lambda lines: [*lines, "1_episode1_timeseries.csv"], "1 cells, expected 2"),
    ],
    ids=["blank", "nan", "word", "two", "stay-name", "short"],
)
def test_bad_rows_name_file_and_line_and_exit_1(data, tmp_path, capsys, edit, expected):
    _edit_listfile(data, "val", edit)
    code, err = _partition_cli(data, tmp_path / "out", capsys)
    assert code == 1
    assert "val_listfile.csv, line" in err and expected in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_bad_subject_in_all_stays_is_named(data, tmp_path):
    stays = data / "root" / "all_stays.csv"
    lines = stays.read_text().splitlines()
    column = [h.lower() for h in lines[0].split(",")].index("subject_id")
    cells = lines[1].split(",")
    cells[column] = "NaN"
    stays.write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    config = PartitionConfig(data_dir=data, sites=[SitePlan(name="a"), SitePlan(name="b")])
    with pytest.raises(InputRowError, match=r"all_stays.csv, line 2: subject_id is 'NaN'"):
        partition(config, tmp_path / "out")


def test_links_planted_in_the_output_folder_are_not_written_through(data, tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("precious\n")
    (out / "scenario.json").symlink_to(elsewhere / "keep.txt")
    (out / "hospital_a").symlink_to(elsewhere)
    partition(PartitionConfig(data_dir=data, sites=[SitePlan(name="hospital_a")]), out)
    assert (elsewhere / "keep.txt").read_text() == "precious\n"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]
    assert not (out / "scenario.json").is_symlink() and not (out / "hospital_a").is_symlink()
    assert (out / "hospital_a" / "site.toml").is_file()

"""Hostile values of the `omnifuse` numeric options are refused at the command line, before
any work starts, with the option's name and the range it takes (argparse: exit code 2)."""

from __future__ import annotations

import pytest

from simulation.cli import main


def _refused(capsys, argv: list[str], option: str, expected: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert f"argument {option}:" in err and expected in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--sites", "-1", "integer from 1 to 999"),
        ("--sites", "0", "integer from 1 to 999"),
        ("--seed", "-1", "integer from 0 to 4294967295"),
        ("--size-skew", "inf", "finite number in [0, 5]"),
        ("--size-skew", "-1", "finite number in [0, 5]"),
        ("--size-skew", "nan", "finite number in [0, 5]"),
        ("--min-count", "-5", "integer from 1 to 1000000"),
        ("--alpha", "0", "finite number in (0"),
    ],
)
def test_partition_numbers_out_of_range(tmp_path, capsys, option, value, expected):
    argv = ["partition", "--data", str(tmp_path), "--out", str(tmp_path / "o"), option, value]
    _refused(capsys, argv, option, expected)


def test_train_seed_too_large_for_the_generators(tmp_path, capsys):
    argv = ["train", "--out", str(tmp_path / "run"), "--seed", "99999999999999999999"]
    _refused(capsys, argv, "--seed", "integer from 0 to 4294967295")


def test_prepare_workers_bounded(capsys):
    _refused(capsys, ["prepare", "--workers", "100000"], "--workers", "integer from 0 to")


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ("seed = -1", "seed"),
        ("seed = 99999999999999999999", "seed"),
        ("label_alpha = inf", "label_alpha"),
        ('sites = [{name = "a", size_weight = inf}]', "sites.0.size_weight"),
    ],
)
def test_partition_config_numbers_out_of_range(tmp_path, capsys, toml, field):
    config = tmp_path / "partition.toml"
    sites = "" if toml.startswith("sites") else 'sites = [{name = "a"}]\n'
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n{sites}{toml}\n')
    code = main(["partition", "--config", str(config), "--out", str(tmp_path / "out")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1 and f"partition --config {config}" in err and field in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("toml", ["seed = 99999999999999999999", "lr = inf"])
def test_train_config_numbers_out_of_range(tmp_path, capsys, toml):
    config = tmp_path / "run.toml"
    config.write_text(f"[train]\n{toml}\n")
    code = main(["train", "--config", str(config), "--out", str(tmp_path / "run")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1 and toml.split()[0] in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()

"""Site configs: every shipped example parses; errors name the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omnifuse_model.site_config import SiteConfigError, load_site_config
from simulation.cli import main

EXAMPLES = sorted(Path(__file__).resolve().parents[2].joinpath("site_configs").glob("*.toml"))


def test_there_are_three_example_hospitals():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_example_validates(path):
    site = load_site_config(path)
    assert site.name == path.stem
    assert set(site.modalities) <= {"ehr", "cxr", "rep"}


def test_relative_paths_resolve_against_the_file(tmp_path):
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "s.toml").write_text(
        'name = "s"\nmodalities = ["ehr"]\ncache_dir = "cache"\n'
        '[data]\nbenchmark_dir = "data/ihm"\n'
    )
    site = load_site_config(folder / "s.toml")
    assert site.cache_dir == (folder / "cache").resolve()
    assert site.data.benchmark_dir == (folder / "data" / "ihm").resolve()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('name = "s"\nmodalities = []\n[data]\nbenchmark_dir = "x"\n', "modalities"),
        (
            'name = "s"\nmodalities = ["ehr"]\ndevice = "tpu"\n[data]\nbenchmark_dir = "x"\n',
            "device",
        ),
        (
            'name = "s"\nmodalities = ["ehr"]\n[data]\nsource = "feature_cache"\n',
            "data.benchmark_dir",
        ),
        ('name = "s"\nmodalities = ["ehr"]\ncolour = 1\n[data]\nbenchmark_dir = "x"\n', "colour"),
        (
            'name = "s"\nmodalities = ["ehr"]\n[data]\nbenchmark_dir = "x"\n'
            "[privacy]\ntarget_epsilon = -1\n",
            "privacy.target_epsilon",
        ),
    ],
)
def test_errors_name_the_file_and_the_field(tmp_path, body, field):
    path = tmp_path / "bad_site.toml"
    path.write_text(body)
    with pytest.raises(SiteConfigError) as error:
        load_site_config(path)
    assert "bad_site.toml" in str(error.value) and field in str(error.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SiteConfigError, match="not found"):
        load_site_config(tmp_path / "none.toml")
    (tmp_path / "broken.toml").write_text("name = ")
    with pytest.raises(SiteConfigError, match="broken.toml: not valid TOML"):
        load_site_config(tmp_path / "broken.toml")


def test_cli_validate_config_and_schema(tmp_path, capsys):
    assert main(["validate-config", *map(str, EXAMPLES)]) == 0
    (tmp_path / "bad.toml").write_text('name = "s"\nmodalities = ["ehr"]\n')
    assert main(["validate-config", str(tmp_path / "bad.toml")]) == 1
    assert "bad.toml" in capsys.readouterr().out
    out = tmp_path / "schema.json"
    assert main(["site-config-schema", "--out", str(out)]) == 0
    schema = json.loads(out.read_text())
    assert {"name", "modalities", "data", "privacy"} <= set(schema["properties"])

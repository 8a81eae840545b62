"""`omnifuse validate-config` refuses what a site config must not say: a modality listed
twice, a name the site's data source does not have (names are case-sensitive), and
non-finite or absurd training and privacy numbers. Each message names the file and field."""

from __future__ import annotations

import pytest

from simulation.cli import main

SITE = """name = "hospital_a"
modalities = {modalities}

[data]
benchmark_dir = "in-hospital-mortality"
{extra}
"""


def _validate(tmp_path, capsys, modalities: str = '["ehr", "cxr"]', extra: str = "") -> str:
    site = tmp_path / "site.toml"
    site.write_text(SITE.format(modalities=modalities, extra=extra))
    code = main(["validate-config", str(site)])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "invalid" in out and str(site) in " ".join(out.split()), out
    return " ".join(out.split())


@pytest.mark.parametrize(
    ("modalities", "expected"),
    [
        ('["ehr", "ehr", "cxr"]', "['ehr'] listed more than once"),
        ('["ehr", "xyz"]', "['xyz'] are not modalities"),
        ('["EHR", "cxr"]', "['EHR'] are not modalities"),
    ],
)
def test_modalities_repeated_or_unknown(tmp_path, capsys, modalities, expected):
    assert expected in _validate(tmp_path, capsys, modalities=modalities)


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("[training]\nlr = inf", "training.lr"),
        ("[training]\nbatch_size = 1e11", "training.batch_size"),
        ("[privacy]\ntarget_epsilon = inf", "privacy.target_epsilon"),
        ("[privacy]\nmax_grad_norm = inf", "privacy.max_grad_norm"),
    ],
)
def test_non_finite_or_absurd_numbers(tmp_path, capsys, section, field):
    assert f"field '{field}'" in _validate(tmp_path, capsys, extra=section)


def test_a_synthetic_site_holds_only_its_generator_modalities(tmp_path, capsys):
    synthetic = (
        'source = "synthetic_features"\n[data.synthetic]\nmodalities = [\n'
        '  {name = "a", dim = 2, signal = 1.0, noise = 1.0},\n'
        '  {name = "b", dim = 2, signal = 1.0, noise = 1.0},\n]'
    )
    out = _validate(tmp_path, capsys, modalities='["a", "ehr"]', extra=synthetic)
    assert "['ehr'] are not modalities of data.synthetic ['a', 'b']" in out

"""`omnifuse experiment`: cells, resume, paired differences, report, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulation import experiment_cells
from simulation.cli import main
from tests.simulation.prepared_fixtures import feature_scenario

EXPERIMENTS = Path(__file__).resolve().parents[2] / "simulation" / "experiments"

TINY = """
name = "tiny"
seeds = [0, 1]
reference = "central"
bootstrap_resamples = 100
[model]
d = 8
num_blocks = 1
cra_hidden = [16, 8]
[train]
epochs = 1
batch_size = 64
patience = 0
progress = false
bootstrap_samples = 0
[federation]
rounds = 1
local_epochs = 1
[[scenarios]]
name = "syn"
synthetic = { sites = 2, train_per_site = 40, val_per_site = 20, test_size = 60 }
[[methods]]
name = "central"
mode = "centralised"
ablation_row = "b"
[[methods]]
name = "local"
mode = "local"
ablation_row = "b"
"""


@pytest.fixture
def counted(monkeypatch):
    """Counts the cells actually trained (run_cell calls)."""
    calls: list[str] = []
    real = experiment_cells.run_cell

    def run_cell(cell, data, config):
        calls.append(cell.key)
        return real(cell, data, config)

    monkeypatch.setattr(experiment_cells, "run_cell", run_cell)
    return calls


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.toml"
    path.write_text(text)
    return path


def test_a_rerun_skips_finished_cells_and_reruns_changed_or_missing_ones(tmp_path, counted):
    config, out = _write(tmp_path, TINY), tmp_path / "out"
    assert main(["experiment", str(config), "--out", str(out)]) == 0
    assert len(counted) == 4  # 2 methods x 1 variant x 2 seeds
    first = json.loads((out / "results.json").read_text())
    assert first["cells"] == {"total": 4, "trained": 4, "skipped": 0}

    assert main(["experiment", str(config), "--out", str(out)]) == 0
    assert len(counted) == 4  # nothing retrained
    again = json.loads((out / "results.json").read_text())
    assert again["cells"] == {"total": 4, "trained": 0, "skipped": 4}
    assert again["results"] == first["results"]

    (out / "cells" / "local" / "syn__all__mr0.00" / "seed1" / "result.json").unlink()
    assert main(["experiment", str(config), "--out", str(out)]) == 0
    assert counted[4:] == ["local/syn__all__mr0.00/seed1"]

    changed = _write(
        tmp_path,
        TINY.replace(
            'name = "local"\nmode = "local"\nablation_row = "b"',
            'name = "local"\nmode = "local"\nablation_row = "a"',
        ),
    )
    assert main(["experiment", str(changed), "--out", str(out)]) == 0
    assert sorted(counted[5:]) == ["local/syn__all__mr0.00/seed0", "local/syn__all__mr0.00/seed1"]


def test_paired_differences_are_per_seed_and_the_report_has_a_table_and_plot(tmp_path):
    out = tmp_path / "out"
    assert main(["experiment", str(_write(tmp_path, TINY)), "--out", str(out)]) == 0
    document = json.loads((out / "results.json").read_text())
    auroc = {(r["cell"]["method"], r["cell"]["seed"]): r["result"]["auroc"]
             for r in document["results"]}  # fmt: skip
    local = next(row for row in document["summary"] if row["method"] == "local")
    diff = local["auroc"]["diff_vs_reference"]
    assert diff["values"] == pytest.approx(
        [auroc["local", s] - auroc["central", s] for s in (0, 1)]
    )
    assert diff["ci_low"] <= diff["mean"] <= diff["ci_high"]
    local_cell = next(r for r in document["results"] if r["cell"]["method"] == "local")
    assert sorted(local_cell["result"]["per_site"]) == ["site_0", "site_1"]
    report = (out / "report.md").read_text()
    assert "| central |" in report and "| local |" in report and "(reference)" in report
    assert (out / "syn_auroc.png").is_file() and "syn_auroc.png" in report
    cell = json.loads(
        (out / "cells" / "central" / "syn__all__mr0.00" / "seed0" / "result.json").read_text()
    )
    assert cell["config"]["model"]["fusion"] == "dwfuse" and cell["config"]["seed"] == 0


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (('reference = "central"', 'reference = "nobody"'), "reference"),
        (('mode = "local"', 'mode = "hybrid"'), "mode"),
        (("seeds = [0, 1]", "seeds = [0, 0]"), "seeds"),
        (("[federation]", "[federation]\nround = 3"), "round"),
    ],
)
def test_a_bad_config_is_one_clear_line_and_exit_1(tmp_path, capsys, change, expected):
    config = _write(tmp_path, TINY.replace(*change))
    assert main(["experiment", str(config), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "experiment.toml" in err and expected in err
    assert not (tmp_path / "out").exists()


def test_quick_config_dry_runs(capsys):
    assert (
        main(["experiment", str(EXPERIMENTS / "quick.toml"), "--out", "unused", "--dry-run"]) == 0
    )
    out = capsys.readouterr().out
    assert "20 cells" in out and "omnifuse-fed/synthetic__all__mr0.50/seed1" in out


def test_table4_config_validates_and_plans_rows_by_subsets_and_the_missing_rate_curve(
    tmp_path, capsys
):
    scenario = feature_scenario(tmp_path / "scenario")
    args = ["experiment", str(EXPERIMENTS / "table4.toml"), "--out", str(tmp_path / "o")]
    dirs = ["--scenario-dir", f"table4={scenario}", "--scenario-dir", f"missing={scenario}"]
    assert main([*args, *dirs, "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 6 rows x 4 subsets x 5 seeds + rows c and f x 10 missing rates x 5 seeds
    assert f"{6 * 4 * 5 + 2 * 10 * 5} cells" in out
    assert "row_a/table4__ehr+cxr__mr0.00/seed0" in out
    assert "row_f/missing__all__mr0.90/seed4" in out
    assert "row_a/missing" not in out


def test_table4_without_its_scenario_names_the_missing_file(tmp_path, capsys):
    args = ["experiment", str(EXPERIMENTS / "table4.toml"), "--out", str(tmp_path / "o")]
    assert main([*args, "--scenario-dir", f"table4={tmp_path}", "--dry-run"]) == 1
    assert "scenario.json" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_config_runs_federated_centralised_and_local_with_a_missing_rate_curve(tmp_path):
    out = tmp_path / "quick"
    assert main(["experiment", str(EXPERIMENTS / "quick.toml"), "--out", str(out)]) == 0
    document = json.loads((out / "results.json").read_text())
    modes = {r["cell"]["mode"] for r in document["results"]}
    assert modes == {"federated", "centralised", "local"}
    assert all(0.0 <= r["result"]["auroc"] <= 1.0 for r in document["results"])
    assert (out / "synthetic_missing_rate.png").is_file()


@pytest.mark.slow
def test_table4_config_runs_on_a_tiny_prepared_mimic_format_scenario(tmp_path):
    """table4.toml as shipped (methods, subsets, scenarios), only smaller: one seed, a tiny
    model, one epoch and two missing rates, on synth -> partition -> prepare at tiny size."""
    import tomllib

    import tomli_w

    from simulation.partition import PartitionConfig, default_site_plans, partition
    from simulation.preparation import prepare_scenario
    from simulation.synthetic_mimic.writer import SyntheticMimicConfig, write_synthetic_mimic

    data = tmp_path / "data"
    write_synthetic_mimic(SyntheticMimicConfig(num_stays=160, seed=3, image_size=32), data)
    scenario = tmp_path / "scenario"
    plans = default_site_plans(2, seed=0)
    partition(PartitionConfig(data_dir=data, sites=plans, seed=0, d=8), scenario)
    prepare_scenario(scenario)
    config = tomllib.loads((EXPERIMENTS / "table4.toml").read_text())
    config |= {"seeds": [0], "model": {"d": 8, "num_blocks": 1, "cra_hidden": [16, 8]}}
    config["train"] |= {"epochs": 1}
    config["scenarios"][1]["missing_rates"] = [0.0, 0.5]
    small = tmp_path / "table4_small.toml"
    small.write_text(tomli_w.dumps(config))
    out = tmp_path / "out"
    dirs = ["--scenario-dir", f"table4={scenario}", "--scenario-dir", f"missing={scenario}"]
    assert main(["experiment", str(small), "--out", str(out), *dirs]) == 0
    document = json.loads((out / "results.json").read_text())
    assert document["cells"]["total"] == 6 * 4 + 2 * 2
    report = (out / "report.md").read_text()
    assert "## table4: cxr+rep" in report and "## missing: all modalities" in report
    assert (out / "missing_missing_rate.png").is_file() and (out / "table4_auroc.png").is_file()
    assert all(r["result"]["n_test"] > 0 for r in document["results"])


def test_a_federated_cell_runs_the_apps_round_and_aggregation_functions(tmp_path, monkeypatch):
    import client.local_training
    import server.aggregation

    trained, aggregated = [], []
    real_train, real_aggregate = (
        client.local_training.train_round,
        server.aggregation.aggregate_states,
    )

    def train_round(site_name, datasets, instructions, state):
        trained.append((site_name, instructions.global_round))
        return real_train(site_name, datasets, instructions, state)

    def aggregate_states(states, counts, names, previous, **options):
        aggregated.append(options["modality_aware"])
        return real_aggregate(states, counts, names, previous, **options)

    monkeypatch.setattr(client.local_training, "train_round", train_round)
    monkeypatch.setattr(server.aggregation, "aggregate_states", aggregate_states)
    text = TINY.replace("rounds = 1", "rounds = 2").replace("seeds = [0, 1]", "seeds = [0]")
    text = text.replace('mode = "local"', 'mode = "federated"\nmodality_aware = false')
    assert main(["experiment", str(_write(tmp_path, text)), "--out", str(tmp_path / "o")]) == 0
    assert trained == [("site_0", 1), ("site_1", 1), ("site_0", 2), ("site_1", 2)]
    assert aggregated == [False, False]

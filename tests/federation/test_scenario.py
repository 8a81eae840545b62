"""`scenario.json` through `omnifuse_model.scenario.Scenario`: both writers, every reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from client.app import site_config_path
from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.data.ehr.listfiles import IHM_LABELS, PHENOTYPE_LABELS
from omnifuse_model.scenario import Scenario, ScenarioError, scenario_json_schema
from omnifuse_model.site_config import MIMIC_TASK_OUTPUTS, load_site_config
from omnifuse_model.synthetic import SyntheticFeatureConfig, SyntheticModality
from server.run_config import FederationRunConfig
from simulation.cli import main
from simulation.partition import mimic_model_config
from simulation.preparation import _site_paths
from simulation.scenarios import write_feature_scenario

SCHEMA_DOC = Path(__file__).resolve().parents[2] / "docs" / "scenario.schema.json"


def _model() -> OmniFuseConfig:
    return OmniFuseConfig(
        modalities=[{"name": n, "kind": "vector", "input_dim": 4} for n in ("ehr", "cxr")],
        task="binary",
        d=8,
    )


@pytest.fixture
def feature_scenario(tmp_path) -> Path:
    data = SyntheticFeatureConfig(
        modalities=[SyntheticModality(name="ehr", dim=4), SyntheticModality(name="cxr", dim=4)]
    )
    write_feature_scenario(
        tmp_path / "scenario", data, _model(), [["ehr", "cxr"], ["ehr"]], [(20, 10), (30, 10)]
    )
    return tmp_path / "scenario"


def test_feature_scenario_reads_back_with_absolute_site_paths(feature_scenario):
    scenario = Scenario.load(feature_scenario)
    assert scenario.kind == "synthetic_features" and scenario.task is None
    assert scenario.site_configs == [feature_scenario.resolve() / f"site_{i}.toml" for i in (0, 1)]
    assert [load_site_config(p).name for p in scenario.site_configs] == ["site_0", "site_1"]
    assert load_site_config(scenario.server_test_site).name == "server_test"
    assert scenario.model == _model()
    # on disk the paths stay relative, so the folder can move
    raw = json.loads((feature_scenario / "scenario.json").read_text())
    assert raw["site_configs"] == ["site_0.toml", "site_1.toml"]
    assert raw["model_config"]["d"] == 8


def test_files_written_before_the_typed_writer_still_load(tmp_path):
    """The two earlier writers' dicts, as they were written (the demo's folders have them)."""
    model = mimic_model_config("phenotyping", 16).model_dump(mode="json")
    partition_row = {"site": "a", "subjects": 3, "train_stays": 4, "val_stays": 1}
    partition_row |= {"test_stays": 0, "cxr_images": 2, "reports": 1, "modalities": "ehr+cxr"}
    old = {
        "feature": {
            "kind": "synthetic_features",
            "site_configs": ["site_0.toml"],
            "server_test_site": "server_test.toml",
            "model_config": _model().model_dump(mode="json"),
        },
        "mimic": {
            "kind": "mimic",
            "task": "phenotyping",
            "site_configs": ["a/site.toml"],
            "server_test_site": "server_test/site.toml",
            "model_config": model,
            "partition": {"data_dir": "/data", "task": "phenotyping", "sites": [{"name": "a"}]},
            "sites": [partition_row | {"train_positive": 1}],
        },
    }
    for name, raw in old.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "scenario.json").write_text(json.dumps(raw, indent=2))
        scenario = Scenario.load(tmp_path / name)
        assert scenario.site_configs[0].is_absolute()
        assert scenario.model.model_dump(mode="json") == raw["model_config"]
    assert Scenario.load(tmp_path / "mimic").sites[0].train_positive == 1


def test_write_then_load_is_the_same_scenario(tmp_path):
    scenario = Scenario(
        kind="mimic",
        task="in-hospital-mortality",
        site_configs=[Path("a b/site.toml"), Path("/abs/c.toml")],
        model_config=mimic_model_config("in-hospital-mortality", 8),
        partition={"seed": 3, "sites": [{"name": "a b"}]},
    )
    scenario.write(tmp_path / "new folder")
    loaded = Scenario.load(tmp_path / "new folder")
    assert loaded == scenario.resolve_paths((tmp_path / "new folder").resolve())
    assert loaded.site_configs[1] == Path("/abs/c.toml") and loaded.server_test_site is None


def test_task_facts_come_from_one_table_that_matches_the_data_layer():
    assert MIMIC_TASK_OUTPUTS["phenotyping"] == ("multilabel", len(PHENOTYPE_LABELS))
    assert MIMIC_TASK_OUTPUTS["in-hospital-mortality"] == ("binary", len(IHM_LABELS))
    model = mimic_model_config("phenotyping", 8)
    assert (model.task, model.num_classes) == ("multilabel", 25)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda raw: raw["model_config"].update(d=-1), "model_config.d"),
        (lambda raw: raw.update(site_configs=[]), "site_configs"),
        (lambda raw: raw.update(colour="red"), "colour"),
        (lambda raw: raw.update(kind="mimic"), "task"),
        (lambda raw: raw.update(kind="mimic", task="phenotyping"), "model_config"),
        (lambda raw: raw.update(task="phenotyping"), "task"),
        (lambda raw: raw.update(site_configs=["a.toml", "a.toml"]), "site_configs"),
    ],
)
def test_errors_name_the_file_and_the_field(tmp_path, change, field):
    raw = {"kind": "synthetic_features", "site_configs": ["a.toml"]}
    raw["model_config"] = _model().model_dump(mode="json")
    change(raw)
    (tmp_path / "scenario.json").write_text(json.dumps(raw))
    with pytest.raises(ScenarioError) as error:
        Scenario.load(tmp_path)
    assert str(tmp_path / "scenario.json") in str(error.value)
    assert field in str(error.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="scenario.json not found"):
        Scenario.load(tmp_path)
    (tmp_path / "scenario.json").write_text("{")
    with pytest.raises(ScenarioError, match="scenario.json: not valid JSON"):
        Scenario.load(tmp_path)
    run = FederationRunConfig(scenario_dir=tmp_path / "none", run_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="run config 'scenario-dir'"):
        run.scenario()


def test_readers_get_the_same_sites(feature_scenario):
    expected = Scenario.load(feature_scenario).site_configs
    sites, test = _site_paths(feature_scenario)  # omnifuse prepare --scenario
    assert sites == expected and test == feature_scenario.resolve() / "server_test.toml"
    run = FederationRunConfig(scenario_dir=feature_scenario, run_dir=feature_scenario)
    assert run.omnifuse_config() == _model()  # the ServerApp
    for partition, path in enumerate(expected):  # a simulated ClientApp node
        context = Context(
            run_id=1,
            node_id=1,
            node_config={"partition-id": partition, "num-partitions": 2},
            state=RecordDict(),
            run_config={"scenario-dir": str(feature_scenario)},
        )
        assert site_config_path(context) == path
    context.node_config["partition-id"] = 2
    with pytest.raises(ValueError, match="partition-id 2 but scenario .* lists 2 sites"):
        site_config_path(context)


def test_schema_command_and_the_committed_schema(tmp_path):
    out = tmp_path / "schema.json"
    assert main(["scenario-schema", "--out", str(out)]) == 0
    schema = json.loads(out.read_text())
    assert {"kind", "site_configs", "server_test_site", "model_config"} <= set(schema["properties"])
    assert schema["required"] == ["kind", "site_configs", "model_config"]
    assert SCHEMA_DOC.read_text() == scenario_json_schema() + "\n", (
        "docs/scenario.schema.json is stale: `omnifuse scenario-schema --out "
        "docs/scenario.schema.json`"
    )

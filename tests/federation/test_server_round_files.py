"""The server's per-round work without redundant serialisation: the recorder keeps the audit
rows it has (a resumed run's earlier rows validated once), the audit files equal a fresh
write of every row, the checkpoint's compact round state reads back equal, and the
server-side test evaluation reuses one model with a fresh model's results."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from omnifuse_model.config import TrainConfig
from omnifuse_model.model import OmniFuse
from omnifuse_model.scenario import Scenario
from omnifuse_model.site_config import load_site_config
from omnifuse_model.site_data import load_site_test_dataset
from omnifuse_model.training import evaluate
from server.app import _server_evaluator
from server.audit_log import AUDIT_CSV, AUDIT_JSON, read_audit, write_audit
from server.checkpoint import ServerState, load_latest
from server.round_record import RoundRecord, RoundRecorder
from server.run_config import FederationRunConfig
from server.statistics_phase import Preprocessing
from simulation.benchmarks.scale import site_scenario
from tests.federation.test_audit_report import make_row

TINY = {"d": 8, "num_blocks": 1, "cra_hidden": [8]}


def test_recorder_audit_files_hold_every_round_as_a_fresh_write_would(model_config, tmp_path):
    earlier = [make_row("alpha", 1), make_row("beta", 1)]  # on file before the resume
    state = ServerState(
        round=1,
        audit_rows=[r.model_dump(mode="json") for r in earlier],
        model_config=model_config.model_dump(mode="json"),
    )
    records = {r: RoundRecord(round=r, audit=[make_row("beta", r), make_row("alpha", r)])
               for r in (2, 3)}  # fmt: skip
    recorder = RoundRecorder(
        run_dir=tmp_path / "run",
        state=state,
        records=lambda r: records[r],
        current=lambda: ({}, "", {}),
        global_round=lambda r: r + 1,
    )
    torch.manual_seed(0)
    state_dict = OmniFuse(model_config).state_dict()
    weights = ArrayRecord({k: Array(v.numpy()) for k, v in state_dict.items()})
    recorder(1, weights)
    recorder(2, weights)
    every = earlier + records[2].audit + records[3].audit
    assert read_audit(tmp_path / "run") == every
    write_audit(tmp_path / "fresh", every)
    for name in (AUDIT_CSV, AUDIT_JSON):
        assert (tmp_path / "run" / name).read_text() == (tmp_path / "fresh" / name).read_text()
    assert (
        json.loads((tmp_path / "run" / AUDIT_JSON).read_text())
        == load_latest(tmp_path / "run", model_config).state.audit_rows
    )
    with pytest.raises(ValueError, match="3 rows but 2 dumped"):
        write_audit(tmp_path / "bad", every[:3], [r.model_dump(mode="json") for r in every[:2]])


def test_server_evaluation_reuses_one_model_with_fresh_results(tmp_path):
    scenario_dir = site_scenario(tmp_path / "scenario", 2, 16, 8, TINY)
    scenario = Scenario.load(scenario_dir)
    run = FederationRunConfig(scenario_dir=scenario_dir, run_dir=tmp_path / "run")
    evaluator = _server_evaluator(run, scenario, Preprocessing())
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(OmniFuse(scenario.model).state_dict())
    first, second, again = evaluator(states[0]), evaluator(states[1]), evaluator(states[0])
    assert first == again and first != second
    test = load_site_test_dataset(load_site_config(scenario.server_test_site), scenario.model)
    config = TrainConfig(batch_size=256, progress=False, bootstrap_samples=200, seed=run.seed)
    fresh = OmniFuse(scenario.model)
    fresh.load_state_dict(states[1])
    metrics = evaluate(fresh, test, config, imputation_error=False).metrics
    expected = {f"test-{k}": v for k, v in metrics.items() if not np.isnan(v)}
    assert second == expected

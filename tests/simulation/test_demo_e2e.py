"""The README's main job end to end on a small cohort: synth -> partition -> prepare ->
`flwr run` -> audit, through the real readers, backbones and Flower simulation engine."""

from __future__ import annotations

import json

import pytest

from server.audit_log import read_audit
from simulation.demo import DemoConfig, run_demo

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_demo_pipeline_writes_a_complete_audited_run(tmp_path):
    result = run_demo(tmp_path / "demo", DemoConfig(stays=260, sites=3, rounds=2, local_epochs=1))
    run_dir = tmp_path / "demo" / "federation"
    history = json.loads((run_dir / "metrics.json").read_text())
    assert set(history) == {"1", "2"}
    assert 0.0 <= history["2"]["server"]["test-auroc"] <= 1.0
    rows = read_audit(run_dir)
    assert {r.site for r in rows} == {"hospital_a", "hospital_b", "hospital_c"}
    no_reports = [r for r in rows if r.site == "hospital_b"]
    assert all(r.availability_counts.get("rep") in (0, None) for r in no_reports)
    for name in ("auroc_per_round.png", "lazy_combination_timeline.png", "report.json"):
        assert (run_dir / "audit_report" / name).is_file()
    caches = tmp_path / "demo" / "scenario" / "cache"
    assert {p.name for p in caches.iterdir()} >= {"hospital_a", "server_test"}
    assert result["audit_report"].endswith("audit_report")

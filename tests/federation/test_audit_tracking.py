"""Optional TensorBoard tracking (issue #12 point 3) and what a site's audit row now carries
for the report: held modalities, its threshold, the normalised imputation error."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from omnifuse_model.evaluation import _EvaluationSums
from omnifuse_model.federation_schema import AuditRow
from server.checkpoint import ServerState
from server.round_record import RoundRecord, RoundRecorder
from server.run_config import FederationRunConfig
from server.tracking import TENSORBOARD_DIR, TensorBoardTracker

ROOT = Path(__file__).resolve().parents[2]


def audit_row(site: str, round_: int, status: str = "accepted") -> AuditRow:
    return AuditRow(
        site=site,
        round=round_,
        num_examples=50,
        availability_counts={"ehr": 20, "ehr+cxr": 30, "cxr": 0},
        tla_scores={"ehr": 0.4, "ehr+cxr": 0.5, "cxr": None},
        lazy_combination="ehr+cxr",
        mean_dwfuse_weight={"ehr": 0.6, "cxr": 0.3},
        imputation_error={"ehr": 1.5, "cxr": 0.2},
        imputation_error_normalised={"ehr": 0.5 + 0.1 * round_, "cxr": None},
        observed_modalities=["ehr"],
        val_auroc=0.7 + 0.01 * round_,
        update_status=status,
    )


def record(round_: int) -> RoundRecord:
    return RoundRecord(
        round=round_,
        audit=[audit_row("site_a", round_), audit_row("site_b", round_, "rejected:norm")],
        bytes={"sent": 1000 * round_, "received": 900},
        evaluate_clients={"val-auroc": 0.6 + 0.05 * round_},
        problems=[{"node": 3, "status": "rejected", "site": "site_b", "reason": "norm"}],
    )


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_recorder_logs_every_rounds_global_and_site_metrics(tmp_path, model_config):
    records = {r: record(r) for r in (1, 2)}
    server_metrics = iter([{"test-auroc": 0.71}, {"test-auroc": 0.74}])
    recorder = RoundRecorder(
        run_dir=tmp_path,
        state=ServerState(
            round=0, run_config={}, model_config=model_config.model_dump(mode="json")
        ),
        records=records.__getitem__,
        current=lambda: ({}, "", {}),
        global_round=lambda r: r,
        server_evaluate=lambda weights: next(server_metrics),
        tracker=TensorBoardTracker(tmp_path),
    )
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    recorder(1, arrays)
    recorder(2, arrays)
    recorder.tracker.close()
    logged = scalars(tmp_path / TENSORBOARD_DIR)
    assert logged["global/server/test-auroc"] == [
        (1, pytest.approx(0.71)),
        (2, pytest.approx(0.74)),
    ]
    assert logged["global/evaluate_clients/val-auroc"][1] == (2, pytest.approx(0.70))
    assert logged["global/bytes/sent"] == [(1, 1000.0), (2, 2000.0)]
    assert logged["global/sites/failed_or_rejected"] == [(1, 1.0), (2, 1.0)]
    assert logged["site/site_a/val_auroc"] == [(1, pytest.approx(0.71)), (2, pytest.approx(0.72))]
    assert logged["site/site_a/test_time_weight/ehr"][0] == (1, pytest.approx(0.6))
    assert logged["site/site_a/test_time_weight_imputed/cxr"][0] == (
        1,
        pytest.approx(0.3),
    )  # not held
    assert "site/site_a/test_time_weight/cxr" not in logged
    assert logged["site/site_a/imputation_error_normalised/ehr"][1] == (2, pytest.approx(0.7))
    assert logged["site/site_a/tla/ehr+cxr"][0] == (1, pytest.approx(0.5))
    assert "site/site_a/imputation_error_normalised/cxr" not in logged  # withheld: not logged
    assert "site/site_a/tla/cxr" not in logged
    assert not any(tag.startswith("site/site_b/") for tag in logged)  # rejected update


def test_tracking_is_off_by_default_and_one_key_turns_it_on():
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert defaults["config"]["tensorboard"] is False
    base = {"scenario-dir": "s", "run-dir": "r"}
    assert FederationRunConfig.from_flower(base).tensorboard is False
    assert FederationRunConfig.from_flower(base | {"tensorboard": True}).tensorboard is True
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("tensorboard") for d in project["optional-dependencies"]["tracking"])


# -- what the site computes for the report ----------------------------------------------------
def test_normalised_imputation_error_is_mse_over_the_mean_baseline():
    torch.manual_seed(0)
    true = torch.randn(40, 6) * 0.2 + 1.0
    imputed = true + torch.randn(40, 6) * 0.1
    sums = _EvaluationSums.zeros(2)
    sums.errors[0] += float((imputed - true).pow(2).mean(dim=1).sum())
    sums.error_counts[0] += 40
    sums.add_embeddings(0, true)
    train_mean = torch.stack([torch.full((6,), 0.9), torch.full((6,), math.nan)])
    mse = float((imputed - true).pow(2).mean())
    own = sums.normalised_errors(["ehr", "cxr"], None)
    assert own["ehr"] == pytest.approx(mse / float((true - true.mean(0)).pow(2).mean()))
    trained = sums.normalised_errors(["ehr", "cxr"], train_mean)
    assert trained["ehr"] == pytest.approx(mse / float((true - 0.9).pow(2).mean()))
    assert math.isnan(trained["cxr"])  # no samples, no training mean: undefined


def test_constant_embedding_has_no_normalised_error():
    sums = _EvaluationSums.zeros(1)
    sums.errors[0] += 3.0
    sums.error_counts[0] += 10
    sums.add_embeddings(0, torch.full((10, 4), 2.5))
    assert math.isnan(sums.normalised_errors(["cxr"], None)["cxr"])


def test_site_audit_row_names_held_modalities_threshold_and_normalised_error(site_round):
    _, results, _ = site_round
    rows = {r.audit.site: r.audit for r in results}
    assert rows["a_full"].observed_modalities == ["ehr", "cxr"]
    assert rows["b_no_cxr"].observed_modalities == ["ehr"]
    assert {r.min_count for r in rows.values()} == {5}
    full = rows["a_full"].imputation_error_normalised
    assert set(full) == {"ehr", "cxr"}
    assert all(v is None or (math.isfinite(v) and v >= 0) for v in full.values())
    assert any(v is not None for v in full.values())
    # where the raw error is withheld (too few samples), so is the normalised one
    for row in rows.values():
        for name, raw in row.imputation_error.items():
            if raw is None:
                assert row.imputation_error_normalised[name] is None


def test_audit_csv_carries_the_new_fields(tmp_path):
    import csv

    from server.audit_log import write_audit

    csv_path, _ = write_audit(tmp_path, [audit_row("site_a", 1)])
    (row,) = csv.DictReader(csv_path.open())
    assert row["observed_modalities"] == "ehr" and row["min_count"] == ""
    assert row["imperr_norm.ehr"] == "0.6" and row["imperr_norm.cxr"] == ""

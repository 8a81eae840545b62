"""Nothing site-private in error replies (issue #10, point 5): a failing ClientApp sends a
named code and its site's name; the exception's text (here always holding a local path)
stays in the site's log, never reaches the server's reply, log record or metrics.json."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import client.app as client_app
from client.app import evaluate, query, train
from omnifuse_model import federation_schema as wire
from omnifuse_model.config import TrainConfig
from omnifuse_model.model import OmniFuse
from omnifuse_model.round_plan import RoundPlan
from server.audit_report import build_report
from server.checkpoint import ServerState
from server.round_record import RoundRecorder
from server.run_config import FederationRunConfig
from server.site_registry import SiteRegistry, registration_messages
from server.strategy import OmniFuseStrategy
from tests.federation.conftest import ROUND_SITES, request_to

SECRET = "hospital_secret_share"  # a directory name that must never reach the server
SITE_TOML = """name = "site_b"
modalities = ["ehr"]
[data]
source = "synthetic_features"
synthetic_sizes = [120, 60]
[data.synthetic]
seed = 3
[[data.synthetic.modalities]]
name = "ehr"
dim = 8
[[data.synthetic.modalities]]
name = "cxr"
dim = 8
"""


def _context(path) -> Context:
    return Context(
        run_id=1, node_id=12, node_config={"site-config": str(path)}, state=RecordDict(),
        run_config={},
    )  # fmt: skip


def _round_request(model_config, message_type: str) -> Message:
    torch.manual_seed(0)
    plan = RoundPlan(
        model=model_config,
        train=TrainConfig(epochs=1, batch_size=32, progress=False, bootstrap_samples=0),
        global_round=1,
    )
    content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord(OmniFuse(model_config).state_dict()),
            wire.CONFIG: ConfigRecord({wire.ROUND_PLAN: plan.model_dump_json()}),
        }
    )
    return Message(content=content, message_type=message_type, dst_node_id=12)


def _site(tmp_path):
    folder = tmp_path / SECRET
    folder.mkdir()
    path = folder / "site.toml"
    path.write_text(SITE_TOML)
    return path


def _assert_private(reply: Message, code: str, caplog) -> None:
    assert reply.has_error() and not reply.has_content()
    assert reply.error.reason == code
    assert SECRET not in reply.error.reason and "/" not in reply.error.reason
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert SECRET in logged  # the full story stays at the site, with its traceback
    assert any(r.name == "omnifuse.site" and r.exc_info for r in caplog.records)


def test_an_unreadable_site_config_is_a_named_code(
    flower_task_identity, model_config, tmp_path, caplog
):
    missing = tmp_path / SECRET / "site.toml"
    [request] = registration_messages([12], model_config.model_dump_json(), 5)
    with caplog.at_level(logging.ERROR, logger="omnifuse.site"):
        reply = query(request, _context(missing))
    _assert_private(reply, "site_config_unreadable:SiteConfigError", caplog)


@pytest.mark.parametrize(
    ("handler", "kind"), [(train, MessageType.TRAIN), (evaluate, MessageType.EVALUATE)]
)
def test_a_failing_round_is_a_named_code(
    handler, kind, flower_task_identity, model_config, tmp_path, caplog, monkeypatch
):
    def failing(*_args, **_kwargs):
        raise ValueError(f"cannot read {tmp_path / SECRET / 'stay_10011.csv'}: value 37.2")

    monkeypatch.setattr(client_app, "train_round", failing)
    monkeypatch.setattr(client_app, "evaluate_global", failing)
    with caplog.at_level(logging.ERROR, logger="omnifuse.site"):
        reply = handler(_round_request(model_config, kind), _context(_site(tmp_path)))
    step = "training_failed" if kind == MessageType.TRAIN else "evaluation_failed"
    _assert_private(reply, f"{step}:ValueError:site=site_b", caplog)


def test_a_missing_feature_cache_is_a_named_code(
    flower_task_identity, model_config, tmp_path, caplog
):
    path = _site(tmp_path)
    path.write_text(
        'name = "site_b"\nmodalities = ["ehr"]\ncache_dir = "cache"\n[data]\nbenchmark_dir = "x"\n'
    )
    with caplog.at_level(logging.ERROR, logger="omnifuse.site"):
        reply = train(_round_request(model_config, MessageType.TRAIN), _context(path))
    _assert_private(reply, "data_unreadable:FileNotFoundError:site=site_b", caplog)


def test_the_server_names_the_site_and_metrics_json_holds_no_path(
    flower_task_identity, model_config, site_round, site_registry, tmp_path, monkeypatch
):
    """The error reply of node 12 (bound to b_no_cxr) is recorded under b_no_cxr with the
    code only; metrics.json and the audit say which site failed, and nothing more."""
    _, _, replies = site_round
    good = next(r for r in replies if r.metadata.src_node_id == ROUND_SITES["a_full"][2])

    def failing(*_args, **_kwargs):
        raise OSError(f"{tmp_path / SECRET}/shard_0003.npz: checksum mismatch")

    monkeypatch.setattr(client_app, "train_round", failing)
    path = _site(tmp_path)
    error = train(_round_request(model_config, MessageType.TRAIN), _context(path))
    failed = Message(error.error, reply_to=request_to(ROUND_SITES["b_no_cxr"][2]))
    run = FederationRunConfig(
        transport="float32", scenario_dir=tmp_path, run_dir=tmp_path / "run", min_train_nodes=1
    )
    run.run_dir.mkdir()
    strategy = OmniFuseStrategy(run, model_config, registry=site_registry)
    strategy.previous = {k: v.numpy() for k, v in OmniFuse(model_config).state_dict().items()}
    torch.manual_seed(0)
    strategy.aggregate_train(1, [failed, good])
    [problem] = strategy.records[1].problems
    assert problem["site"] == "b_no_cxr" and problem["status"] == "failed"
    assert problem["reason"] == "training_failed:OSError:site=site_b"
    state = ServerState(round=0, model_config=model_config.model_dump(mode="json"))
    recorder = RoundRecorder(
        run_dir=run.run_dir,
        state=state,
        records=strategy.record,
        current=lambda: ({}, "", SiteRegistry().to_json()),
        global_round=strategy.global_round,
    )
    recorder(1, ArrayRecord(OmniFuse(model_config).state_dict()))
    for name in ("metrics.json", "audit.json", "audit.csv"):
        assert SECRET not in (run.run_dir / name).read_text(), name
    audit = {
        row["site"]: row["update_status"]
        for row in json.loads((run.run_dir / "audit.json").read_text())
    }
    assert audit["b_no_cxr"] == "failed:training_failed:OSError:site=site_b"
    assert recorder.never_accepted() == {"b_no_cxr": f"failed: {problem['reason']}"}
    report = build_report(run.run_dir)  # `omnifuse audit` shows the failed round by site
    [row] = report.tables["update_status"].rows
    assert row == ["b_no_cxr", "failed:training_failed:OSError:site=site_b"]

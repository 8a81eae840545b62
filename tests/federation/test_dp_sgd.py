"""Local DP-SGD (Opacus) at a site: epsilon accumulates over rounds in the site's ledger, is
reported in the reply and the audit, and training stops once the budget is spent."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from opacus import PrivacyEngine

from client.app import train
from client.local_training import RoundInstructions, train_round
from client.privacy import (
    PrivacyLedger,
    PrivacyPlan,
    collate_tensors,
    ledger_path,
    noise_only_step,
    private_fit,
)
from client.registration import site_declaration
from omnifuse_model import federation_schema as wire
from omnifuse_model.batch import InMemoryMultimodalDataset
from omnifuse_model.config import OmniFuseConfig, TrainConfig
from omnifuse_model.federation_replies import check_counts_bound, parse_audit, parse_train_metrics
from omnifuse_model.model import OmniFuse
from omnifuse_model.round_plan import RoundPlan
from omnifuse_model.site_config import PrivacyConfig, SiteConfig, load_site_config
from omnifuse_model.site_data import load_site_datasets
from server.round_metrics import weighted_metrics
from server.run_config import FederationRunConfig
from server.strategy import OmniFuseStrategy

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SITE_TOML = """name = "dp_hospital"
modalities = ["ehr", "cxr"]
cache_dir = "cache"
device = "cpu"
[data]
source = "synthetic_features"
synthetic_sizes = [120, 60]
[data.synthetic]
seed = 1
[[data.synthetic.modalities]]
name = "ehr"
dim = 8
signal = 1.5
noise = 0.5
missing_rate = 0.1
[[data.synthetic.modalities]]
name = "cxr"
dim = 8
missing_rate = 0.3
[privacy]
dp_sgd = true
target_epsilon = {epsilon}
"""


def _site(directory: Path, epsilon: float) -> tuple[Path, SiteConfig]:
    """A DP site over feature-level synthetic data (120 training samples), as a TOML file."""
    path = directory / "site.toml"
    path.write_text(SITE_TOML.format(epsilon=epsilon))
    return path, load_site_config(path)


def _instructions(
    model_config, global_round: int, ledger: Path, privacy: PrivacyConfig
) -> RoundInstructions:
    return RoundInstructions(
        model_config=model_config,
        train_config=TrainConfig(epochs=1, batch_size=32, progress=False, bootstrap_samples=0),
        global_round=global_round,
        proximal_mu=0.01,  # FedProx's term joins the privatised gradient
        privacy=privacy,
        planned_rounds=2,
        privacy_ledger=ledger,
    )


def test_epsilon_grows_over_rounds_then_the_site_stops_at_its_budget(
    model_config, tmp_path, caplog
):
    _, site = _site(tmp_path, epsilon=1.0)  # tiny: the plan of 2 rounds reaches it
    datasets = load_site_datasets(site, model_config)
    torch.manual_seed(0)
    state = OmniFuse(model_config).state_dict()
    ledger = tmp_path / "privacy" / "run.json"
    epsilons = []
    for global_round in (1, 2):
        instructions = _instructions(model_config, global_round, ledger, site.privacy)
        result = train_round(site.name, datasets, instructions, state)
        assert result.metrics[wire.NUM_EXAMPLES] == len(datasets.train)
        assert result.audit.epsilon == result.metrics[wire.EPSILON]
        assert list(result.state) == list(state)
        assert any(not torch.equal(result.state[k], state[k]) for k in state)
        epsilons.append(result.metrics[wire.EPSILON])
        state = result.state
    assert 0 < epsilons[0] < epsilons[1] <= 1.0  # planned: 2 rounds x 1 epoch reach the target
    assert json.loads(ledger.read_text())["rounds"].keys() == {"1", "2"}

    with caplog.at_level(logging.WARNING, logger="client.privacy"):
        instructions = _instructions(model_config, 3, ledger, site.privacy)
        spent = train_round(site.name, datasets, instructions, state)
    assert "dp_hospital: privacy budget reached in round 3" in caplog.text
    assert "no further local training" in caplog.text
    assert all(torch.equal(spent.state[k], state[k]) for k in state)  # global weights back
    assert spent.metrics[wire.NUM_EXAMPLES] == 0  # no weight in the average
    assert all(spent.metrics[wire.present_key(m)] == 0 for m in ("ehr", "cxr"))
    assert spent.metrics[wire.EPSILON] == pytest.approx(epsilons[1])
    assert spent.audit.epsilon == pytest.approx(epsilons[1])
    assert spent.audit.val_auroc is not None  # the site still evaluates
    # the server's screening accepts the spent site's reply: the audit's num_examples is the
    # MetricRecord's 0, and its training-table cells are bounded by the declared size
    declaration = site_declaration(site.name, datasets, model_config, threshold=5)
    metrics = parse_train_metrics(spent.metrics, ["ehr", "cxr"])
    check_counts_bound(metrics.counts(), declaration, None)
    row = parse_audit(
        wire.encode_audit(spent.audit), site.name, 3, metrics, ["ehr", "cxr"], declaration.num_train
    )
    assert row.num_examples == 0 and any(row.availability_counts.values())


def test_ledger_continues_across_restarts_and_a_rerun_round_replaces_its_entry(tmp_path):
    path = ledger_path(tmp_path, "abc123")
    assert path == tmp_path / "privacy" / "abc123.json"
    with pytest.raises(ValueError, match="ledger id"):
        ledger_path(tmp_path, "../escape")
    PrivacyLedger(path).record(1, [(1.5, 0.25, 4)], 0.7, 1e-5)
    PrivacyLedger(path).record(2, [(1.5, 0.25, 8)], 0.9, 1e-5)
    restarted = PrivacyLedger(path)  # a new process reads what the last one wrote
    assert restarted.history_before(1) == []
    assert restarted.history_before(3) == [(1.5, 0.25, 8)]
    restarted.record(1, [(1.5, 0.25, 4)], 0.7, 1e-5)  # a fresh run from round 1
    assert restarted.history_before(3) == [(1.5, 0.25, 4)]


def test_an_empty_poisson_batch_still_steps_noise_and_is_counted():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    before = model.weight.detach().clone()
    samples = [{"x": torch.randn(3)} for _ in range(8)]
    loader = torch.utils.data.DataLoader(samples, batch_size=4)
    engine = PrivacyEngine(accountant="rdp")
    _, optimizer, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    noise_only_step(optimizer)
    assert engine.accountant.history == [(1.0, 0.5, 1)]
    assert not torch.equal(model.weight.detach(), before)


def test_private_collate_keeps_only_tensors(model_config, tmp_path):
    data = load_site_datasets(_site(tmp_path, 1.0)[1], model_config).train
    batch = collate_tensors([data[0], data[1]])
    assert set(batch) == {"inputs", "masks", "availability", "labels"}
    assert batch["availability"].shape == (2, 2)


def test_client_app_dp_round_with_the_strategys_config(
    flower_task_identity, model_config, tmp_path
):
    site, _ = _site(tmp_path, epsilon=4.0)
    run = FederationRunConfig(scenario_dir=tmp_path, run_dir=tmp_path / "run", num_server_rounds=5)
    strategy = OmniFuseStrategy(run, model_config)
    config = strategy.round_config(1, ConfigRecord())
    plan = RoundPlan.model_validate_json(str(config[wire.ROUND_PLAN]))
    assert plan.planned_rounds == 5
    train_config = plan.train.model_copy(update={"batch_size": 32})
    config[wire.ROUND_PLAN] = plan.model_copy(update={"train": train_config}).model_dump_json()
    torch.manual_seed(0)
    request = Message(
        content=RecordDict(
            {wire.ARRAYS: ArrayRecord(OmniFuse(model_config).state_dict()), wire.CONFIG: config}
        ),
        message_type=MessageType.TRAIN,
        dst_node_id=1,
    )
    [request] = strategy.with_uplink_keys([request])  # what the site sends back (omission)
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"site-config": str(site)},
        state=RecordDict(),
        run_config={},
    )
    reply = train(request, context)
    epsilon = reply.content[wire.METRICS][wire.EPSILON]
    assert 0 < epsilon < 4.0
    assert wire.decode_audit(reply.content[wire.AUDIT]).epsilon == pytest.approx(epsilon)
    ledger = tmp_path / "cache" / "privacy" / f"{plan.privacy_ledger}.json"
    assert json.loads(ledger.read_text())["rounds"]["1"]["epsilon"] == pytest.approx(epsilon)


def test_epsilon_aggregates_as_the_largest_and_non_dp_sites_report_none(site_round):
    _, results, _ = site_round
    assert all(wire.EPSILON not in r.metrics and r.audit.epsilon is None for r in results)
    metrics = [
        {wire.NUM_EXAMPLES: 10, wire.EPSILON: 0.5},
        {wire.NUM_EXAMPLES: 30},
        {wire.NUM_EXAMPLES: 0, wire.EPSILON: 2.0},  # a site at its budget
    ]
    assert weighted_metrics(metrics)[wire.EPSILON] == 2.0


def test_private_fit_trains_recurrent_and_token_encoders(tmp_path):
    """DPLSTM and attention pooling under Opacus' optimizer; the state dict stays nn.LSTM's."""
    config = OmniFuseConfig(
        modalities=[
            {"name": "ts", "kind": "timeseries", "input_dim": 3, "seq_len": 4},
            {"name": "tok", "kind": "token_states", "input_dim": 3, "seq_len": 4},
            {"name": "vec", "kind": "vector", "input_dim": 3},
        ],
        task="binary",
        d=8,
        num_blocks=1,
        cra_hidden=(8,),
    )
    generator = torch.Generator().manual_seed(0)
    n = 40
    data = InMemoryMultimodalDataset(
        {
            "ts": torch.randn(n, 4, 3, generator=generator),
            "tok": torch.randn(n, 4, 3, generator=generator),
            "vec": torch.randn(n, 3, generator=generator),
        },
        torch.rand(n, 3, generator=generator) < 0.8,
        (torch.rand(n, 1, generator=generator) < 0.5).float(),
        masks={"tok": torch.ones(n, 4, dtype=torch.bool)},
    )
    torch.manual_seed(0)
    default_state = OmniFuse(config).state_dict()
    model = OmniFuse(config.model_copy(update={"dp_compatible": True}))
    model.load_state_dict(default_state)
    plan = PrivacyPlan(total_epochs=2, ledger=PrivacyLedger(tmp_path / "l.json"), global_round=1)
    train = TrainConfig(epochs=1, batch_size=16, progress=False, bootstrap_samples=0)
    outcome = private_fit("s", model, data, train, PrivacyConfig(dp_sgd=True), plan)
    assert outcome.fit is not None and outcome.epochs_trained == 1
    assert 0 < outcome.epsilon < 8.0
    state = model.state_dict()
    assert list(state) == list(default_state)
    assert not torch.equal(
        state["encoders.encoders.ts.lstm.weight_hh_l1"],
        default_state["encoders.encoders.ts.lstm.weight_hh_l1"],
    )
    assert not torch.equal(
        state["encoders.encoders.tok.score.weight"],
        default_state["encoders.encoders.tok.score.weight"],
    )
    assert not hasattr(next(model.parameters()), "grad_sample")  # Opacus' hooks are gone

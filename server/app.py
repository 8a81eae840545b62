"""Flower ServerApp: build the strategy, run the rounds, checkpoint and audit after each.

After every round (in ``evaluate_fn``, which Flower calls once per round after federated
evaluation) the server evaluates the global model on the scenario's held-out test set when
configured, then writes a checkpoint, metrics.json and the audit table. With
``resume=true`` it continues from the newest checkpoint in ``run-dir``.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.superlink.grid import InMemoryGrid

from omnifuse_model.config import TrainConfig
from omnifuse_model.federation_schema import AuditRow, finite_or_none
from omnifuse_model.model import OmniFuse
from omnifuse_model.scenario import Scenario
from omnifuse_model.site_config import load_site_config
from omnifuse_model.site_data import load_site_test_dataset
from omnifuse_model.training import evaluate
from server.audit_log import write_audit
from server.checkpoint import ServerState, load_latest, save_round
from server.run_config import FederationRunConfig
from server.strategy import OmniFuseStrategy

log = logging.getLogger(__name__)
app = ServerApp()

# The simulation's in-memory grid sleeps 0.1 s between polls for replies (Flower's default):
# on average 50 ms idle after each of a round's two phases. A poll reads the in-process
# link state, so polling more often costs next to nothing.
SIMULATION_PULL_INTERVAL = 0.01


def _server_evaluator(run: FederationRunConfig, scenario: Scenario):
    """evaluate(weights) on the scenario's held-out test set, or None when not configured."""
    if not run.server_eval or scenario.server_test_site is None:
        return None
    site = load_site_config(scenario.server_test_site)
    model_config = scenario.model
    test = load_site_test_dataset(site, model_config)
    if len(test) == 0:
        raise ValueError(f"server test site {site.name}: the test split is empty")
    config = TrainConfig(batch_size=256, progress=False, bootstrap_samples=0, seed=run.seed)

    def evaluate_weights(weights: dict[str, torch.Tensor]) -> dict[str, float]:
        model = OmniFuse(model_config)
        model.load_state_dict(weights)
        metrics = evaluate(model, test, config, imputation_error=False).metrics
        return {f"test-{k}": v for k, v in metrics.items() if finite_or_none(v) is not None}

    return evaluate_weights


def with_central_dp(strategy: OmniFuseStrategy, run: FederationRunConfig, sites: int) -> Strategy:
    """Wrap the strategy in Flower's fixed-clipping DP wrapper when ``central-dp`` is on.

    The wrapper clips each update (server side, or at the sites via fixedclipping_mod),
    calls our aggregate_train (which then averages uniformly) and adds Gaussian noise of
    std noise_multiplier * clipping_norm / sampled sites to the aggregate.
    """
    if run.central_dp == "off":
        return strategy
    sampled = max(int(sites * run.fraction_train), run.min_train_nodes)
    wrapper = (
        DifferentialPrivacyServerSideFixedClipping
        if run.central_dp == "server"
        else DifferentialPrivacyClientSideFixedClipping
    )
    return wrapper(strategy, run.dp_noise_multiplier, run.dp_clipping_norm, sampled)


def warm_up(grid: Grid, timeout: float) -> dict[str, float | int]:
    """Simulation: one empty query per node before round 1, so that the engine's start-up
    (Ray, the ClientApp actors importing torch) is timed on its own, not inside round 1.

    Returns the seconds it took and how many nodes answered; written to ``startup.json``.
    Training does not depend on it (a node that fails here is simply not counted).
    """
    started = time.perf_counter()
    nodes = list(grid.get_node_ids())
    messages = [
        Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=node)
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    answered = sum(1 for reply in replies if not reply.has_error())
    return {
        "startup_seconds": time.perf_counter() - started,
        "nodes": len(nodes),
        "answered": answered,
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = FederationRunConfig.from_flower(context.run_config)
    startup = None
    if isinstance(grid, InMemoryGrid):
        grid.pull_interval = SIMULATION_PULL_INTERVAL
        startup = warm_up(grid, run.round_timeout)
    scenario = run.scenario()
    model_config = scenario.model
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "run_config.json").write_text(run.model_dump_json(indent=2))
    if startup is not None:
        log.info(
            "simulation start-up: %.1f s (%d nodes)", startup["startup_seconds"], startup["nodes"]
        )
        (run.run_dir / "startup.json").write_text(json.dumps(startup, indent=2))
    loaded = load_latest(run.run_dir) if run.resume else None
    if loaded is not None:
        weights, state = loaded
        log.info("resuming from round %d in %s", state.round, run.run_dir)
    else:
        torch.manual_seed(run.seed)
        model = OmniFuse(model_config)
        weights = {k: v.numpy() for k, v in model.state_dict().items()}
        state = ServerState(
            round=0,
            run_config=json.loads(run.model_dump_json()),
            model_config=model_config.model_dump(mode="json"),
        )
    remaining = run.num_server_rounds - state.round
    if remaining <= 0:
        log.info("run already has %d rounds; nothing to do", state.round)
        return
    strategy = OmniFuseStrategy(
        run, model_config, state.round, state.site_laziness, state.global_laziness
    )
    runner = with_central_dp(strategy, run, len(scenario.site_configs))
    server_evaluate = _server_evaluator(run, scenario)
    audit_rows = [AuditRow.model_validate(r) for r in state.audit_rows]
    history: dict = dict(state.history)
    clock = {"start": time.perf_counter()}

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        global_round = strategy.global_round(server_round)
        round_weights = {k: v.numpy() for k, v in arrays.items()}
        server_metrics = (
            server_evaluate({k: torch.from_numpy(np.array(v)) for k, v in round_weights.items()})
            if server_evaluate
            else {}
        )
        audit_rows.extend(strategy.round_audit.get(global_round, []))
        history[str(global_round)] = {
            "train": strategy.round_train_metrics.get(global_round, {}),
            "evaluate_clients": strategy.round_eval_metrics.get(global_round, {}),
            "server": server_metrics,
            "bytes": strategy.round_bytes.get(global_round, {}),
            "failed_or_rejected": strategy.round_problems.get(global_round, []),
            "wall_seconds": time.perf_counter() - clock["start"],
        }
        clock["start"] = time.perf_counter()
        round_state = ServerState(
            round=global_round,
            site_laziness=strategy.site_laziness,
            global_laziness=strategy.global_laziness,
            history=history,
            audit_rows=[r.model_dump(mode="json") for r in audit_rows],
            run_config=json.loads(run.model_dump_json()),
            model_config=model_config.model_dump(mode="json"),
        )
        save_round(run.run_dir, round_weights, round_state)
        write_audit(run.run_dir, audit_rows)
        (run.run_dir / "metrics.json").write_text(json.dumps(history, indent=2))
        return MetricRecord(server_metrics) if server_metrics else None

    runner.start(
        grid=grid,
        initial_arrays=ArrayRecord({k: _array(v) for k, v in weights.items()}),
        num_rounds=remaining,
        timeout=run.round_timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=after_round,
    )


def _array(value: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(value))

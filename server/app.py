"""Flower ServerApp: register the sites, build the strategy, run the rounds, checkpoint.

Before round 1 every node answers a registration query (``server.site_registry``) that
binds its node id to its site, then a statistics query (``server.statistics_phase``): the
federated EHR normaliser every site uses, and the exclusion of sites whose backbones differ.
After every round (in ``evaluate_fn``, which Flower calls once per round after federated
evaluation) the ``RoundRecorder`` evaluates the global model
on the scenario's held-out test set when configured, then writes a checkpoint, metrics.json
and the audit table. With ``resume=true`` it continues from the newest readable checkpoint
in ``run-dir``. At the end ``outcome.json`` says how the run ended; a site that failed or was
rejected in every round makes the ServerApp raise, naming it.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from omnifuse_model.config import OmniFuseConfig, TrainConfig
from omnifuse_model.federation_schema import finite_or_none
from omnifuse_model.model import OmniFuse
from omnifuse_model.scenario import Scenario
from omnifuse_model.site_config import load_site_config
from omnifuse_model.site_data import load_site_test_dataset
from omnifuse_model.training import evaluate
from server.central_dp import with_central_dp
from server.checkpoint import ServerState, load_latest
from server.round_record import RoundRecorder
from server.run_config import FederationRunConfig
from server.run_outcome import SitesFailedError, write_outcome
from server.site_registry import SiteRegistry, register_sites
from server.statistics_phase import (
    FingerprintConflict,
    Preprocessing,
    run_statistics_phase,
    write_normalizer,
)
from server.strategy import OmniFuseStrategy
from server.stream_kernels import compile_now
from server.tracking import TensorBoardTracker

log = logging.getLogger(__name__)
app = ServerApp()

# The simulation's in-memory grid sleeps 0.1 s between polls for replies (Flower's default):
# on average 50 ms idle after each of a round's two phases. A poll reads the in-process
# link state, so polling more often costs next to nothing.
SIMULATION_PULL_INTERVAL = 0.01


def _server_evaluator(run: FederationRunConfig, scenario: Scenario, preprocessing: Preprocessing):
    """evaluate(weights) on the scenario's held-out test set (EHR scaled with the
    federation's normaliser), or None when not configured."""
    if not run.server_eval or scenario.server_test_site is None:
        return None
    site = load_site_config(scenario.server_test_site)
    model_config = scenario.model
    state = preprocessing.normalizer
    normalizer = state.normalizer() if state is not None else None
    test = load_site_test_dataset(site, model_config, normalizer=normalizer)
    if len(test) == 0:
        raise ValueError(f"server test site {site.name}: the test split is empty")
    # 200 bootstrap resamples: the audit report shows the test AUROC with its 95% interval
    config = TrainConfig(batch_size=256, progress=False, bootstrap_samples=200, seed=run.seed)

    model = OmniFuse(model_config)  # one model for every round: each loads the whole state

    def evaluate_weights(weights: dict[str, torch.Tensor]) -> dict[str, float]:
        model.load_state_dict(weights)
        metrics = evaluate(model, test, config, imputation_error=False).metrics
        return {f"test-{k}": v for k, v in metrics.items() if finite_or_none(v) is not None}

    return evaluate_weights


def initial_state(
    run: FederationRunConfig, model_config: OmniFuseConfig
) -> tuple[dict[str, np.ndarray], ServerState, str]:
    """(weights, server state, resume note): with ``resume`` the newest checkpoint that reads
    and fits ``model_config`` (``server.checkpoint.load_latest``), else a fresh model seeded
    by the run's seed. When checkpoints exist but none fits, outcome.json says why."""
    try:
        loaded = load_latest(run.run_dir, model_config) if run.resume else None
    except ValueError as error:
        write_outcome(run.run_dir, "failed", f"resume: {error}")
        raise
    if loaded is not None:
        log.info("resuming from round %d in %s", loaded.state.round, run.run_dir)
        if loaded.note:
            log.warning("%s", loaded.note)
        return loaded.weights, loaded.state, loaded.note
    torch.manual_seed(run.seed)
    model = OmniFuse(model_config)
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    state = ServerState(
        round=0,
        run_config=json.loads(run.model_dump_json()),
        model_config=model_config.model_dump(mode="json"),
    )
    return weights, state, ""


def register(
    grid: Grid, run: FederationRunConfig, model_config: OmniFuseConfig, registry: SiteRegistry
) -> None:
    """Bind node ids to sites before round 1 (both simulation and deployment). In
    simulation this is also when the engine starts up: timed into ``startup.json``."""
    if isinstance(grid, InMemoryGrid):
        grid.pull_interval = SIMULATION_PULL_INTERVAL
    startup = register_sites(
        grid,
        registry,
        model_config.model_dump_json(),
        model_config.modality_names,
        run.min_available_nodes,
        run.round_timeout,
        run.audit_min_count,
    )
    log.info(
        "registration: %d of %d nodes bound to sites in %.1f s",
        startup["registered"],
        startup["nodes"],
        startup["startup_seconds"],
    )
    (run.run_dir / "startup.json").write_text(json.dumps(startup, indent=2))


def statistics_phase(
    grid: Grid,
    run: FederationRunConfig,
    model_config: OmniFuseConfig,
    registry: SiteRegistry,
    state: ServerState,
) -> Preprocessing:
    """The statistics phase (``server.statistics_phase``). A resumed run keeps the
    normaliser it started with (its checkpoint state); exclusions are decided afresh."""
    try:
        decided = run_statistics_phase(
            grid,
            registry,
            model_config.model_dump_json(),
            model_config.modality_names,
            run.audit_min_count,
            run.expected_fingerprint_map(),
            run.round_timeout,
        )
    except FingerprintConflict as error:  # the run cannot start: say why in outcome.json
        write_outcome(run.run_dir, "failed", f"statistics phase: {error}")
        raise
    stored = Preprocessing.from_json(state.preprocessing)
    if stored.normalizer is not None:
        decided.normalizer, decided.contributors = stored.normalizer, stored.contributors
    log.info(
        "statistics phase: EHR normaliser from %d sites %s; excluded %s",
        len(decided.contributors),
        decided.contributors,
        decided.excluded or "none",
    )
    state.preprocessing = decided.to_json()
    write_normalizer(run.run_dir, decided)
    return decided


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = FederationRunConfig.from_flower(context.run_config)
    scenario = run.scenario()  # before anything is written: a wrong path fails first
    run.run_dir.mkdir(parents=True, exist_ok=True)
    write_outcome(run.run_dir, "running")
    model_config = scenario.model
    (run.run_dir / "run_config.json").write_text(run.model_dump_json(indent=2))
    weights, state, note = initial_state(run, model_config)
    if run.num_server_rounds <= state.round:
        log.info("run already has %d rounds; nothing to do", state.round)
        write_outcome(run.run_dir, "completed", "nothing to do")
        return
    registry = SiteRegistry.from_json(state.sites)
    if run.wire_format().dtype == "bfloat16":
        compile_now()  # numba's one-time start, not in round 1 (server.stream_kernels)
    register(grid, run, model_config, registry)
    preprocessing = statistics_phase(grid, run, model_config, registry, state)
    strategy = OmniFuseStrategy(
        run,
        model_config,
        state.round,
        state.site_laziness,
        state.global_laziness,
        registry,
        preprocessing,
    )
    recorder = RoundRecorder(
        run_dir=run.run_dir,
        state=state,
        records=strategy.record,
        current=lambda: (strategy.site_laziness, strategy.global_laziness, registry.to_json()),
        global_round=strategy.global_round,
        server_evaluate=_server_evaluator(run, scenario, preprocessing),
        note=note,
        tracker=TensorBoardTracker(run.run_dir) if run.tensorboard else None,
    )
    with_central_dp(strategy, run, len(scenario.site_configs)).start(
        grid=grid,
        initial_arrays=ArrayRecord({k: _array(v) for k, v in weights.items()}),
        num_rounds=run.num_server_rounds - state.round,
        timeout=run.round_timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=recorder,
    )
    finish(run, recorder, registry, preprocessing.excluded)


def finish(
    run: FederationRunConfig,
    recorder: RoundRecorder,
    registry: SiteRegistry,
    excluded: dict[str, str] | None = None,
) -> None:
    """Write the outcome; raise naming every site that failed or was rejected in every round
    (so that the run exits non-zero). Sites excluded by the statistics phase are named in
    a completed run's outcome."""
    failing = recorder.never_accepted()
    for name in list(failing):
        if name.startswith("node ") and int(name[5:]) in registry.refused:
            # an unbound node: its registration answer says best who it is
            failing[name] = f"registration {registry.refused[int(name[5:])]}; {failing[name]}"
    if not failing:
        named = ", ".join(f"{site} ({why})" for site, why in sorted((excluded or {}).items()))
        write_outcome(run.run_dir, "completed", f"excluded: {named}" if named else "")
        return
    error = SitesFailedError(failing)
    write_outcome(run.run_dir, "failed", str(error), failing)
    raise error


def _array(value: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(value))

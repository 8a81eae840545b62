"""The federated mechanism scenarios (issue #11 point 3): transfer of imputation, and
modality-aware aggregation, each with a control where theory says there is no effect.

Every federation runs in-process through the functions the deployed apps call
(``mechanisms_federated_harness``: ``client.local_training.train_round`` at each site,
``server.aggregation.aggregate_states`` at the server, ``omnifuse_model.training.evaluate``
for the global model). Seeds are paired: on one seed every method sees the same sites, the
same test set and the same initial weights (shared by name and shape across model
configurations). The data come from ``mechanisms_data`` (latent z ~ N(0, I), label ~
Bernoulli(sigmoid(3 w.z)), so the Bayes probability is known and its test AUROC is the oracle
bound reported next to every method, with each method's distance to it).

1. Federated transfer. Three helper sites hold modalities a and b; a target site holds a only
   (it never collects b) and few samples. a is a tanh-MLP view of all eight latent factors
   (it holds z, but non-linearly and with noise), b a low-noise linear view of them. Metric:
   the global model's AUROC on the target's test set (a only). Methods: the full model (row
   f: DWFuse + TLA + forward/backward imputation) federated; row c (no imputation) federated
   on the same sites; row f trained by the target alone (a federation of one).
   Theory: the target's samples carry no b, so no imputation can be learnt there; at the
   helpers, forward imputation is trained to predict b's embedding from a (training-time
   dropping hides b), a dense, low-noise target that shapes the shared a-encoder and cascade
   beyond what the noisy binary label gives (learning with privileged information). That
   gain reaches the target only through the federation. Expected: fed f > fed c
   (positive), fed f > target alone (positive: also more a-data of the same P(y | a)).
   Control: b pure noise (link ``noise``), everything else equal. The imputation target then
   holds nothing about z, so imputation cannot add information: expected non-positive.
   Row c differs from row f in more than imputation (its joint head reads the input
   embeddings, not the cascade's latents), so fed f - fed c can move without any b
   information; the control measures that part. ``b-information`` is therefore the paired
   difference of the two gains, (fed f - fed c | b linear) - (fed f - fed c | b noise): on
   one seed both federations share every site, sample, a-feature and initial weight and
   differ only in b, so this is the part of the gain that needs b's information. Expected:
   positive. (Added after the first quick run, in which the noise-b control gained too;
   before the full run, and with no change to any design or seed.)
   The oracle (P(y | z)) bounds what the target could reach from a alone.
2. Modality-aware aggregation. Four sites with size skew (480 / 240 / 120 / 120 training
   samples) and label skew (prior shift: 30 / 70 / 35 / 65 % positives); a sees latent factors
   0-3 and b factors 4-7 (both linear), the label reads all eight, so the test AUROC needs
   both. The two large sites hold a only; the small ones hold a and b. Metric: the global
   model's AUROC on a test set holding both. Method: modality-aware FedAvg (each modality's
   encoder and DWFuse head averaged over the sites holding it); reference: plain FedAvg of
   every parameter by num-examples, with the same full model (row f).
   Theory: under plain FedAvg the sites without b send b-encoder weights that got no gradient
   from b data (only from the placeholder e_b(0) and imputed embeddings), so each round's b
   update is diluted by their 75 % share of the examples and pulled towards the placeholder
   role: b is learnt more slowly. Expected: positive.
   Control: every site holds a and b with nothing missing (same sizes and priors). Then every
   site's num-present.m equals its num-examples, both rules give each parameter the same
   weights, and the runs are identical: expected zero (the details record the largest
   parameter difference between the two final models).

Sizes (``FULL``; ``QUICK`` in brackets): the federation benchmark's small model, d 32, K 2
(d 16, K 1); 6 (3) rounds of 1 local epoch, batch 32, lr 3e-3, no early stopping; transfer:
helpers 300 (200) training samples each, target 60 (40); aggregation: 480 / 240 / 120 / 120
(320 / 160 / 80 / 80); test sets 2000 (800) samples; every site validates on 20. Ten
federations per seed.

Threads: the scenarios run torch with one intra-op thread (restored afterwards). The models
are tiny (a few thousand weights per layer), so a second thread only adds synchronisation;
on the shared 2-core machine under load, one quick transfer federation took 11.5 s of CPU
with two threads against 0.5 s with one (load average 12.6).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pydantic import Field
from rich.progress import Progress

from omnifuse_model.config import ABLATION_ROWS, OmniFuseConfig, StrictModel
from simulation.benchmarks.federation import SMALL_MODEL
from simulation.benchmarks.mechanism_result import MechanismResult, paired_result
from simulation.benchmarks.mechanisms_data import Link, MechanismDataConfig, MechanismModality
from simulation.benchmarks.mechanisms_federated_data import HeldOutTest, SiteLayout, build_sites
from simulation.benchmarks.mechanisms_federated_harness import (
    LocalTraining,
    federate,
    global_auroc,
    initial_state,
    one_thread,
)
from simulation.benchmarks.mechanisms_federated_statements import (
    ARMS,
    STATEMENTS,
    ScenarioStatement,
)

LATENT = list(range(8))


class FederatedScenarioConfig(StrictModel):
    """Sizes and training of the federated scenarios (``FULL`` and ``QUICK`` below)."""

    model: dict = Field(default_factory=lambda: dict(SMALL_MODEL), description="OmniFuse sizes.")
    training: LocalTraining = Field(default_factory=lambda: LocalTraining(rounds=6))
    helpers: int = Field(default=3, gt=0, description="Transfer: sites holding a and b.")
    helper_train: int = Field(default=300, gt=0)
    target_train: int = Field(default=60, gt=0)
    aggregation_train: list[int] = Field(default_factory=lambda: [480, 240, 120, 120])
    aggregation_prevalence: list[float] = Field(default_factory=lambda: [0.3, 0.7, 0.35, 0.65])
    aggregation_without_b: int = Field(default=2, ge=1, description="The largest sites lack b.")
    test_size: int = Field(default=2000, gt=0)

    def omnifuse_config(self, data: MechanismDataConfig, row: str) -> OmniFuseConfig:
        base = {"modalities": data.modality_specs(), "task": "binary"}
        return OmniFuseConfig.model_validate({**base, **self.model, **ABLATION_ROWS[row]})


FULL = FederatedScenarioConfig()
QUICK = FederatedScenarioConfig(
    model={"d": 16, "num_blocks": 1, "cra_hidden": [32]},
    training=LocalTraining(rounds=3),
    helper_train=200,
    target_train=40,
    aggregation_train=[320, 160, 80, 80],
    test_size=800,
)
CELLS_PER_SEED = 10  # federations run per seed (the progress task's unit)


def transfer_data(b_link: Link) -> MechanismDataConfig:
    """Transfer: a a noisy tanh-MLP view of z, b a clean view through ``b_link``."""
    b_columns = [] if b_link == "noise" else LATENT
    return MechanismDataConfig(
        modalities=[
            MechanismModality(name="a", link="mlp", latent_columns=LATENT, noise=0.5),
            MechanismModality(name="b", link=b_link, latent_columns=b_columns, noise=0.2),
        ],
        latent_dim=len(LATENT),
        structure_seed=11,
    )


def aggregation_data() -> MechanismDataConfig:
    """Aggregation: a sees factors 0-3, b factors 4-7, both linear; the label reads all."""
    return MechanismDataConfig(
        modalities=[
            MechanismModality(name="a", link="linear", latent_columns=LATENT[:4], noise=0.5),
            MechanismModality(name="b", link="linear", latent_columns=LATENT[4:], noise=0.5),
        ],
        latent_dim=len(LATENT),
        structure_seed=12,
    )


def transfer_layouts(config: FederatedScenarioConfig) -> list[SiteLayout]:
    helpers = [
        SiteLayout(name=f"helper_{i}", modalities=["a", "b"], train=config.helper_train)
        for i in range(config.helpers)
    ]
    return [*helpers, SiteLayout(name="target", modalities=["a"], train=config.target_train)]


def aggregation_layouts(config: FederatedScenarioConfig, all_hold_b: bool) -> list[SiteLayout]:
    sizes, priors = config.aggregation_train, config.aggregation_prevalence
    if len(sizes) != len(priors):
        raise ValueError(
            f"aggregation_train has {len(sizes)} sites but aggregation_prevalence {len(priors)}"
        )
    return [
        SiteLayout(
            name=f"site_{i}",
            modalities=["a", "b"] if all_hold_b or i >= config.aggregation_without_b else ["a"],
            train=n,
            prevalence=p,
        )
        for i, (n, p) in enumerate(zip(sizes, priors, strict=True))
    ]


Advance = Callable[[str], None]


def cell_counter(progress: object | None, cells: int) -> Advance:
    """``advance(label)`` after each federation, on what the runner passed: a rich
    ``Progress`` (one task of ``cells``), the suite's ``CellProgress`` (``plan(cells)`` now,
    ``advance(label)`` per cell), or None (nothing shown)."""
    if progress is None:
        return lambda label: None
    if isinstance(progress, Progress):
        task = progress.add_task("federated scenarios", total=cells)
        return lambda label: progress.update(task, advance=1, description=label)
    plan, advance = getattr(progress, "plan", None), getattr(progress, "advance", None)
    if not (callable(plan) and callable(advance)):
        raise TypeError(
            f"progress: expected a rich Progress, an object with plan(cells) and "
            f"advance(label), or None; got {type(progress).__name__}"
        )
    plan(cells)
    return advance


def transfer_seed(
    config: FederatedScenarioConfig, seed: int, b_link: Link, alone: bool, advance: Advance
) -> dict[str, float]:
    """One seed of the transfer scenario: the target's test AUROC per method, and the oracle."""
    data = transfer_data(b_link)
    sites = build_sites(data, transfer_layouts(config), seed)
    test = HeldOutTest(data, config.test_size, seed, held=["a"])
    with_imputation, without = config.omnifuse_config(data, "f"), config.omnifuse_config(data, "c")
    start_f = initial_state(with_imputation, seed)
    start_c = initial_state(without, seed, reference=start_f)
    arms = {"fed_f": (sites, with_imputation, start_f), "fed_c": (sites, without, start_c)}
    if alone:
        arms["alone_f"] = (sites[-1:], with_imputation, start_f)
        arms["alone_c"] = (sites[-1:], without, start_c)
    values = {"oracle": test.oracle_auroc}
    for arm, (members, model_config, start) in arms.items():
        state = federate(members, model_config, config.training, start, seed)
        values[arm] = global_auroc(model_config, state, test.dataset)
        advance(f"federated-transfer/b-{b_link} seed {seed} ({arm})")
    return values


def aggregation_seed(
    config: FederatedScenarioConfig, seed: int, all_hold_b: bool, advance: Advance
) -> dict[str, float]:
    """One seed of the aggregation scenario: test AUROC of modality-aware and plain FedAvg."""
    data = aggregation_data()
    sites = build_sites(data, aggregation_layouts(config, all_hold_b), seed)
    test = HeldOutTest(data, config.test_size, seed)
    model_config = config.omnifuse_config(data, "f")
    start = initial_state(model_config, seed)
    scenario = "all-hold-all" if all_hold_b else "skewed"
    values: dict[str, float] = {"oracle": test.oracle_auroc}
    states = {}
    for arm, aware in (("aware", True), ("plain", False)):
        states[arm] = federate(sites, model_config, config.training, start, seed, aware)
        values[arm] = global_auroc(model_config, states[arm], test.dataset)
        advance(f"modality-aware-aggregation/{scenario} seed {seed} ({arm})")
    values["max_parameter_difference"] = max(
        float(np.max(np.abs(states["aware"][k] - states["plain"][k]))) for k in start
    )
    return values


def _details(per_seed: list[dict[str, float]], arms: list[str]) -> dict:
    """Oracle AUROC and every arm's AUROC and distance to it, per seed and mean."""
    oracle = [v["oracle"] for v in per_seed]
    details: dict = {"oracle_auroc": float(np.mean(oracle)), "oracle_auroc_per_seed": oracle}
    for arm in arms:
        values = [v[arm] for v in per_seed]
        details[f"{arm}_auroc_per_seed"] = values
        details[f"{arm}_distance_to_oracle"] = float(np.mean(oracle) - np.mean(values))
    return details


def _result(statement: ScenarioStatement, per_seed: list[dict], arms: list[str], extra: dict):
    """The statement's paired result; ``arms``: those whose AUROC and oracle distance go in
    the details."""
    details = {**_details(per_seed, arms), "arms": {a: ARMS[a] for a in arms}, **extra}
    return paired_result(
        name=statement.name,
        mechanism=statement.mechanism,
        control=statement.control,
        expected_sign=statement.expected_sign,
        method=f"{statement.method}: {ARMS[statement.method]}",
        reference=f"{statement.reference}: {ARMS[statement.reference]}",
        metric=statement.metric,
        method_values=[v[statement.method] for v in per_seed],
        reference_values=[v[statement.reference] for v in per_seed],
        details=details,
    )


def federated_scenarios(
    quick: bool, seeds: list[int], progress: object | None
) -> list[MechanismResult]:
    """Both federated scenarios and their controls over ``seeds`` (``QUICK`` or ``FULL``);
    ``progress`` (``cell_counter``) advances once per federation run."""
    return run_scenarios(QUICK if quick else FULL, seeds, progress, quick)


def run_scenarios(
    config: FederatedScenarioConfig, seeds: list[int], progress: object | None, quick: bool
) -> list[MechanismResult]:
    """``federated_scenarios`` under any config (tests run it at toy sizes)."""
    if not seeds:
        raise ValueError("federated_scenarios: expected at least one seed, got none")
    advance = cell_counter(progress, CELLS_PER_SEED * len(seeds))
    transfer, noise, skewed, control = [], [], [], []
    with one_thread():
        for seed in seeds:
            transfer.append(transfer_seed(config, seed, "linear", True, advance))
            noise.append(transfer_seed(config, seed, "noise", False, advance))
            skewed.append(aggregation_seed(config, seed, False, advance))
            control.append(aggregation_seed(config, seed, True, advance))
    setup = {"config": config.model_dump(mode="json"), "quick": quick}
    four = ["fed_f", "fed_c", "alone_f", "alone_c"]
    largest = {
        "max_parameter_difference_per_seed": [v["max_parameter_difference"] for v in control]
    }
    gains = [
        {
            "gain_b_linear": linear["fed_f"] - linear["fed_c"],
            "gain_b_noise": pure["fed_f"] - pure["fed_c"],
            "oracle": linear["oracle"],
        }
        for linear, pure in zip(transfer, noise, strict=True)
    ]
    return [
        _result(STATEMENTS["federated-transfer/b-linear/imputation"], transfer, four, setup),
        _result(STATEMENTS["federated-transfer/b-linear/vs-alone"], transfer, four, setup),
        _result(STATEMENTS["federated-transfer/b-noise/imputation"], noise, four[:2], setup),
        _result(STATEMENTS["federated-transfer/b-information"], gains, [], setup),
        _result(STATEMENTS["modality-aware-aggregation/skewed"], skewed, ["aware", "plain"], setup),
        _result(
            STATEMENTS["modality-aware-aggregation/all-hold-all"],
            control,
            ["aware", "plain"],
            {**setup, **largest},
        ),
    ]

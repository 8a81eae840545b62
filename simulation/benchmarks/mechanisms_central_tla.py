"""Scenario: Traceable Laziness Activation (TLA) against an under-trained modality.

Design (chosen from theory before any run). The label reads 4 latent factors with equal
weight. A is an *easy wide* view: linear, 64 features, of factors 0-1. B is a
*slow-to-learn* view of factors 2-3: a saturated random tanh network (gain 3), 16 features.
Both are always present, and half of the label's signal is only in B. With early stopping on
validation AUROC, the model that learns A first can stop before B's path is learnt (the
"modality laziness" the paper targets). TLA mines the combination whose joint prediction is
worst (expected: B alone) and adds a loss on predicting from it alone, which should train
B's path.

Measured per arm: AUROC on the whole test set and on a *B-only probe* (the test samples with
A hidden), whose oracle is the AUROC of the B part of the Bayes logit (w_B . z_B). A
uni-modal B model (concat, A absent everywhere) measures how well B can be learnt from this
data. Claims (signs stated here): concat under-trains B (B-alone model minus concat on the
probe > 0); TLA fixes it (concat+TLA minus concat on the probe > 0, and DWFuse+TLA (c) minus
DWFuse (b) > 0); and so the full AUROC rises (> 0).

Control: a third, pure-noise modality C (16 features). TLA will mine C (no prediction from
noise is good) and train the joint head to predict from noise: expect <= 0 on the full test
AUROC.
"""

from __future__ import annotations

from dataclasses import replace

from simulation.benchmarks.mechanism_result import MechanismResult, paired_result
from simulation.benchmarks.mechanisms_central import (
    DesignData,
    SeedValues,
    SuiteSettings,
    TrainedArm,
    auroc_on,
    draw_design,
    hide_modality,
    only_modalities,
    predict,
    train_arm,
)
from simulation.benchmarks.mechanisms_data import (
    MechanismDataConfig,
    MechanismModality,
    label_weights,
)
from simulation.benchmarks.mechanisms_progress import CellProgress

MAIN_ARMS = ("a_concat", "concat_tla", "b_dwfuse", "c_dwfuse_tla")
CONTROL_ARMS = ("a_concat", "concat_tla")
B_ALONE = "b_alone"


def tla_design(with_noise: bool) -> MechanismDataConfig:
    modalities = [
        MechanismModality(name="a", dim=64, link="linear", latent_columns=[0, 1], noise=0.3),
        MechanismModality(name="b", dim=16, link="mlp", latent_columns=[2, 3], noise=0.3,
                          mlp_gain=3.0),
    ]  # fmt: skip
    if with_noise:
        modalities.append(MechanismModality(name="c", dim=16, link="noise", noise=1.0))
    return MechanismDataConfig(
        modalities=modalities, latent_dim=4, label_weights=[1.0] * 4, label_scale=3.0
    )


DESIGNS = {"main": tla_design(with_noise=False), "noise_c": tla_design(with_noise=True)}

# Signs stated before any run (see the module docstring for why).
PLAN = [
    ("main", B_ALONE, "a_concat", "auroc_b_probe", "positive"),
    ("main", "concat_tla", "a_concat", "auroc_b_probe", "positive"),
    ("main", "c_dwfuse_tla", "b_dwfuse", "auroc_b_probe", "positive"),
    ("main", "concat_tla", "a_concat", "auroc_all", "positive"),
    ("main", "c_dwfuse_tla", "b_dwfuse", "auroc_all", "positive"),
    ("noise_c", "concat_tla", "a_concat", "auroc_all", "non-positive"),
]


def planned_cells(seeds: list[int]) -> int:
    return len(seeds) * (len(MAIN_ARMS) + 1 + len(CONTROL_ARMS))


def _b_only_oracle(data: DesignData) -> float:
    """AUROC of the B part of the Bayes logit (w_B . z_B) on the B-only probe."""
    weights = label_weights(data.config)
    b_part = data.test.latent[:, [2, 3]] @ weights[[2, 3]]
    return auroc_on(data.test.dataset.labels, b_part)


def _score(values: SeedValues, key: str, trained: TrainedArm, data: DesignData) -> None:
    labels = data.test.dataset.labels
    values.add(
        f"{key}/auroc_all", auroc_on(labels, predict(trained, data.test.dataset).probability)
    )
    probe, _ = only_modalities(data.test.dataset, [1])
    values.add(f"{key}/auroc_b_probe", auroc_on(probe.labels, predict(trained, probe).probability))
    values.add(f"{key}/best_epoch", trained.best_epoch)


def _b_alone(data: DesignData, seed: int, settings: SuiteSettings) -> TrainedArm:
    """Concat trained with A absent everywhere: B's path learnt on its own."""
    alone = replace(
        data,
        train=replace(data.train, dataset=hide_modality(data.train.dataset, 0)),
        val=replace(data.val, dataset=hide_modality(data.val.dataset, 0)),
    )
    return train_arm(alone, "a_concat", seed, settings)


def measure(settings: SuiteSettings, progress: CellProgress) -> SeedValues:
    """Train every arm per seed; AUROC (all, B-only probe) and the mined lazy combinations."""
    values = SeedValues()
    for seed in settings.seeds:
        for design, arms in (("main", MAIN_ARMS), ("noise_c", CONTROL_ARMS)):
            data = draw_design(DESIGNS[design], settings.train, settings, seed)
            labels = data.test.dataset.labels
            values.add(f"{design}/oracle/auroc_all", auroc_on(labels, data.test.bayes_probability))
            values.add(f"{design}/oracle/auroc_b_probe", _b_only_oracle(data))
            for arm in arms:
                trained = train_arm(data, arm, seed, settings)
                _score(values, f"{design}/{arm}", trained, data)
                if trained.model.config.use_tla:
                    combination = "+".join(trained.lazy_combination or ["none"])
                    values.count(f"{design}/{arm}/lazy", combination)
                progress.advance(f"tla {design} seed {seed} {arm}")
            if design == "main":
                _score(values, f"main/{B_ALONE}", _b_alone(data, seed, settings), data)
                progress.advance(f"tla main seed {seed} {B_ALONE}")
    return values


def _pair(
    values: SeedValues,
    design: str,
    method: str,
    reference: str,
    metric: str,
    expected: str,
) -> MechanismResult:
    oracle = values.mean(f"{design}/oracle/{metric}")
    method_mean = values.mean(f"{design}/{method}/{metric}")
    reference_mean = values.mean(f"{design}/{reference}/{metric}")
    details = {
        "oracle_auroc": oracle,
        "method_auroc": method_mean,
        "reference_auroc": reference_mean,
        "method_oracle_distance": oracle - method_mean,
        "reference_oracle_distance": oracle - reference_mean,
        "method_best_epoch": values.mean(f"{design}/{method}/best_epoch"),
        "reference_best_epoch": values.mean(f"{design}/{reference}/best_epoch"),
    }
    if f"{design}/{method}/lazy" in values.counts:
        details["lazy_combinations"] = dict(values.counts[f"{design}/{method}/lazy"])
    return paired_result(
        name=f"tla/{design}/{method}-vs-{reference}/{metric.removeprefix('auroc_')}",
        mechanism="tla" if method != B_ALONE else "tla-premise",
        control=design == "noise_c",
        expected_sign=expected,  # type: ignore[arg-type]
        method=method,
        reference=reference,
        metric=metric,
        method_values=values[f"{design}/{method}/{metric}"],
        reference_values=values[f"{design}/{reference}/{metric}"],
        details=details,
    )


def summarise(values: SeedValues) -> list[MechanismResult]:
    """The PLAN's results from the measurements of every seed."""
    return [_pair(values, *row) for row in PLAN]

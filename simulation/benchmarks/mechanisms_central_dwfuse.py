"""Scenario: DWFuse's per-sample weights under a hidden per-sample corruption regime.

Design (chosen from theory before any run). Two linear views A and B of the same 4 latent
factors (each alone predicts the label); for 40% of samples (train, val and test alike) a
hidden flag replaces one of them, A or B with equal odds, by N(0, 1) noise, about the scale of
a clean feature, so a corrupted view is not given away by its magnitude; it stays
*available*. Arms: DWFuse (row b, beta = 0.5), the same with beta = 0 (omega = 1, the
per-modality losses unweighted) and concat (row a).

What Eq. 10 can do: omega_m = [prod_{n != m}(1 - p_n)]^(beta / (M - 1)) reads only the *other*
modalities' true-label probabilities. On a sample whose A is corrupted, B's head is right, so
omega_A = (1 - p_B)^beta is as small as on a clean sample, while omega_B = (1 - p_A)^beta
grows because A's head is wrong there. So the *share* of the corrupted modality,
omega_A / (omega_A + omega_B), should fall (expected > 0: share on clean samples minus share
on samples where that modality is corrupted), but omega_A itself should not move (expected 0):
with M = 2 the corrupted modality's own weight cannot fall. The weights are the label-driven
ones that shape the training loss (``predict`` passes the labels), measured on the test set.

Accuracy: the paper claims DWFuse helps on low-quality samples, so AUROC on the corrupted
test samples is expected to rise (beta 0.5 vs beta 0, and vs concat). The reported prediction
is the joint head, which omega does not weight (omega weights only the per-modality losses
L_ens that shape the encoders), so the effect, if any, is indirect. Control: the same arms
without corruption (every sample equally reliable; expect ~0 between beta 0.5 and 0).
"""

from __future__ import annotations

import numpy as np

from simulation.benchmarks.mechanism_result import MechanismResult, paired_result
from simulation.benchmarks.mechanisms_central import (
    SeedValues,
    SuiteSettings,
    auroc_on,
    draw_design,
    predict,
    train_arm,
)
from simulation.benchmarks.mechanisms_data import (
    CorruptionRegime,
    MechanismDataConfig,
    MechanismModality,
)
from simulation.benchmarks.mechanisms_progress import CellProgress

LATENT = [0, 1, 2, 3]
CORRUPTED_ARMS = ("b_dwfuse", "b_beta0", "a_concat")
CLEAN_ARMS = ("b_dwfuse", "b_beta0")


def dwfuse_design(corruption_rate: float) -> MechanismDataConfig:
    views = [
        MechanismModality(name=name, dim=16, link="linear", latent_columns=LATENT, noise=0.5)
        for name in ("a", "b")
    ]
    return MechanismDataConfig(
        modalities=views,
        latent_dim=len(LATENT),
        label_weights=[1.0] * len(LATENT),
        label_scale=3.0,
        corruption=CorruptionRegime(rate=corruption_rate, modalities=["a", "b"], scale=1.0),
    )


DESIGNS = {"corrupted": dwfuse_design(0.4), "clean": dwfuse_design(0.0)}

# Signs stated before any run (see the module docstring for why).
PLAN = [
    ("corrupted", "b_dwfuse", "b_beta0", "corrupted", "positive"),
    ("corrupted", "b_dwfuse", "a_concat", "corrupted", "positive"),
    ("clean", "b_dwfuse", "b_beta0", "all", "zero"),
]
OMEGA_PLAN = [("omega_share_drop", "positive"), ("omega_drop", "zero")]


def planned_cells(seeds: list[int]) -> int:
    return len(seeds) * (len(CORRUPTED_ARMS) + len(CLEAN_ARMS))


def _omega_drops(omega: np.ndarray, corrupted: np.ndarray) -> tuple[float, float]:
    """Mean over modalities m of (clean - m-corrupted) for the share and for omega_m itself.

    omega: [N, M] label-driven weights; corrupted: [N], index of the corrupted modality or -1.
    """
    share = omega / omega.sum(axis=1, keepdims=True).clip(min=1e-12)
    clean = corrupted == -1
    share_drops, omega_drops = [], []
    for m in range(omega.shape[1]):
        hit = corrupted == m
        if hit.any() and clean.any():
            share_drops.append(share[clean, m].mean() - share[hit, m].mean())
            omega_drops.append(omega[clean, m].mean() - omega[hit, m].mean())
    if not share_drops:
        return float("nan"), float("nan")
    return float(np.mean(share_drops)), float(np.mean(omega_drops))


def measure(settings: SuiteSettings, progress: CellProgress) -> SeedValues:
    """Train the arms on both designs per seed; AUROC by sample regime and omega drops."""
    values = SeedValues()
    for seed in settings.seeds:
        for design, arms in (("corrupted", CORRUPTED_ARMS), ("clean", CLEAN_ARMS)):
            data = draw_design(DESIGNS[design], settings.train, settings, seed)
            labels, flags = data.test.dataset.labels, data.test.corrupted
            regimes = {"corrupted": flags >= 0, "clean": flags < 0, "all": None}
            for name, rows in regimes.items():
                if design == "corrupted" or name == "all":
                    oracle = auroc_on(labels, data.test.bayes_probability, rows)
                    values.add(f"{design}/oracle/auroc_{name}", oracle)
            for arm in arms:
                trained = train_arm(data, arm, seed, settings)
                predictions = predict(trained, data.test.dataset)
                for name, rows in regimes.items():
                    if design == "corrupted" or name == "all":
                        value = auroc_on(labels, predictions.probability, rows)
                        values.add(f"{design}/{arm}/auroc_{name}", value)
                if design == "corrupted" and predictions.omega is not None:
                    share, own = _omega_drops(predictions.omega, flags.numpy())
                    values.add(f"{design}/{arm}/omega_share_drop", share)
                    values.add(f"{design}/{arm}/omega_drop", own)
                    values.add(f"{design}/{arm}/omega_mean", float(predictions.omega.mean()))
                progress.advance(f"dwfuse {design} seed {seed} {arm}")
    return values


def _auroc_pair(
    values: SeedValues, design: str, method: str, reference: str, rows: str, expected: str
) -> MechanismResult:
    metric = f"auroc_{rows}"
    oracle = values.mean(f"{design}/oracle/{metric}")
    method_mean = values.mean(f"{design}/{method}/{metric}")
    reference_mean = values.mean(f"{design}/{reference}/{metric}")
    return paired_result(
        name=f"dwfuse/{design}/{method}-vs-{reference}",
        mechanism="dwfuse",
        control=design == "clean",
        expected_sign=expected,  # type: ignore[arg-type]
        method=method,
        reference=reference,
        metric=metric,
        method_values=values[f"{design}/{method}/{metric}"],
        reference_values=values[f"{design}/{reference}/{metric}"],
        details={
            "oracle_auroc": oracle,
            "method_auroc": method_mean,
            "reference_auroc": reference_mean,
            "method_oracle_distance": oracle - method_mean,
            "reference_oracle_distance": oracle - reference_mean,
        },
    )


def _omega_result(values: SeedValues, quantity: str, expected: str) -> MechanismResult:
    """Share or own weight of the corrupted modality: clean samples minus corrupted ones."""
    drops = values[f"corrupted/b_dwfuse/{quantity}"]
    return paired_result(
        name=f"dwfuse/corrupted/{quantity.removesuffix('_drop')}-of-corrupted-modality-falls",
        mechanism="dwfuse",
        control=expected != "positive",
        expected_sign=expected,  # type: ignore[arg-type]
        method="omega on clean samples",
        reference="omega on samples where that modality is corrupted",
        metric=quantity,
        method_values=drops,
        reference_values=[0.0] * len(drops),
        details={"omega_mean": values.mean("corrupted/b_dwfuse/omega_mean")},
    )


def summarise(values: SeedValues) -> list[MechanismResult]:
    """The PLAN's results from the measurements of every seed."""
    results = [_auroc_pair(values, *row) for row in PLAN]
    return results + [_omega_result(values, *row) for row in OMEGA_PLAN]

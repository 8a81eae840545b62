"""Scenario: forward/backward imputation (CRA) for a modality missing at test time.

Design (chosen from theory before any run). The latent z has 4 factors and the label reads
all of them with equal weight (logit 3 * w.z, |w| = 1). Modality A holds all 4 factors through
a random tanh network (link 'mlp'), so the latent is in A only non-linearly; B holds the same
4 factors (link 'mlp' in the main design), is present for 90% of training samples and missing
for 80% of test samples. Training sets are small (``train_small``).

Why a gain is possible at all: on a B-missing sample every arm predicts from x_A alone, so
imputation adds no information at test time. What it adds is at *training* time: the CRA is
trained (on samples where training-time dropping hides B) to regress B's d-dimensional
embedding from A's, a dense target that carries B's view of the latent, where the
no-imputation model learns A's path to the label from one binary label per sample. That
extra supervision matters when data is small and A's map to the latent is non-linear; it
should shrink with more training data (both arms learn A's path) and with more dropping
(the no-imputation model sees more A-only samples). Rows compared: (f) everything vs
(c) DWFuse + TLA (Table 4), and concat + forward imputation vs concat.

Controls: A and B both linear (the A -> B map is linear; little to learn; expect ~0); B pure
noise (the imputation target holds no latent information; a gain would mean leakage; expect
<= 0). A variant with A non-linear and B linear (the cleanest dense target; expect > 0).
The oracle bound is the Bayes AUROC of P(y | z) on the same B-missing test samples.

B-information (added after the first --quick smoke run, designs unchanged): the gain in the
main design minus the gain in the noise-B design, paired by seed. Both designs share every A
feature, label and missingness draw on a seed, so this isolates what B's information adds
beyond the architectural difference of the compared rows (expected > 0).
"""

from __future__ import annotations

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
    Link,
    MechanismDataConfig,
    MechanismModality,
)
from simulation.benchmarks.mechanisms_progress import CellProgress

LATENT = [0, 1, 2, 3]
HIGH_DROP = 0.9
METRIC = "auroc_b_missing"
# (design, training size, drop rate or None for the default 0.5) -> arms trained
CELLS: list[tuple[str, str, float | None, tuple[str, ...]]] = [
    ("mlp", "small", None, ("c_dwfuse_tla", "f_all", "a_concat", "concat_fw")),
    ("mlp", "large", None, ("c_dwfuse_tla", "f_all")),
    ("mlp", "small", HIGH_DROP, ("c_dwfuse_tla", "f_all")),
    ("linear", "small", None, ("c_dwfuse_tla", "f_all", "a_concat", "concat_fw")),
    ("noise", "small", None, ("c_dwfuse_tla", "f_all", "a_concat", "concat_fw")),
    ("a_mlp_b_linear", "small", None, ("c_dwfuse_tla", "f_all")),
]


def _modality(name: str, link: Link, **rates: float) -> MechanismModality:
    columns = [] if link == "noise" else LATENT
    return MechanismModality(
        name=name, dim=16, link=link, latent_columns=columns, noise=0.3, **rates
    )


def imputation_design(a_link: Link, b_link: Link) -> MechanismDataConfig:
    """A (always present) and B (missing for 10% of training, 80% of test samples)."""
    return MechanismDataConfig(
        modalities=[
            _modality("a", a_link),
            _modality("b", b_link, missing_train=0.1, missing_test=0.8),
        ],
        latent_dim=len(LATENT),
        label_weights=[1.0] * len(LATENT),
        label_scale=3.0,
    )


DESIGNS: dict[str, MechanismDataConfig] = {
    "mlp": imputation_design("mlp", "mlp"),
    "linear": imputation_design("linear", "linear"),
    "noise": imputation_design("mlp", "noise"),
    "a_mlp_b_linear": imputation_design("mlp", "linear"),
}


def _cell_key(design: str, size: str, drop: float | None) -> str:
    return f"{design}/n={size}" + (f"/drop={drop}" if drop is not None else "")


SMALL, LARGE = _cell_key("mlp", "small", None), _cell_key("mlp", "large", None)
HIGH_DROP_KEY = _cell_key("mlp", "small", HIGH_DROP)
LINEAR, NOISE = _cell_key("linear", "small", None), _cell_key("noise", "small", None)
B_LINEAR = _cell_key("a_mlp_b_linear", "small", None)
# Signs stated before any run (see the module docstring for why):
# (cell, method, reference, expected sign, control)
PLAN = [
    (SMALL, "f_all", "c_dwfuse_tla", "positive", False),
    (SMALL, "concat_fw", "a_concat", "positive", False),
    (B_LINEAR, "f_all", "c_dwfuse_tla", "positive", False),
    (LINEAR, "f_all", "c_dwfuse_tla", "zero", True),
    (LINEAR, "concat_fw", "a_concat", "zero", True),
    (NOISE, "f_all", "c_dwfuse_tla", "non-positive", True),
    (NOISE, "concat_fw", "a_concat", "non-positive", True),
]
# (name, cell whose gain should be larger, cell whose gain should be smaller, method,
# reference); expected > 0. The b-information rows were added after the first --quick smoke
# run, in which the noise-B control gained too (rows f and c differ in more than imputation:
# f's joint head reads the cascade's latents); no design or seed was changed. On one seed the
# 'mlp' and 'noise' designs share every A feature, label and missingness draw (all seeded by
# name and seed) and differ only in B, so the difference of their gains is the part of the
# gain that needs B's information.
SHRINK_PLAN = [
    ("imputation/mlp/gain-shrinks-with-more-data", SMALL, LARGE, "f_all", "c_dwfuse_tla"),
    (
        "imputation/mlp/gain-shrinks-with-more-dropping",
        SMALL,
        HIGH_DROP_KEY,
        "f_all",
        "c_dwfuse_tla",
    ),
    ("imputation/mlp/b-information", SMALL, NOISE, "f_all", "c_dwfuse_tla"),
    ("imputation/mlp/b-information-concat", SMALL, NOISE, "concat_fw", "a_concat"),
]


def planned_cells(seeds: list[int]) -> int:
    return len(seeds) * sum(len(arms) for *_, arms in CELLS)


def measure(settings: SuiteSettings, progress: CellProgress) -> SeedValues:
    """Train every cell of CELLS for every seed; AUROC on the B-missing test samples."""
    values = SeedValues()
    for seed in settings.seeds:
        for design, size, drop, arms in CELLS:
            n_train = settings.train_small if size == "small" else settings.train_large
            data = draw_design(DESIGNS[design], n_train, settings, seed)
            missing = ~data.test.dataset.availability[:, 1]
            labels = data.test.dataset.labels
            key = _cell_key(design, size, drop)
            values.add(f"{key}/oracle", auroc_on(labels, data.test.bayes_probability, missing))
            for arm in arms:
                trained = train_arm(data, arm, seed, settings, drop_rate=drop)
                scores = predict(trained, data.test.dataset).probability
                values.add(f"{key}/{arm}/{METRIC}", auroc_on(labels, scores, missing))
                values.add(f"{key}/{arm}/auroc_all", auroc_on(labels, scores))
                values.add(f"{key}/{arm}/best_epoch", trained.best_epoch)
                progress.advance(f"imputation {key} seed {seed} {arm}")
    return values


def _details(values: SeedValues, key: str, method: str, reference: str) -> dict:
    oracle = values.mean(f"{key}/oracle")
    method_auroc = values.mean(f"{key}/{method}/{METRIC}")
    reference_auroc = values.mean(f"{key}/{reference}/{METRIC}")
    return {
        "oracle_auroc": oracle,
        "method_auroc": method_auroc,
        "reference_auroc": reference_auroc,
        "method_oracle_distance": oracle - method_auroc,
        "reference_oracle_distance": oracle - reference_auroc,
        "method_auroc_all": values.mean(f"{key}/{method}/auroc_all"),
        "reference_auroc_all": values.mean(f"{key}/{reference}/auroc_all"),
        "method_best_epoch": values.mean(f"{key}/{method}/best_epoch"),
        "reference_best_epoch": values.mean(f"{key}/{reference}/best_epoch"),
    }


def _pair(
    values: SeedValues, key: str, method: str, reference: str, expected: str, control: bool
) -> MechanismResult:
    return paired_result(
        name=f"imputation/{key}/{method}-vs-{reference}",
        mechanism="imputation",
        control=control,
        expected_sign=expected,  # type: ignore[arg-type]
        method=method,
        reference=reference,
        metric=METRIC,
        method_values=values[f"{key}/{method}/{METRIC}"],
        reference_values=values[f"{key}/{reference}/{METRIC}"],
        details=_details(values, key, method, reference),
    )


def _shrink(
    values: SeedValues, name: str, key: str, other: str, method: str, reference: str
) -> MechanismResult:
    """Gain (method - reference) in ``key`` minus that in ``other``, paired by seed (> 0)."""
    gain = values.difference(f"{key}/{method}/{METRIC}", f"{key}/{reference}/{METRIC}")
    later = values.difference(f"{other}/{method}/{METRIC}", f"{other}/{reference}/{METRIC}")
    return paired_result(
        name=name,
        mechanism="imputation",
        control=False,
        expected_sign="positive",
        method=f"({method} - {reference}) at {key}",
        reference=f"({method} - {reference}) at {other}",
        metric=f"{METRIC} gain",
        method_values=gain,
        reference_values=later,
        details={
            "gain_at_method": sum(gain) / len(gain),
            "gain_at_reference": sum(later) / len(later),
            "oracle_auroc_method": values.mean(f"{key}/oracle"),
            "oracle_auroc_reference": values.mean(f"{other}/oracle"),
        },
    )


def summarise(values: SeedValues) -> list[MechanismResult]:
    """The PLAN's results from the measurements of every seed."""
    results = [_pair(values, *row) for row in PLAN]
    return results + [_shrink(values, *row) for row in SHRINK_PLAN]

"""What each federated mechanism scenario compares and the sign it expects, stated before any
run (the theory behind each sign is in ``mechanisms_federated``'s docstring)."""

from __future__ import annotations

from omnifuse_model.config import StrictModel
from simulation.benchmarks.mechanism_result import ExpectedSign


class ScenarioStatement(StrictModel):
    """What a scenario compares and the sign it expects, stated before anything runs."""

    name: str
    mechanism: str
    control: bool
    expected_sign: ExpectedSign
    method: str
    reference: str
    metric: str


STATEMENTS: dict[str, ScenarioStatement] = {
    s.name: s
    for s in (
        ScenarioStatement(
            name="federated-transfer/b-linear/imputation",
            mechanism="federated transfer of imputation",
            control=False,
            expected_sign="positive",
            method="fed_f",
            reference="fed_c",
            metric="target_test_auroc",
        ),
        ScenarioStatement(
            name="federated-transfer/b-linear/vs-alone",
            mechanism="federated transfer of imputation",
            control=False,
            expected_sign="positive",
            method="fed_f",
            reference="alone_f",
            metric="target_test_auroc",
        ),
        ScenarioStatement(
            name="federated-transfer/b-noise/imputation",
            mechanism="federated transfer of imputation",
            control=True,
            expected_sign="non-positive",
            method="fed_f",
            reference="fed_c",
            metric="target_test_auroc",
        ),
        ScenarioStatement(
            name="federated-transfer/b-information",
            mechanism="federated transfer of imputation",
            control=False,
            expected_sign="positive",
            method="gain_b_linear",
            reference="gain_b_noise",
            metric="target_test_auroc gain of fed_f over fed_c",
        ),
        ScenarioStatement(
            name="modality-aware-aggregation/skewed",
            mechanism="modality-aware aggregation",
            control=False,
            expected_sign="positive",
            method="aware",
            reference="plain",
            metric="test_auroc",
        ),
        ScenarioStatement(
            name="modality-aware-aggregation/all-hold-all",
            mechanism="modality-aware aggregation",
            control=True,
            expected_sign="zero",
            method="aware",
            reference="plain",
            metric="test_auroc",
        ),
    )
}
ARMS = {
    "fed_f": "federated, row f (with imputation)",
    "fed_c": "federated, row c (no imputation)",
    "alone_f": "target alone, row f",
    "alone_c": "target alone, row c",
    "gain_b_linear": "fed_f - fed_c, b a clean linear view of z",
    "gain_b_noise": "fed_f - fed_c, b pure noise (same sites otherwise)",
    "aware": "modality-aware FedAvg",
    "plain": "plain FedAvg",
}

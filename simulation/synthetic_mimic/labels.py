"""The label model of the synthetic cohort: phenotype prevalences and latent loadings.

``P(y = 1 | z) = sigmoid(b + s * w . z)`` with ``|w| = 1``, ``s`` the config's
``label_strength`` and ``b`` chosen so that the marginal prevalence is about the target
(probit approximation: ``b = logit(p) * sqrt(1 + pi s^2 / 8)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np

from omnifuse_model.data.ehr.listfiles import PHENOTYPE_LABELS

# Rough prevalences of the benchmark, and which latent factors drive each phenotype.
_PHENOTYPE_RISK: dict[str, tuple[float, tuple[float, float, float, float]]] = {
    "Acute and unspecified renal failure": (0.21, (0.6, 0.0, 0.3, 0.8)),
    "Acute cerebrovascular disease": (0.07, (1.0, 0.0, 0.2, 0.0)),
    "Acute myocardial infarction": (0.10, (0.3, 0.0, 1.0, 0.0)),
    "Cardiac dysrhythmias": (0.32, (0.2, 0.0, 1.0, 0.0)),
    "Chronic kidney disease": (0.13, (0.0, 0.0, 0.4, 1.0)),
    "Chronic obstructive pulmonary disease and bronchiectasis": (0.13, (0.0, 1.0, 0.2, 0.0)),
    "Complications of surgical procedures or medical care": (0.21, (0.6, 0.2, 0.2, 0.2)),
    "Conduction disorders": (0.07, (0.0, 0.0, 1.0, 0.0)),
    "Congestive heart failure; nonhypertensive": (0.27, (0.2, 0.3, 1.0, 0.0)),
    "Coronary atherosclerosis and other heart disease": (0.32, (0.0, 0.0, 1.0, 0.3)),
    "Diabetes mellitus with complications": (0.09, (0.2, 0.0, 0.0, 1.0)),
    "Diabetes mellitus without complication": (0.19, (0.0, 0.0, 0.2, 1.0)),
    "Disorders of lipid metabolism": (0.29, (0.0, 0.0, 0.7, 0.7)),
    "Essential hypertension": (0.42, (-0.3, 0.0, 0.8, 0.3)),
    "Fluid and electrolyte disorders": (0.27, (0.6, 0.0, 0.0, 0.8)),
    "Gastrointestinal hemorrhage": (0.07, (0.8, 0.0, 0.0, 0.3)),
    "Hypertension with complications and secondary hypertension": (0.13, (0.0, 0.0, 0.8, 0.6)),
    "Other liver diseases": (0.08, (0.4, 0.0, 0.0, 0.8)),
    "Other lower respiratory disease": (0.05, (0.0, 1.0, 0.0, 0.0)),
    "Other upper respiratory disease": (0.04, (0.2, 0.8, 0.0, 0.0)),
    "Pleurisy; pneumothorax; pulmonary collapse": (0.09, (0.2, 1.0, 0.0, 0.0)),
    "Pneumonia (except that caused by tuberculosis or sexually transmitted disease)": (
        0.14,
        (0.3, 1.0, 0.0, 0.0),
    ),
    "Respiratory failure; insufficiency; arrest (adult)": (0.17, (0.7, 1.0, 0.0, 0.0)),
    "Septicemia (except in labor)": (0.14, (1.0, 0.3, 0.0, 0.2)),
    "Shock": (0.08, (1.0, 0.0, 0.4, 0.0)),
}
if tuple(_PHENOTYPE_RISK) != PHENOTYPE_LABELS:  # pragma: no cover - guards a typo at import
    raise RuntimeError("synthetic phenotype table does not match PHENOTYPE_LABELS")
PHENOTYPE_RISK: Mapping[str, tuple[float, tuple[float, float, float, float]]] = MappingProxyType(
    _PHENOTYPE_RISK
)
"""Target prevalence and latent loadings (severity, respiratory, cardiac, metabolic)."""

MORTALITY_LOADINGS = (1.0, 0.35, 0.2, 0.1)


def label_bias(prevalence: float, strength: float) -> float:
    """Intercept giving about ``prevalence`` when the logit's slope on N(0, 1) is ``strength``."""
    logit = math.log(prevalence / (1.0 - prevalence))
    return logit * math.sqrt(1.0 + math.pi * strength**2 / 8.0)


def unit_vector(loadings: tuple[float, ...]) -> np.ndarray:
    w = np.asarray(loadings, dtype=float)
    return w / np.linalg.norm(w)

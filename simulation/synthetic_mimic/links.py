"""How the latent state reaches the files: non-linear modality links, acuity and missingness.

Non-linear link of modality ``m`` (``z`` has one entry per latent factor, each about N(0, 1)):

``h_m(z)_k = c_k * (tanh(2 (z_k - t_k)) + 0.6 z_k z_p(k)) - d_k``

a soft threshold ``t_k`` on the factor itself plus an interaction with a partner factor
``p(k) != k``. ``t`` and ``p`` are drawn from a generator seeded with the modality's name (so
EHR, CXR and reports bend the risk differently, and the same name always the same way);
``c_k``, ``d_k`` standardise each output to mean 0 and SD 1 under ``z ~ N(0, I)``. The view is
``signal * ((1 - a) z + a h_m(z)) + noise * e`` with ``a`` the modality's ``nonlinearity``.

Acuity is the stay's position along the mortality direction of the latent state,
``w . z`` with ``|w| = 1`` (about N(0, 1)); the sicker the patient, the likelier an image and a
report when the config's acuity slopes are positive.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

_SAMPLES = 50_000


@dataclass(frozen=True)
class NonlinearLink:
    """The map ``h_m`` of one modality (see module docstring)."""

    thresholds: np.ndarray
    partners: np.ndarray
    scale: np.ndarray
    shift: np.ndarray

    def raw(self, z: np.ndarray) -> np.ndarray:
        """Un-standardised ``tanh(2 (z_k - t_k)) + 0.6 z_k z_p(k)`` (works on ``[..., K]``)."""
        return np.tanh(2.0 * (z - self.thresholds)) + 0.6 * z * z[..., self.partners]

    def __call__(self, z: np.ndarray) -> np.ndarray:
        return self.raw(z) * self.scale - self.shift


def name_seed(name: str) -> int:
    """A stable seed from a modality name (CRC-32 of its UTF-8 bytes)."""
    return zlib.crc32(name.encode("utf-8"))


@lru_cache(maxsize=16)
def nonlinear_link(name: str, factors: int) -> NonlinearLink:
    """The link of modality ``name`` over ``factors`` latent factors (cached, deterministic)."""
    if factors < 2:
        raise ValueError(
            f"nonlinear_link({name!r}): needs at least 2 latent factors, got {factors}"
        )
    rng = np.random.default_rng(name_seed(name))
    thresholds = rng.uniform(-0.6, 0.6, size=factors)
    offsets = rng.integers(1, factors, size=factors)
    partners = (np.arange(factors) + offsets) % factors
    unscaled = NonlinearLink(thresholds, partners, np.ones(factors), np.zeros(factors))
    sample = unscaled.raw(
        np.random.default_rng([name_seed(name), 1]).normal(size=(_SAMPLES, factors))
    )
    scale = 1.0 / sample.std(axis=0)
    return NonlinearLink(thresholds, partners, scale, sample.mean(axis=0) * scale)


def linked(z: np.ndarray, name: str, nonlinearity: float) -> np.ndarray:
    """``(1 - a) z + a h_name(z)``; exactly ``z`` when ``a = 0``."""
    if nonlinearity == 0.0:
        return z
    link = nonlinear_link(name, z.shape[-1])
    return (1.0 - nonlinearity) * z + nonlinearity * link(z)


def acuity(z: np.ndarray, loadings: tuple[float, ...]) -> float:
    """The stay's acuity: ``z`` projected on the unit vector of ``loadings``."""
    w = np.asarray(loadings, dtype=float)
    return float(z @ (w / np.linalg.norm(w)))


def present_probability(missing_rate: float, slope: float, acuity_value: float) -> float:
    """P(the modality is present): ``sigmoid(logit(1 - missing_rate) + slope * acuity)``.

    With ``slope = 0`` (or a rate of 0 or 1, where the logit is infinite) this is exactly
    ``1 - missing_rate``: missing completely at random, as before acuity slopes existed.
    """
    base = 1.0 - missing_rate
    if slope == 0.0 or base in (0.0, 1.0):
        return base
    logit = math.log(base / (1.0 - base)) + slope * acuity_value
    return 1.0 / (1.0 + math.exp(-logit))

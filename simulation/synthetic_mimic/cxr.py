"""Synthetic chest X-rays in the MIMIC-CXR-JPG layout: small grayscale JPEGs and metadata rows.

An image is a schematic chest (body, two lung fields, heart shadow) on which the study's
planted findings (:mod:`.findings`) are drawn where a radiologist would see them: a lower-zone
opacity on its side(s), a heart shadow widened by cardiomegaly, costophrenic haze for an
effusion, perihilar haze for edema, each stronger with its grade. Pixel noise (its SD set per
hospital) and jittered blob positions make every image different. Layout:
design/MIMIC_FORMATS.md section 3.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

from omnifuse_model.data.cxr.images import METADATA_COLUMNS
from simulation.synthetic_mimic.cohort import StudyPlan
from simulation.synthetic_mimic.findings import Findings

METADATA_HEADER: tuple[str, ...] = METADATA_COLUMNS
"""Exact header of ``mimic-cxr-2.0.0-metadata.csv`` (the reader's definition)."""

_VIEW_MEANING = {
    "AP": "antero-posterior",
    "PA": "postero-anterior",
    "LATERAL": "lateral",
    "LL": "left lateral",
    "": "",
}
_ORIENTATION = {"AP": "Recumbent", "PA": "Erect", "LATERAL": "Erect", "LL": "Erect", "": ""}


def study_description(study: StudyPlan) -> str:
    """Procedure of a study: portable AP for bedside films, PA and lateral otherwise."""
    views = {view for _, view in study.images}
    return "CHEST (PA AND LAT)" if "PA" in views or "LL" in views else "CHEST (PORTABLE AP)"


def image_path(subject_id: int, study_id: int, dicom_id: str) -> str:
    """``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg`` relative to the MIMIC-CXR-JPG root."""
    return f"files/p{str(subject_id)[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg"


def study_time(study: StudyPlan) -> tuple[str, str]:
    """``(StudyDate, StudyTime)`` as in the metadata: ``21800506``, ``80556.875``."""
    t = study.time
    hhmmss = t.hour * 10_000 + t.minute * 100 + t.second
    return t.strftime("%Y%m%d"), repr(float(f"{hhmmss}.{study.millis:03d}"))


def metadata_rows(subject_id: int, study: StudyPlan, size: int) -> list[list[str]]:
    """One metadata row per image of the study."""
    date, time = study_time(study)
    procedure = study_description(study)
    return [
        [
            dicom_id,
            str(subject_id),
            str(study.study_id),
            procedure,
            view,
            str(size),
            str(size),
            date,
            time,
            procedure,
            _VIEW_MEANING[view],
            _ORIENTATION[view],
        ]
        for dicom_id, view in study.images
    ]


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[-1.0 : 1.0 : size * 1j, -1.0 : 1.0 : size * 1j]
    return y, x


def _blob(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float):
    return np.exp(-(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2))


@lru_cache(maxsize=8)
def _anatomy(size: int, lateral: bool) -> np.ndarray:
    """Body and lung fields, the part of every image that no risk changes."""
    y, x = _grid(size)
    img = 0.1 + 0.5 * np.exp(-((np.abs(x) / 0.85) ** 4 + (np.abs(y - 0.05) / 0.95) ** 4))
    if lateral:
        return img - 0.3 * _blob(x, y, 0.05, -0.05, 0.5, 0.6)
    return img - 0.32 * (
        _blob(x, y, -0.38, -0.05, 0.28, 0.55) + _blob(x, y, 0.38, -0.05, 0.28, 0.55)
    )


_OPACITY = (0.0, 0.14, 0.24, 0.34)  # blob intensity by grade
_EFFUSION = (0.0, 0.12, 0.2, 0.28)  # costophrenic haze intensity by grade
_EDEMA = (0.0, 0.06, 0.1, 0.15)  # perihilar haze intensity by grade
PIXEL_NOISE = 0.035
"""Pixel noise SD (fraction of full scale) of a hospital with ``image_noise = 1``."""


def _sides(side: str, lobes: tuple[float, ...]) -> tuple[float, ...]:
    """Lung-field centres a finding on ``side`` covers (image left = patient right)."""
    if len(lobes) == 1 or side == "bilateral":
        return lobes
    return (lobes[0],) if side == "right" else (lobes[1],)


def render_cxr(
    findings: Findings,
    position: str,
    size: int,
    rng: np.random.Generator,
    noise: float = PIXEL_NOISE,
) -> np.ndarray:
    """A ``[size, size]`` uint8 chest image showing ``findings`` in ViewPosition ``position``.

    Cardiomegaly widens the heart shadow by 12% per grade, an opacity is a lower-zone blob,
    an effusion a haze in the costophrenic angle(s), edema a bilateral perihilar haze; each
    grows with its grade. ``noise`` is the SD of the added pixel noise.
    """
    y, x = _grid(size)
    lateral = position in ("LATERAL", "LL")
    img = _anatomy(size, lateral).copy()
    heart = 1.0 + 0.12 * _grade(findings, "cardiomegaly")
    if lateral:
        img += 0.25 * _blob(x, y, -0.15, 0.3, 0.25 * heart, 0.25)
        lobes: tuple[float, ...] = (0.05,)
    else:
        img += 0.3 * _blob(x, y, 0.06, 0.32, 0.2 * heart, 0.2)
        lobes = (-0.38, 0.38)
    jitter = rng.normal(0, 0.05, size=2)
    if "opacity" in findings:
        strength = _OPACITY[findings["opacity"].grade]
        for lobe in _sides(findings["opacity"].side, lobes):
            img += strength * _blob(x, y, lobe + jitter[0], 0.25 + jitter[1], 0.17, 0.17)
    if "effusion" in findings:
        grade = findings["effusion"].grade
        for lobe in _sides(findings["effusion"].side, lobes):
            img += _EFFUSION[grade] * _blob(x, y, lobe * 1.3, 0.6, 0.2, 0.06 + 0.03 * grade)
    edema = _EDEMA[_grade(findings, "edema")]
    if edema:
        for lobe in lobes:
            img += edema * _blob(x, y, lobe * 0.6, 0.0, 0.22, 0.35)
    img += rng.normal(0, noise, img.shape)
    return (np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def _grade(findings: Findings, name: str) -> int:
    return findings[name].grade if name in findings else 0


def encode_jpeg(pixels: np.ndarray) -> bytes:
    """Grayscale JPEG bytes (deterministic for the same pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()

"""Synthetic chest X-rays in the MIMIC-CXR-JPG layout: small grayscale JPEGs and metadata rows.

An image is a schematic chest (body, two lung fields, heart shadow) on which the stay's CXR
view ``v = (severity, respiratory, cardiac, metabolic)`` draws what a radiologist would see:
a lower-lobe opacity whose intensity rises with respiratory and severity risk, a heart shadow
widened by cardiac risk, and costophrenic haze (effusion) with cardiac risk. Pixel noise and
random blob positions make every image different. Layout: design/MIMIC_FORMATS.md section 3.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

from omnifuse_model.data.cxr.images import METADATA_COLUMNS
from simulation.synthetic_mimic.cohort import StudyPlan

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


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


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


def render_cxr(view: np.ndarray, position: str, size: int, rng: np.random.Generator):
    """A ``[size, size]`` uint8 chest image for CXR view ``view`` and ViewPosition ``position``."""
    sev, resp, card, _ = (float(v) for v in view)
    y, x = _grid(size)
    lateral = position in ("LATERAL", "LL")
    img = _anatomy(size, lateral).copy()
    cardiac = float(np.clip(card, -2.0, 3.0))
    if lateral:
        img += 0.25 * _blob(x, y, -0.15, 0.3, 0.25 * (1 + 0.12 * cardiac), 0.25)
        lobes: tuple[float, ...] = (0.05,)
    else:
        img += 0.3 * _blob(x, y, 0.06, 0.32, 0.2 * (1 + 0.15 * cardiac), 0.2)
        lobes = (-0.38, 0.38)
    side = lobes[int(rng.integers(len(lobes)))]
    opacity = 0.35 * _sigmoid(1.6 * (resp + 0.5 * sev) - 1.0)
    cx, cy = side + rng.normal(0, 0.05), 0.25 + rng.normal(0, 0.05)
    img += opacity * _blob(x, y, cx, cy, 0.17, 0.17)
    effusion = 0.25 * _sigmoid(1.6 * card - 1.5)
    for lobe in lobes:
        img += effusion * _blob(x, y, lobe * 1.3, 0.55, 0.18, 0.1)
    img += rng.normal(0, 0.035, img.shape)
    return (np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray) -> bytes:
    """Grayscale JPEG bytes (deterministic for the same pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()

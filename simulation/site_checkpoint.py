"""A trained model's checkpoint as `omnifuse evaluate` and `omnifuse predict` read it.

CHECKPOINT may be

* a checkpoint folder (``model.safetensors`` + ``config.json``): a centralised run's
  ``RUN_DIR/checkpoint`` or one federated round ``RUN_DIR/checkpoints/round_0003``;
* a centralised run's folder (``RUN_DIR``, holding ``checkpoint/``);
* a federated run's folder or its ``checkpoints`` folder: ``checkpoints/latest`` names the
  round, or ``RUN_DIR/checkpoints/latest`` itself.

Besides the model config, the checkpoint carries the preprocessing its model was trained
with: a centralised run's ``extra.preprocessing``, a federated round's
``extra.server_state.preprocessing`` (the statistics phase's decision), both in
``server.statistics_phase.Preprocessing`` JSON: the EHR normaliser and the backbone
fingerprints the feature caches must have. A site whose modalities, task or backbone
fingerprints differ from the checkpoint's is refused, naming both values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from client.statistics import cache_fingerprints
from omnifuse_model.batch import InMemoryMultimodalDataset
from omnifuse_model.model import OmniFuse, read_checkpoint
from omnifuse_model.site_config import SiteConfig
from omnifuse_model.site_data import load_site_test_dataset
from simulation.prepared_sites import normalizer_of

WEIGHTS = "model.safetensors"
PREPROCESSING = "preprocessing"


@dataclass
class LoadedCheckpoint:
    """The model, where it came from and the preprocessing it was trained with."""

    model: OmniFuse
    path: Path
    sha256: str
    kind: str  # "centralised" or "federated"
    round: int | None
    preprocessing: dict

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "kind": self.kind,
            "round": self.round,
            "modalities": self.model.config.modality_names,
            "task": self.model.config.task,
            "num_classes": self.model.config.num_classes,
        }


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder ``path`` names (see the module docstring)."""
    path = Path(path)
    if path.name == "latest" and path.is_file():
        path = path.parent
    candidates = [path, path / "checkpoint"]
    for folder in (path, path / "checkpoints"):
        pointer = folder / "latest"
        if pointer.is_file():
            candidates.insert(0, folder / pointer.read_text(encoding="utf-8").strip())
    for candidate in candidates:
        if (candidate / WEIGHTS).is_file():
            return candidate
    raise FileNotFoundError(
        f"checkpoint {path}: no {WEIGHTS} there, in {path / 'checkpoint'} or in the round "
        f"that {path / 'checkpoints' / 'latest'} names; expected a centralised run's "
        "checkpoint or a federated run's round checkpoint"
    )


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """The model and preprocessing of a centralised or federated checkpoint."""
    folder = resolve_checkpoint(path)
    _, meta = read_checkpoint(folder)
    extra = meta.get("extra") or {}
    server_state = extra.get("server_state")
    if server_state is not None:
        kind, number = "federated", server_state.get("round")
        preprocessing = server_state.get(PREPROCESSING) or {}
    else:
        kind, number = "centralised", None
        preprocessing = extra.get(PREPROCESSING) or {}
    model = OmniFuse.from_checkpoint(folder)
    model.eval()
    return LoadedCheckpoint(
        model, folder.resolve(), _sha256(folder / WEIGHTS), kind, number, preprocessing
    )


def check_site(loaded: LoadedCheckpoint, site: SiteConfig) -> None:
    """Refuse a site whose modalities or backbone fingerprints differ from the checkpoint's."""
    names = loaded.model.config.modality_names
    unknown = sorted(set(site.modalities) - set(names))
    if unknown:
        raise ValueError(
            f"site '{site.name}': modalities {sorted(site.modalities)} include {unknown}, "
            f"which checkpoint {loaded.path} does not have (its modalities: {names})"
        )
    expected = loaded.preprocessing.get("expected_fingerprints") or {}
    if site.data.source != "feature_cache" or not expected:
        return
    found = cache_fingerprints(site, names)
    for modality, digest in sorted(found.items()):
        if modality in expected and expected[modality] != digest:
            raise ValueError(
                f"site '{site.name}': the {modality} features of its cache {site.cache_dir} "
                f"come from backbone fingerprint {digest[:16]}..., checkpoint {loaded.path} "
                f"was trained on {expected[modality][:16]}...; prepare the cache with the "
                "checkpoint's backbone"
            )


def site_test_data(loaded: LoadedCheckpoint, site: SiteConfig) -> InMemoryMultimodalDataset:
    """The site's test split, preprocessed as the checkpoint's model was trained."""
    check_site(loaded, site)
    normalizer = normalizer_of(loaded.preprocessing)
    data = load_site_test_dataset(site, loaded.model.config, normalizer)
    if len(data) == 0:
        raise ValueError(f"site '{site.name}': the test split holds no stay")
    return data

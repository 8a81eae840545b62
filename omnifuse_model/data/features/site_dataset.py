"""A site's training data from its feature cache, in the model's modality order.

:func:`load_cached_split` reads ``manifest.json`` and the cached entries written by
:func:`~omnifuse_model.data.features.cache.prepare_site` and returns an
:class:`~omnifuse_model.batch.InMemoryMultimodalDataset` in the layout of
:mod:`omnifuse_model.batch`:

* inputs ``ehr`` ``[24, 76]`` (normalised with the site's train-split normaliser, or one
  given, e.g. fitted from federated aggregates), ``cxr`` ``[512]``, ``rep`` ``[150, 768]``
  float32 (stored as float16) with mask ``rep`` bool ``[150]``;
* availability bool ``[M]`` in the order of the model's modalities: False (and zero input)
  for a modality the model has but the site does not hold, or the stay lacks;
* label float ``[1]`` for in-hospital mortality, ``[25]`` for phenotyping;
* sample_id: the stay name (``10011_episode1_timeseries.csv``).

Memory: ``ehr`` and ``cxr`` are held as float32 (~9 KB a stay). ``rep`` is a
:class:`~omnifuse_model.data.features.mapped_rows.MappedRows` column: the float16 token states
stay in the memory-mapped shards and a batch's rows are read (and made float32) when the batch
is built, so loading a split reads no token states and a full-MIMIC split of ~15k stays does
not need its ~7 GB as float32 in memory (the pages read are page cache, shared and
reclaimable). Stays with none of the model's modalities available are left out (logged), as
the training loop needs at least one per sample.

Cost: a ClientApp loads its train and val splits for every train and evaluate message
(:func:`load_cached_splits`: one manifest read, one shard index). The first load in a process
hashes the shards it maps; later ones stat the shards, reuse their parsed headers and copy
``ehr``/``cxr`` rows with one gather per shard (``simulation/benchmarks/site_loading.py``
measures both).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnifuse_model.batch import InMemoryMultimodalDataset
from omnifuse_model.config import ModalitySpec
from omnifuse_model.data.ehr.discretizer import NUM_FEATURES
from omnifuse_model.data.ehr.normalizer import EHRNormalizer
from omnifuse_model.data.features.manifest import MANIFEST_FILE, NORMALIZER_FILE, read_manifest
from omnifuse_model.data.features.mapped_rows import MappedRows
from omnifuse_model.data.features.store import FailureRecordError, FeatureStore
from omnifuse_model.data.ingest_report import SPLITS
from omnifuse_model.site_config import SiteConfig

logger = logging.getLogger(__name__)

EHR_BINS = 24
"""48 h at timestep 2 h."""
# Equal to backbones.RESNET34_FEATURES and backbones.REPORT_TOKENS (tested); not imported from
# there because that module pulls in torchvision and tokenizers, slow to import for a client.
RESNET34_FEATURES = 512
REPORT_TOKENS = 150
_FIELDS: dict[str, tuple[str, ...]] = {"ehr": ("ehr",), "cxr": ("features",), "rep": ("states",)}


def mimic_model_modalities(text_hidden: int = 768) -> list[ModalitySpec]:
    """The MIMIC modalities as the model sees them: ``ehr`` time series ``[24, 76]``,
    ``cxr`` ResNet-34 features ``[512]``, ``rep`` BERT token states ``[150, text_hidden]``."""
    return [
        ModalitySpec(name="ehr", kind="timeseries", input_dim=NUM_FEATURES, seq_len=EHR_BINS),
        ModalitySpec(name="cxr", kind="image_features", input_dim=RESNET34_FEATURES),
        ModalitySpec(name="rep", kind="token_states", input_dim=text_hidden, seq_len=REPORT_TOKENS),
    ]


def load_normalizer(cache_dir: str | Path) -> EHRNormalizer:
    """The EHR normaliser :func:`prepare_site` fitted on the site's train split."""
    path = Path(cache_dir) / NORMALIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no EHR normaliser (the train split had no usable EHR when the cache was "
            "prepared); pass one fitted elsewhere, e.g. from federated aggregates"
        )
    return EHRNormalizer.load(path)


def _columns(
    store: FeatureStore,
    spec: ModalitySpec,
    fields: tuple[str, ...],
    keys: list[str | None],
    where: Path,
) -> dict[str, MappedRows]:
    """``fields`` of the cached entries ``keys`` (None: absent) as mapped columns, the first
    checked against the model's input shape; errors name ``where`` and the fix."""
    try:
        columns = store.mapped_columns(spec.name, fields, keys)
    except KeyError as error:
        raise ValueError(
            f"{where}: {error.args[0]}; the cache is incomplete, run `omnifuse prepare` again"
        ) from None
    except FailureRecordError as error:
        raise ValueError(f"{where}: {spec.name} entry {error.key} is a failure record") from None
    except ValueError as error:
        raise ValueError(f"{where}: {spec.name}: {error}") from None
    values = columns[fields[0]]
    if values.views and values.row_shape != spec.input_shape:
        raise ValueError(
            f"{where}: cached {spec.name} inputs have shape {values.row_shape}, the model's "
            f"modality '{spec.name}' expects {spec.input_shape}; prepare the cache with "
            "matching settings or change the model config"
        )
    return columns


def _fill(
    store: FeatureStore, spec: ModalitySpec, keys: list[str | None], where: Path
) -> torch.Tensor:
    """The cached entries ``keys`` as one float32 ``[n, *input_shape]`` tensor (None keys:
    zero rows), read with one gather per shard."""
    column = _columns(store, spec, _FIELDS[spec.name], keys, where)[_FIELDS[spec.name][0]]
    if not column.views:
        return _zeros(len(keys), *spec.input_shape)
    return column.read()


def _mapped_token_states(
    store: FeatureStore, spec: ModalitySpec, keys: list[str | None], where: Path
) -> tuple[MappedRows, torch.Tensor]:
    """Token states as a column read lazily from the mapped shards (float16 on disk, float32
    per batch) and the token masks in memory (bool ``[n, T]``); None keys are absent."""
    if spec.name not in _FIELDS:
        keys = [None] * len(keys)
    field = _FIELDS.get(spec.name, ("states",))[0]
    columns = _columns(store, spec, (field, "mask"), keys, where)
    states = columns[field]
    if not states.views:
        states = MappedRows([], states.shard, states.row, spec.input_shape)
        return states, _zeros(len(keys), spec.input_shape[0], dtype=np.bool_)
    return states, columns["mask"].read(dtype=torch.bool)


def _normalised(ehr: torch.Tensor, present: torch.Tensor, scaler: EHRNormalizer) -> torch.Tensor:
    """``ehr`` (float32, freshly read) with the ``present`` rows scaled by ``scaler``, absent
    rows left zero: the numbers of ``scaler.transform`` of the present rows (the scaling is
    elementwise, so scaling all rows in place when all are present gives the same)."""
    values = ehr.numpy()
    if bool(present.all()):
        scaler.transform_in_place(values)
    else:
        rows = present.numpy()
        values[rows] = scaler.transform(values[rows])
    return ehr


def _zeros(*shape: int, dtype: type = np.float32) -> torch.Tensor:
    """A zero tensor from NumPy (lazily zeroed pages; torch.zeros fills in parallel, which
    stalls when the cores are busy)."""
    return torch.from_numpy(np.zeros(shape, dtype=dtype))


def _read_site_manifest(site: SiteConfig, splits: Sequence[str]) -> tuple[dict[str, Any], Path]:
    """The cache's manifest, checked against the site's task; and its path for errors."""
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {list(SPLITS)}")
    cache_dir = Path(site.cache_dir)
    manifest = read_manifest(cache_dir)
    where = cache_dir / MANIFEST_FILE
    if manifest["task"] != site.task:
        raise ValueError(
            f"{where}: prepared for task {manifest['task']!r}, site '{site.name}' has task "
            f"{site.task!r}; run `omnifuse prepare` again"
        )
    return manifest, where


def load_cached_split(
    site: SiteConfig,
    split: str,
    *,
    modalities: Sequence[ModalitySpec] | None = None,
    normalizer: EHRNormalizer | None = None,
) -> InMemoryMultimodalDataset:
    """The ``split`` (``train``, ``val`` or ``test``) of ``site``'s feature cache.

    ``modalities`` are the model's, in its order (default :func:`mimic_model_modalities` with
    the cached text width). ``normalizer`` defaults to the cache's own. Raises
    ``FileNotFoundError`` when the cache is not prepared, ``ValueError`` when it does not
    fit the site (task) or the model (shapes), naming the file, and
    :class:`~omnifuse_model.data.features.store.CorruptShardError` naming a shard that fails
    its checksum.
    """
    return load_cached_splits(site, [split], modalities=modalities, normalizer=normalizer)[split]


def load_cached_splits(
    site: SiteConfig,
    splits: Sequence[str],
    *,
    modalities: Sequence[ModalitySpec] | None = None,
    normalizer: EHRNormalizer | None = None,
) -> dict[str, InMemoryMultimodalDataset]:
    """Several splits of ``site``'s feature cache, as :func:`load_cached_split` returns each;
    the manifest is read and each modality's shard index built once for all of them."""
    manifest, where = _read_site_manifest(site, splits)
    if modalities is None:
        text_hidden = manifest.get("shapes", {}).get("rep", [REPORT_TOKENS, 768])[1]
        modalities = mimic_model_modalities(text_hidden)
    store = FeatureStore(site.cache_dir)
    scalers: list[EHRNormalizer] = [normalizer] if normalizer is not None else []

    def scaler() -> EHRNormalizer:
        if not scalers:
            scalers.append(load_normalizer(site.cache_dir))
        return scalers[0]

    return {
        split: _split_dataset(site, manifest, split, store, modalities, scaler, where)
        for split in splits
    }


def _split_dataset(
    site: SiteConfig,
    manifest: dict[str, Any],
    split: str,
    store: FeatureStore,
    modalities: Sequence[ModalitySpec],
    scaler: Callable[[], EHRNormalizer],
    where: Path,
) -> InMemoryMultimodalDataset:
    """One split of the cache (see :func:`load_cached_split`)."""
    stays: list[dict[str, Any]] = manifest["splits"][split]
    n = len(stays)
    inputs: dict[str, torch.Tensor | MappedRows] = {}
    masks: dict[str, torch.Tensor] = {}
    availability = torch.zeros(n, len(modalities), dtype=torch.bool)
    for column, spec in enumerate(modalities):
        held = spec.name in site.modalities and spec.name in manifest["modalities"]
        keys = [stay.get(spec.name) if held else None for stay in stays]
        if spec.kind == "token_states":
            inputs[spec.name], masks[spec.name] = _mapped_token_states(store, spec, keys, where)
            availability[:, column] = torch.tensor([key is not None for key in keys])
            continue
        if not held or spec.name not in _FIELDS:
            inputs[spec.name] = _zeros(n, *spec.input_shape)
            continue
        inputs[spec.name] = _fill(store, spec, keys, where)
        availability[:, column] = torch.tensor([key is not None for key in keys])
        if spec.name == "ehr" and availability[:, column].any():
            inputs["ehr"] = _normalised(inputs["ehr"], availability[:, column], scaler())
    labels = torch.tensor([stay["labels"] for stay in stays], dtype=torch.float32)
    labels = labels.reshape(n, len(manifest["label_names"]))
    dataset = InMemoryMultimodalDataset(
        inputs, availability, labels, masks, [stay["stay"] for stay in stays]
    )
    return _without_empty_stays(dataset, availability, site.name, split, modalities)


def _without_empty_stays(
    dataset: InMemoryMultimodalDataset,
    availability: torch.Tensor,
    site: str,
    split: str,
    modalities: Sequence[ModalitySpec],
) -> InMemoryMultimodalDataset:
    keep = availability.any(dim=1)
    if keep.all():
        return dataset
    logger.info(
        "site %s, %s: %d of %d stays have none of the model's modalities %s and are left out",
        site,
        split,
        int((~keep).sum()),
        len(keep),
        [spec.name for spec in modalities],
    )
    return dataset.subset(keep.nonzero().squeeze(1))

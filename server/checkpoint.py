"""Per-round server checkpoints in the model's own format, and resuming from the newest
readable one.

Layout of ``run_dir``::

    checkpoints/round_0003/{model.safetensors, config.json}   written atomically per round
                                                               (config.json on one line)
    checkpoints/latest                                         name of the newest round folder
    metrics.json, audit.csv, audit.json                        rewritten every round

A round folder is an ``OmniFuse`` checkpoint (``omnifuse_model.model.write_checkpoint``):
``OmniFuse.from_checkpoint`` loads it; the server's state rides in ``extra.server_state``.
When the newest checkpoint is truncated or corrupt, ``load_latest`` falls back to the newest
one that reads and says which it skipped and why.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.model import read_checkpoint, write_checkpoint

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
SERVER_STATE = "server_state"


@dataclass
class ServerState:
    """Everything needed to continue a federation after ``round``."""

    round: int
    site_laziness: dict[str, str] = field(default_factory=dict)
    global_laziness: str = ""
    history: dict = field(default_factory=dict)
    audit_rows: list[dict] = field(default_factory=list)
    run_config: dict = field(default_factory=dict)
    model_config: dict = field(default_factory=dict)
    sites: dict = field(default_factory=dict)  # server.site_registry.SiteRegistry.to_json()
    preprocessing: dict = field(default_factory=dict)  # statistics_phase.Preprocessing.to_json()


@dataclass
class LoadedCheckpoint:
    weights: dict[str, np.ndarray]
    state: ServerState
    note: str = ""  # set when newer checkpoints were skipped as unreadable


def as_tensor(value: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing ``value``'s memory (a copy only when it is read-only or not
    contiguous): the weights are only read from it."""
    if not value.flags.writeable:
        value = value.copy()
    return torch.from_numpy(np.ascontiguousarray(value))


def save_round(run_dir: Path, weights: dict[str, np.ndarray], state: ServerState) -> Path:
    """Write round ``state.round`` atomically (temp folder, then rename), update 'latest'."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round_{state.round:04d}"
    temp = root / f".tmp_round_{state.round:04d}"
    shutil.rmtree(temp, ignore_errors=True)
    tensors = {k: as_tensor(v) for k, v in weights.items()}
    config = OmniFuseConfig.model_validate(state.model_config)
    # the state's fields are plain JSON data already: no deep copy (asdict) before dumping
    server_state = {f.name: getattr(state, f.name) for f in fields(state)}
    write_checkpoint(temp, tensors, config, extra={SERVER_STATE: server_state}, indent=None)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temp, final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, root / LATEST)
    return final


def _read_round(folder: Path) -> tuple[dict[str, np.ndarray], ServerState]:
    weights, meta = read_checkpoint(folder)
    try:
        state = ServerState(**meta["extra"][SERVER_STATE])
    except (KeyError, TypeError) as error:
        raise ValueError(f"checkpoint {folder}: no readable server state ({error})") from error
    return {k: v.numpy() for k, v in weights.items()}, state


def _candidates(root: Path) -> list[Path]:
    """Round folders newest first, the one 'latest' names leading."""
    folders = sorted(
        (p for p in root.glob("round_*") if p.is_dir() and p.name[6:].isdigit()),
        key=lambda p: int(p.name[6:]),
        reverse=True,
    )
    pointer = root / LATEST
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and named in folders:
        folders.remove(named)
    return ([named] if named is not None else []) + folders


def load_latest(run_dir: Path) -> LoadedCheckpoint | None:
    """The newest readable checkpoint, or None when there is none at all.

    Raises ``ValueError`` when checkpoints exist but none can be read.
    """
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    candidates = _candidates(root)
    if not candidates:
        return None
    skipped: list[str] = []
    for folder in candidates:
        try:
            weights, state = _read_round(folder)
        except (OSError, ValueError) as error:
            skipped.append(f"{folder.name}: {error}"[:300])
            log.warning("checkpoint %s is unreadable, trying an older one: %s", folder, error)
            continue
        note = (
            f"resumed from {folder.name}; skipped unreadable {'; '.join(skipped)}"
            if skipped
            else ""
        )
        return LoadedCheckpoint(weights, state, note)
    raise ValueError(f"{root}: no readable checkpoint ({'; '.join(skipped)})")

"""Per-round server checkpoints in the model's own format, and resuming from the newest
readable one.

Layout of ``run_dir``::

    checkpoints/round_0003/{model.safetensors, config.json}   written atomically per round
                                                               (config.json on one line)
    checkpoints/latest                                         name of the newest round folder
    metrics.json, audit.csv, audit.json                        rewritten every round

A round folder is an ``OmniFuse`` checkpoint (``omnifuse_model.model.write_checkpoint``):
``OmniFuse.from_checkpoint`` loads it; the server's state rides in ``extra.server_state``.
Every byte of a checkpoint is checked before a run resumes from it: 'latest' must name a
plain ``round_NNNN`` folder inside ``checkpoints/`` (never a path), the server state is
validated strictly (``StoredServerState``) and its round must be the folder's NNNN, and the
model config and the weights (keys, shapes, dtypes) must be exactly the run's. A round that
fails any check is treated like a truncated one: ``load_latest`` falls back to the newest
round that passes, and its note (logged, and kept in metrics.json) names each round skipped
and why; when none passes it raises ``ValueError`` with every reason. A run dir written by
another model therefore never resumes: all its rounds fail the config check.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from pydantic import ConfigDict, Field, ValidationError

from omnifuse_model.config import OmniFuseConfig, StrictModel
from omnifuse_model.model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_weights,
    read_checkpoint,
    write_checkpoint,
)

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
SERVER_STATE = "server_state"
POINTER_MAX_BYTES = 64
ROUND_NAME = re.compile(r"round_([0-9]{4,})")


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


class StoredServerState(StrictModel):
    """``ServerState`` as read back from a checkpoint: strict types (no "2" for 2, no 1.5,
    no null), so a hand-edited or corrupt state is refused naming the field. The dataclass
    stays the in-memory form: the recorder mutates its dicts in place every round."""

    model_config = ConfigDict(strict=True, protected_namespaces=())

    round: int = Field(ge=1, description="The last completed round; the folder's NNNN.")
    site_laziness: dict[str, str] = Field(default_factory=dict)
    global_laziness: str = ""
    history: dict[str, dict] = Field(default_factory=dict)
    audit_rows: list[dict] = Field(default_factory=list)
    run_config: dict = Field(default_factory=dict)
    model_settings: dict = Field(default_factory=dict, alias="model_config")
    sites: dict = Field(default_factory=dict)
    preprocessing: dict = Field(default_factory=dict)


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


def _round_number(name: str) -> int | None:
    """N of a plain ``round_NNNN`` folder name as ``save_round`` writes it, else None."""
    match = ROUND_NAME.fullmatch(name)
    if match is None or name != f"round_{int(match[1]):04d}":
        return None
    return int(match[1])


def _server_state(path: Path, meta: dict) -> ServerState:
    """The strictly validated server state of a checkpoint's config.json at ``path``."""
    extra = meta.get("extra")
    if not isinstance(extra, dict) or SERVER_STATE not in extra:
        raise ValueError(f"checkpoint {path}: no 'extra.{SERVER_STATE}' entry")
    try:
        stored = StoredServerState.model_validate(extra[SERVER_STATE])
    except ValidationError as error:
        raise ValueError(f"checkpoint {path}: 'extra.{SERVER_STATE}': {error}") from error
    return ServerState(**stored.model_dump(by_alias=True))


def _config_differences(stored: dict, expected: OmniFuseConfig) -> list[str]:
    """'field: stored != expected' for each top-level field of a model config that differs."""
    wanted = expected.model_dump(mode="json")
    if not isinstance(stored, dict):
        return [f"not an object: {type(stored).__name__}"]
    keys = sorted(set(stored) | set(wanted))
    return [
        f"{k}: {stored.get(k)!r} != {wanted.get(k)!r}"
        for k in keys
        if stored.get(k) != wanted.get(k)
    ]


def _read_round(
    folder: Path, model_config: OmniFuseConfig
) -> tuple[dict[str, np.ndarray], ServerState]:
    """A round folder's weights and state, checked against the run's model and the folder's
    own name; ``ValueError`` naming the file and field otherwise."""
    if folder.is_symlink():
        raise ValueError(f"checkpoint {folder}: a link, not a round folder")
    weights, meta = read_checkpoint(folder)
    path = folder / CONFIG_FILE
    state = _server_state(path, meta)
    if state.round != _round_number(folder.name):
        raise ValueError(
            f"checkpoint {path}: 'extra.{SERVER_STATE}.round' is {state.round}, "
            f"the folder is {folder.name}"
        )
    for entry, stored in (
        ("config", meta["config"]),
        (f"extra.{SERVER_STATE}.model_config", state.model_config),
    ):
        differences = _config_differences(stored, model_config)
        if differences:
            raise ValueError(
                f"checkpoint {path}: '{entry}' is not the run's model config "
                f"({'; '.join(differences)[:200]})"
            )
    check_weights(weights, model_config, f"checkpoint {folder / WEIGHTS_FILE}")
    return {k: v.numpy() for k, v in weights.items()}, state


def _pointed(root: Path) -> tuple[Path | None, str]:
    """(the round folder 'latest' names, or None; why 'latest' was unusable, or '')."""
    pointer = root / LATEST
    if not pointer.exists() and not pointer.is_symlink():
        return None, ""
    try:
        with pointer.open("rb") as handle:  # a round name is short: never read a huge file
            data = handle.read(POINTER_MAX_BYTES + 1)
        name = data.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        return None, f"{LATEST}: unreadable ({error})"
    if len(data) > POINTER_MAX_BYTES:
        return None, f"{LATEST}: longer than {POINTER_MAX_BYTES} bytes, expected round_NNNN"
    if _round_number(name) is None:
        return None, f"{LATEST}: names {name[:80]!r}, expected a folder name round_NNNN"
    return root / name, ""


def _candidates(root: Path) -> tuple[list[Path], list[str]]:
    """(round folders newest first, the one 'latest' names leading; why 'latest' was
    ignored, if it was)."""
    folders = sorted(
        (p for p in root.iterdir() if _round_number(p.name) is not None and p.is_dir()),
        key=lambda p: _round_number(p.name) or 0,
        reverse=True,
    )
    named, problem = _pointed(root)
    if named is not None and named in folders:
        folders.remove(named)
    return ([named] if named is not None else []) + folders, [problem] if problem else []


def load_latest(run_dir: Path, model_config: OmniFuseConfig) -> LoadedCheckpoint | None:
    """The newest checkpoint that reads and fits the run's ``model_config``, or None when
    there is none at all.

    A round that cannot be read, whose server state is invalid, or whose config or weights
    differ from ``model_config`` is skipped (the note says which and why), as is a 'latest'
    that does not name a plain ``round_NNNN`` folder. Raises ``ValueError`` naming every
    reason when checkpoints exist but none can be used.
    """
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    candidates, skipped = _candidates(root)
    if not candidates and not skipped:
        return None
    for folder in candidates:
        try:
            weights, state = _read_round(folder, model_config)
        except (OSError, ValueError) as error:
            skipped.append(f"{folder.name}: {error}"[:300])
            log.warning("checkpoint %s is unusable, trying an older one: %s", folder, error)
            continue
        note = (
            f"resumed from {folder.name}; skipped unreadable {'; '.join(skipped)}"
            if skipped
            else ""
        )
        return LoadedCheckpoint(weights, state, note)
    raise ValueError(f"{root}: no readable checkpoint ({'; '.join(skipped)})")

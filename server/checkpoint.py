"""Per-round server checkpoints: weights, config, strategy state, metrics history, audit rows.

Layout of ``run_dir``::

    checkpoints/round_0003/{model.safetensors, state.json}   written atomically per round
    checkpoints/latest                                        name of the newest round folder
    metrics.json, audit.csv, audit.json                       rewritten every round
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

CHECKPOINTS = "checkpoints"
LATEST = "latest"


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


def save_round(run_dir: Path, weights: dict[str, np.ndarray], state: ServerState) -> Path:
    """Write round ``state.round`` atomically (temp folder, then rename), update 'latest'."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round_{state.round:04d}"
    temp = root / f".tmp_round_{state.round:04d}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    save_file(
        {k: np.ascontiguousarray(v) for k, v in weights.items()}, str(temp / "model.safetensors")
    )
    (temp / "state.json").write_text(json.dumps(state.__dict__, indent=2, default=str))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temp, final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, root / LATEST)
    return final


def load_latest(run_dir: Path) -> tuple[dict[str, np.ndarray], ServerState] | None:
    """The newest complete checkpoint, or None when there is none."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text().strip()
    weights_path, state_path = folder / "model.safetensors", folder / "state.json"
    for path in (weights_path, state_path):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {folder}: missing {path.name}")
    state = ServerState(**json.loads(state_path.read_text()))
    return load_file(str(weights_path)), state

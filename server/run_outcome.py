"""How a run ended, written to ``run_dir/outcome.json`` for whoever started the run.

`flwr run --stream` exits 0 even when the ServerApp raised, so the ServerApp writes its
outcome here before it returns or raises, and the simulation harness reads it
(``simulation.federation``). ``status`` is 'running' while rounds go on, then 'completed' or
'failed' with the reason (e.g. the sites that failed or were rejected in every round).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

OUTCOME_FILE = "outcome.json"


def write_outcome(
    run_dir: Path, status: str, reason: str = "", failing: dict | None = None
) -> None:
    path = Path(run_dir) / OUTCOME_FILE
    temp = path.with_suffix(".tmp")
    temp.write_text(
        json.dumps({"status": status, "reason": reason, "failing": failing or {}}, indent=2)
    )
    os.replace(temp, path)


def read_outcome(run_dir: Path) -> dict | None:
    """The outcome the ServerApp wrote, or None when there is none (or it is unreadable)."""
    path = Path(run_dir) / OUTCOME_FILE
    try:
        outcome = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return outcome if isinstance(outcome, dict) else None


class SitesFailedError(RuntimeError):
    """Some sites failed or were rejected in every round of the run."""

    def __init__(self, failing: dict[str, str]) -> None:
        names = ", ".join(f"{name} ({reason[:400]})" for name, reason in sorted(failing.items()))
        super().__init__(f"sites failed or were rejected in every round: {names}")
        self.failing = failing

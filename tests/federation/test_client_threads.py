"""The run-config key client-torch-threads sets a ClientApp's torch threads."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict

from client.app import set_torch_threads
from client.error_replies import SiteStepFailed
from server.run_config import FederationRunConfig


def _context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config)


def test_client_torch_threads_is_applied_and_checked() -> None:
    before = torch.get_num_threads()
    try:
        set_torch_threads(_context({"client-torch-threads": 1}))
        assert torch.get_num_threads() == 1
        set_torch_threads(_context({}))  # absent: left as it is
        assert torch.get_num_threads() == 1
        with pytest.raises(SiteStepFailed, match="bad_instructions"):
            set_torch_threads(_context({"client-torch-threads": -2}))
    finally:
        torch.set_num_threads(before)
    values = {"scenario-dir": "s", "run-dir": "r", "client-torch-threads": 2}
    assert FederationRunConfig.from_flower(values).client_torch_threads == 2
    with pytest.raises(ValueError, match="client_torch_threads"):
        FederationRunConfig.from_flower({**values, "client-torch-threads": -1})

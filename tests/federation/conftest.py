"""Fixtures for federation tests.

Flower 1.42 refuses to build a ``Message`` outside a run unless the process's task identity
is set; this is the one place that works around it (STYLE.md rule 14).
"""

from __future__ import annotations

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def flower_task_identity():
    """Let tests build real Messages (replies included) outside a Flower run."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved

"""Fixtures for federation tests.

Flower 1.42 refuses to build a ``Message`` outside a run unless the process's task identity
is set; this is the one place that works around it (STYLE.md rule 14).
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.local_training import RoundInstructions, RoundResult, train_round
from client.registration import site_declaration
from omnifuse_model import federation_schema as wire
from omnifuse_model.config import OmniFuseConfig, TrainConfig
from omnifuse_model.model import OmniFuse
from omnifuse_model.site_config import SiteConfig
from omnifuse_model.site_data import load_site_datasets
from omnifuse_model.synthetic import SyntheticFeatureConfig, SyntheticModality
from server.site_registry import SiteRegistry


@pytest.fixture
def flower_task_identity():
    """Let tests build real Messages (replies included) outside a Flower run."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def make_site(name: str, modalities: list[str], seed: int) -> SiteConfig:
    """A site over feature-level synthetic data (ehr, cxr vectors of width 8)."""
    synthetic = SyntheticFeatureConfig(
        modalities=[
            SyntheticModality(name="ehr", dim=8, signal=1.5, noise=0.5, missing_rate=0.1),
            SyntheticModality(name="cxr", dim=8, signal=1.0, noise=1.0, missing_rate=0.3),
        ],
        seed=seed,
    )
    return SiteConfig(
        name=name,
        modalities=modalities,
        data={"source": "synthetic_features", "synthetic": synthetic, "synthetic_sizes": (120, 60)},
    )


@pytest.fixture
def model_config() -> OmniFuseConfig:
    return OmniFuseConfig(
        modalities=[
            {"name": "ehr", "kind": "vector", "input_dim": 8},
            {"name": "cxr", "kind": "vector", "input_dim": 8},
        ],
        task="binary",
        d=8,
        cra_hidden=(16, 8),
        num_blocks=2,
    )


def reply_content(result: RoundResult) -> RecordDict:
    """What the ClientApp returns for a round result."""
    return RecordDict(
        {
            wire.ARRAYS: ArrayRecord(result.state),
            wire.METRICS: MetricRecord(result.metrics),
            wire.AUDIT: ConfigRecord(wire.encode_audit(result.audit)),
            wire.TLA_SUMS: ConfigRecord(wire.encode_tla_sums(result.laziness, 5)),
        }
    )


def request_to(node: int, message_type: str = MessageType.TRAIN) -> Message:
    """A server message to ``node``; a reply to it comes from that node."""
    return Message(
        content=RecordDict({"config": ConfigRecord()}), message_type=message_type, dst_node_id=node
    )


# the two sites of ``site_round`` and the node ids their replies come from
ROUND_SITES = {"a_full": (["ehr", "cxr"], 1, 11), "b_no_cxr": (["ehr"], 2, 12)}


@pytest.fixture
def train_request(flower_task_identity) -> Message:
    return request_to(1)


@pytest.fixture
def reply_from(flower_task_identity):
    """reply_from(content, node): a reply (real Message) whose sender is ``node``."""

    def build(content: RecordDict, node: int, message_type: str = MessageType.TRAIN) -> Message:
        return Message(content=content, reply_to=request_to(node, message_type))

    return build


@pytest.fixture
def site_registry(model_config) -> SiteRegistry:
    """The server's binding of ``site_round``'s nodes to their sites, as registration makes it."""
    registry = SiteRegistry()
    for name, (modalities, seed, node) in ROUND_SITES.items():
        site = make_site(name, modalities, seed)
        datasets = load_site_datasets(site, model_config)
        declaration = site_declaration(name, datasets, model_config, threshold=5)
        assert registry.bind(node, declaration, connected=set()) is None
    return registry


@pytest.fixture
def site_round(model_config, train_request):
    """One real local round at two sites (one without cxr): (global state, results, replies),
    replies in reverse site order (arrival order must not matter); the site named n replies
    from node ``ROUND_SITES[n][2]``."""
    torch.manual_seed(0)
    global_state = OmniFuse(model_config).state_dict()
    instructions = RoundInstructions(
        model_config=model_config,
        train_config=TrainConfig(epochs=1, batch_size=32, progress=False, bootstrap_samples=0),
        global_round=1,
    )
    results, replies = [], []
    for name in reversed(ROUND_SITES):
        modalities, seed, node = ROUND_SITES[name]
        site = make_site(name, modalities, seed)
        result = train_round(
            site.name, load_site_datasets(site, model_config), instructions, global_state
        )
        results.append(result)
        replies.append(Message(content=reply_content(result), reply_to=request_to(node)))
    return global_state, results, replies

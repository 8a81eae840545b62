"""Flower ClientApp: a hospital site. Thin adapter around ``client.local_training``.

The site is named by ``node_config['site-config']`` (a deployed SuperNode) or, in simulation,
by ``node_config['partition-id']`` indexing the site list of the scenario named in the run
config. A site's mined lazy combination comes back from the server each round (the server
keeps every site's, so a resumed run continues exactly).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.local_training import RoundInstructions, evaluate_global, train_round
from client.registration import site_declaration
from omnifuse_model import federation_schema as wire
from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.federation_replies import REGISTRATION, encode_declaration
from omnifuse_model.round_plan import RoundPlan
from omnifuse_model.scenario import SCENARIO_FILE, Scenario
from omnifuse_model.site_config import SiteConfig, load_site_config
from omnifuse_model.site_data import load_site_datasets

app = ClientApp()


def site_config_path(context: Context) -> Path:
    """Which site this node is: explicit node config, else scenario + partition id."""
    if "site-config" in context.node_config:
        return Path(str(context.node_config["site-config"]))
    scenario_dir = Path(str(context.run_config["scenario-dir"]))
    sites = Scenario.load(scenario_dir).site_configs
    partition = int(context.node_config["partition-id"])
    if partition >= len(sites):
        raise ValueError(
            f"partition-id {partition} but scenario {scenario_dir / SCENARIO_FILE} lists "
            f"{len(sites)} sites"
        )
    return sites[partition]


def _instructions(config: ConfigRecord, site: SiteConfig) -> RoundInstructions:
    """The server's round plan, as this site carries it out."""
    if wire.ROUND_PLAN not in config:
        raise ValueError(f"config record: no '{wire.ROUND_PLAN}' key, got keys {sorted(config)}")
    plan = RoundPlan.model_validate_json(str(config[wire.ROUND_PLAN]))
    return RoundInstructions.for_site(plan, site)


def clip_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Flower's fixedclipping_mod, applied only when the server's central-DP wrapper sent a
    clipping norm (the mod errors on messages without one)."""
    if KEY_CLIPPING_NORM in msg.content[wire.CONFIG]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[clip_when_asked])
def train(msg: Message, context: Context) -> Message:
    site = load_site_config(site_config_path(context))
    config = msg.content[wire.CONFIG]
    instructions = _instructions(config, site)
    datasets = load_site_datasets(site, instructions.model_config)
    state = msg.content[wire.ARRAYS].to_torch_state_dict()
    result = train_round(site.name, datasets, instructions, state)
    content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord(result.state),
            wire.METRICS: MetricRecord(result.metrics),
            wire.AUDIT: ConfigRecord(wire.encode_audit(result.audit)),
        }
    )
    if result.laziness is not None:
        content[wire.TLA_SUMS] = ConfigRecord(
            wire.encode_tla_sums(result.laziness, instructions.audit_min_count)
        )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = load_site_config(site_config_path(context))
    instructions = _instructions(msg.content[wire.CONFIG], site)
    datasets = load_site_datasets(site, instructions.model_config)
    state = msg.content[wire.ARRAYS].to_torch_state_dict()
    metrics = evaluate_global(
        datasets,
        instructions.model_config,
        state,
        instructions.train_config,
        min_count=instructions.audit_min_count,
    )
    return Message(content=RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The server's registration before round 1: this site's name and declared data sizes.

    The server binds this node to the site named here, and the sizes bound every count the
    site reports later; they are rounded with the run's audit-min-count, which the query
    carries. An error names the site, so the server can say which one failed."""
    path = site_config_path(context)
    name = path.name
    try:
        site = load_site_config(path)
        name = site.name
        config = msg.content[wire.CONFIG]
        model_config = OmniFuseConfig.model_validate_json(str(config[wire.MODEL_CONFIG]))
        threshold = _registration_threshold(config)
        datasets = load_site_datasets(site, model_config)
        declaration = site_declaration(site.name, datasets, model_config, threshold)
    except Exception as error:
        raise RuntimeError(f"site '{name}': registration failed: {error}") from error
    record = ConfigRecord(encode_declaration(declaration))
    return Message(content=RecordDict({REGISTRATION: record}), reply_to=msg)


def _registration_threshold(config: ConfigRecord) -> int:
    """The registration query's audit-min-count: the threshold declared sizes are rounded to."""
    if wire.AUDIT_MIN_COUNT not in config:
        raise ValueError(
            f"registration query: no '{wire.AUDIT_MIN_COUNT}' key, got keys {sorted(config)}"
        )
    value = config[wire.AUDIT_MIN_COUNT]
    if type(value) is not int or value < 1:
        raise ValueError(
            f"registration query: '{wire.AUDIT_MIN_COUNT}' = {value!r}: expected int >= 1"
        )
    return value

"""Flower ClientApp: a hospital site. Thin adapter around ``client.local_training``.

The site is named by ``node_config['site-config']`` (a deployed SuperNode) or, in simulation,
by ``node_config['partition-id']`` indexing the site list of the scenario named in the run
config. A site's mined lazy combination comes back from the server each round (the server
keeps every site's, so a resumed run continues exactly).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from torch import Tensor

from client.error_replies import SiteStepFailed, error_reply, refuse, site_step
from client.local_training import RoundInstructions, evaluate_global, train_round
from client.registration import site_declaration
from client.statistics import site_statistics
from client.transport import decode_global, encode_update, sent_modalities
from omnifuse_model import federation_schema as wire
from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.federation_replies import (
    REGISTRATION,
    STATISTICS,
    encode_declaration,
    encode_statistics,
)
from omnifuse_model.round_plan import RoundPlan
from omnifuse_model.scenario import SCENARIO_FILE, Scenario
from omnifuse_model.site_config import SiteConfig, load_site_config
from omnifuse_model.site_data import SiteDatasets, load_site_datasets

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


def _plan(config: ConfigRecord) -> RoundPlan:
    """The server's round plan."""
    if wire.ROUND_PLAN not in config:
        raise ValueError(f"config record: no '{wire.ROUND_PLAN}' key, got keys {sorted(config)}")
    return RoundPlan.model_validate_json(str(config[wire.ROUND_PLAN]))


def _instructions(config: ConfigRecord, site: SiteConfig) -> RoundInstructions:
    """The server's round plan, as this site carries it out."""
    return RoundInstructions.for_site(_plan(config), site)


def is_deployed(context: Context) -> bool:
    """A deployed SuperNode names its site config; a simulated one a partition id."""
    return "site-config" in context.node_config


def check_shared_text_backbone(site: SiteConfig, context: Context) -> None:
    """A deployed site holding reports must embed them with the consortium's backbone: a
    local BERT (``backbones.bert_dir``) or the consortium's WordPiece vocabulary file
    (``backbones.wordpiece_vocab``), never a vocabulary learnt from its own reports (its
    token ids would mean something else than at the other sites). A simulation shares one
    fallback among its sites (``omnifuse prepare --scenario``)."""
    backbones = site.backbones
    if (
        is_deployed(context)
        and "rep" in site.modalities
        and backbones.bert_dir is None
        and backbones.wordpiece_vocab is None
    ):
        raise refuse(
            "text_backbone_not_shared",
            "the site holds reports but its config names neither backbones.bert_dir nor "
            "backbones.wordpiece_vocab; its report features would use a vocabulary learnt "
            "from its own reports. Set backbones.wordpiece_vocab to the consortium's "
            "vocabulary file (or bert_dir to the consortium's BERT) and run `omnifuse prepare`",
            site.name,
        )


def _site(context: Context) -> SiteConfig:
    return site_step("site_config_unreadable", lambda: load_site_config(site_config_path(context)))


def _datasets(site: SiteConfig, plan: RoundPlan) -> SiteDatasets:
    """The site's data, its EHR scaled with the federation's normaliser when sent."""
    state = plan.ehr_normalizer
    normalizer = site_step(
        "bad_instructions", lambda: state.normalizer() if state is not None else None, site.name
    )
    return site_step(
        "data_unreadable",
        lambda: load_site_datasets(site, plan.model, normalizer=normalizer),
        site.name,
    )


def clip_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Flower's fixedclipping_mod, applied only when the server's central-DP wrapper sent a
    clipping norm (the mod errors on messages without one)."""
    if KEY_CLIPPING_NORM in msg.content[wire.CONFIG]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[clip_when_asked])
def train(msg: Message, context: Context) -> Message:
    try:
        return Message(content=_train(msg, context), reply_to=msg)
    except SiteStepFailed as failure:
        return error_reply(failure, msg)


def _round_inputs(
    msg: Message, site: SiteConfig
) -> tuple[RoundInstructions, SiteDatasets, dict[str, Tensor], float]:
    """A train or evaluate message as this site carries it out: its instructions, its data
    (with the federation's normaliser), the global weights and the seconds loading the data
    took (reported as ``load-seconds``); failures are named codes."""
    plan = site_step("bad_instructions", lambda: _plan(msg.content[wire.CONFIG]), site.name)
    instructions = site_step(
        "bad_instructions", lambda: RoundInstructions.for_site(plan, site), site.name
    )
    started = time.perf_counter()
    datasets = _datasets(site, plan)
    load_seconds = time.perf_counter() - started
    state = site_step(
        "bad_instructions", lambda: decode_global(msg.content[wire.ARRAYS]), site.name
    )
    return instructions, datasets, state, load_seconds


def set_torch_threads(context: Context) -> None:
    """Apply the run config's ``client-torch-threads`` (0 or absent: leave torch's)."""
    threads = context.run_config.get("client-torch-threads", 0)
    if type(threads) is not int or threads < 0:
        raise refuse(
            "bad_instructions", f"run config client-torch-threads={threads!r}: expected int >= 0"
        )
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _train(msg: Message, context: Context) -> RecordDict:
    set_torch_threads(context)
    site = _site(context)
    check_shared_text_backbone(site, context)
    instructions, datasets, state, load_seconds = _round_inputs(msg, site)
    held = site_step(
        "bad_instructions",
        lambda: sent_modalities(msg.content[wire.CONFIG], instructions.wire),
        site.name,
    )
    result = site_step(
        "training_failed",
        lambda: train_round(site.name, datasets, instructions, state),
        site.name,
    )
    arrays = encode_update(
        result.state, state, instructions.wire, instructions.model_config.modality_names, held
    )
    content = RecordDict(
        {
            wire.ARRAYS: arrays,
            wire.METRICS: MetricRecord({**result.metrics, wire.LOAD_SECONDS: load_seconds}),
            wire.AUDIT: ConfigRecord(wire.encode_audit(result.audit)),
        }
    )
    if result.laziness is not None:
        content[wire.TLA_SUMS] = ConfigRecord(
            wire.encode_tla_sums(result.laziness, instructions.audit_min_count)
        )
    return content


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        return Message(content=_evaluate(msg, context), reply_to=msg)
    except SiteStepFailed as failure:
        return error_reply(failure, msg)


def _evaluate(msg: Message, context: Context) -> RecordDict:
    set_torch_threads(context)
    site = _site(context)
    instructions, datasets, state, _ = _round_inputs(msg, site)
    metrics = site_step(
        "evaluation_failed",
        lambda: evaluate_global(
            datasets,
            instructions.model_config,
            state,
            instructions.train_config,
            min_count=instructions.audit_min_count,
        ),
        site.name,
    )
    return RecordDict({wire.METRICS: MetricRecord(metrics)})


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The server's queries before round 1: the registration (this site's name and declared
    data sizes; the server binds this node to the site named here, and the sizes bound every
    count the site reports later), then the statistics phase (``client.statistics``).

    A failure is an error reply with a named code and the site's name once its config was
    read; the traceback stays in this site's log (``client.error_replies``)."""
    try:
        config = site_step("bad_instructions", lambda: msg.content[wire.CONFIG])
        if config.get(wire.QUERY_KIND) == wire.STATISTICS_QUERY:
            return Message(content=_statistics(config, context), reply_to=msg)
        return Message(content=_registration(config, context), reply_to=msg)
    except SiteStepFailed as failure:
        return error_reply(failure, msg)


def _model_config(config: ConfigRecord, site: SiteConfig) -> OmniFuseConfig:
    return site_step(
        "bad_instructions",
        lambda: OmniFuseConfig.model_validate_json(str(config[wire.MODEL_CONFIG])),
        site.name,
    )


def _registration(config: ConfigRecord, context: Context) -> RecordDict:
    site = _site(context)
    model_config = _model_config(config, site)
    datasets = site_step(
        "data_unreadable", lambda: load_site_datasets(site, model_config), site.name
    )
    threshold = site_step("bad_instructions", lambda: _registration_threshold(config), site.name)
    declaration = site_step(
        "registration_failed",
        lambda: site_declaration(site.name, datasets, model_config, threshold),
        site.name,
    )
    return RecordDict({REGISTRATION: ConfigRecord(encode_declaration(declaration))})


def _statistics(config: ConfigRecord, context: Context) -> RecordDict:
    site = _site(context)
    check_shared_text_backbone(site, context)
    model_config = _model_config(config, site)
    min_count = site_step(
        "bad_instructions", lambda: max(1, int(config.get(wire.AUDIT_MIN_COUNT, 5))), site.name
    )
    statistics = site_step(
        "statistics_failed",
        lambda: site_statistics(site, model_config.modality_names, min_count),
        site.name,
    )
    return RecordDict({STATISTICS: ConfigRecord(encode_statistics(statistics))})


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

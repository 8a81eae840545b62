"""The statistics phase before round 1 (issue #10, point 4): the federated EHR normaliser from
the sites' sums, the same as the pooled one the simulation used to build from every cache;
backbone fingerprints and the exclusion of a site whose backbone differs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import query
from client.statistics import fingerprint, site_statistics
from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.data.ehr.discretizer import CHANNEL_OFFSETS, NUM_FEATURES
from omnifuse_model.data.ehr.normalizer import EHRAggregates, EHRNormalizer, combine_aggregates
from omnifuse_model.data.features.cache import prepare_site
from omnifuse_model.data.features.manifest import AGGREGATES_FILE
from omnifuse_model.data.features.site_dataset import mimic_model_modalities
from omnifuse_model.data.ingest import ingest_site
from omnifuse_model.federation_replies import (
    MAX_BINS_PER_STAY,
    STATISTICS,
    ReplyError,
    SiteDeclaration,
    SiteStatistics,
    decode_statistics,
    encode_statistics,
)
from omnifuse_model.round_plan import RoundPlan
from omnifuse_model.site_config import SiteConfig
from omnifuse_model.site_data import load_site_datasets
from server.run_config import FederationRunConfig
from server.site_registry import SiteRegistry
from server.statistics_phase import (
    FingerprintConflict,
    Preprocessing,
    check_late_sites,
    decide,
    run_statistics_phase,
    statistics_messages,
    write_normalizer,
)
from server.strategy import OmniFuseStrategy
from simulation.synthetic_mimic.writer import SyntheticMimicConfig, write_synthetic_mimic
from tests.federation.conftest import request_to

IHM = "in-hospital-mortality"
A, B, C = "a" * 64, "b" * 64, "c" * 64


def _ehr_site(root, name: str, cache) -> SiteConfig:
    return SiteConfig(
        name=name, task=IHM, modalities=["ehr"], cache_dir=cache, device="cpu",
        data={"benchmark_dir": root / IHM},
    )  # fmt: skip


@pytest.fixture(scope="module")
def ehr_sites(tmp_path_factory) -> list[SiteConfig]:
    base = tmp_path_factory.mktemp("stats")
    sites = []
    for k, seed in enumerate((4, 9, 13)):
        write_synthetic_mimic(
            SyntheticMimicConfig(num_stays=24, seed=seed, image_size=32), base / f"d{k}"
        )
        site = _ehr_site(base / f"d{k}", f"site_{k}", base / f"cache{k}")
        prepare_site(site, progress=False)
        sites.append(site)
    return sites


def _model() -> OmniFuseConfig:
    return OmniFuseConfig(
        modalities=mimic_model_modalities(),
        task="binary",
        d=8,
        cra_hidden=(16, 8),
        num_blocks=1,
    )


class _Grid:
    """The server's view of the sites: each node answers with the real ClientApp."""

    def __init__(self, contexts: dict[int, Context]) -> None:
        self.contexts = contexts
        self.sent: list[Message] = []

    def send_and_receive(self, messages, timeout):
        self.sent += list(messages)
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            answer = query(message, self.contexts[node])
            replies.append(_from(node, answer))
        return replies


def _from(node: int, answer: Message) -> Message:
    """The answer as the server receives it: a reply from ``node``."""
    request = request_to(node, MessageType.QUERY)
    if answer.has_error():
        return Message(answer.error, reply_to=request)
    return Message(content=answer.content, reply_to=request)


def _registry(sites: list[SiteConfig], model: OmniFuseConfig) -> SiteRegistry:
    from client.registration import site_declaration

    registry = SiteRegistry()
    for node, site in enumerate(sites, start=1):
        declaration = site_declaration(
            site.name, load_site_datasets(site, model), model, threshold=5
        )
        assert registry.bind(node, declaration, connected=set()) is None
    return registry


def test_the_federated_normaliser_is_the_pooled_one(flower_task_identity, ehr_sites, tmp_path):
    model = _model()
    paths = {}
    for node, site in enumerate(ehr_sites, start=1):
        paths[node] = tmp_path / f"{site.name}.toml"
        paths[node].write_text(site.to_toml())
    contexts = {
        n: Context(
            run_id=1,
            node_id=n,
            node_config={"site-config": str(p)},
            state=RecordDict(),
            run_config={},
        )
        for n, p in paths.items()
    }
    grid = _Grid(contexts)
    decided = run_statistics_phase(
        grid, _registry(ehr_sites, model), model.model_dump_json(), model.modality_names,
        min_count=5, configured={}, timeout=5,
    )  # fmt: skip
    assert all(m.metadata.message_type == MessageType.QUERY for m in grid.sent)
    assert decided.contributors == ["site_0", "site_1", "site_2"] and not decided.excluded
    federated = decided.normalizer.normalizer()
    # what `omnifuse prepare --scenario` used to write: every cache's aggregates combined
    parts = [
        EHRAggregates.from_dict(json.loads((s.cache_dir / AGGREGATES_FILE).read_text()))
        for s in ehr_sites
    ]
    total = combine_aggregates(parts)
    old = EHRNormalizer.from_aggregates(total.count, total.sums, total.sumsq)
    np.testing.assert_array_equal(federated.means, old.means)
    np.testing.assert_array_equal(federated.stds, old.stds)
    # and a normaliser fitted on the pooled training EHR of every site
    pooled = EHRNormalizer.fit(
        [s.ehr for site in ehr_sites for s in ingest_site(site).split("train") if s.ehr is not None]
    )
    np.testing.assert_allclose(federated.means, pooled.means, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(federated.stds, pooled.stds, rtol=1e-10, atol=1e-12)
    # it travels in the round plan, exactly, and the site trains on data scaled with it
    plan = RoundPlan.model_validate_json(
        RoundPlan(
            model=model, train={}, global_round=1, ehr_normalizer=decided.normalizer
        ).model_dump_json()
    )
    sent = plan.ehr_normalizer.normalizer()
    np.testing.assert_array_equal(sent.stds, old.stds)
    with_federated = load_site_datasets(ehr_sites[0], model, normalizer=sent).train
    own = load_site_datasets(ehr_sites[0], model).train  # the cache's own (local) normaliser
    expected = old.transform(
        load_site_datasets(ehr_sites[0], model, normalizer=_identity()).train.inputs["ehr"].numpy()
    )
    np.testing.assert_allclose(with_federated.inputs["ehr"].numpy(), expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(with_federated.inputs["ehr"].numpy(), own.inputs["ehr"].numpy())


def _identity() -> EHRNormalizer:
    return EHRNormalizer(np.zeros(NUM_FEATURES), np.ones(NUM_FEATURES))


def test_a_site_below_the_audit_threshold_withholds_its_sums(ehr_sites):
    stays = json.loads((ehr_sites[0].cache_dir / AGGREGATES_FILE).read_text())["stays"]
    assert site_statistics(ehr_sites[0], ["ehr"], min_count=stays).has_ehr()
    withheld = site_statistics(ehr_sites[0], ["ehr"], min_count=stays + 1)
    assert not withheld.has_ehr() and withheld.ehr_sums == []
    assert set(withheld.fingerprints) == {"ehr"}


def _answer(fingerprints: dict[str, str], count: int = 0) -> SiteStatistics:
    sums = [1.0] * NUM_FEATURES if count else []
    return SiteStatistics(
        ehr_stays=count,
        ehr_count=count,
        ehr_sums=sums,
        ehr_sumsq=list(sums),
        fingerprints=fingerprints,
    )


def test_a_site_with_another_backbone_is_excluded_by_name():
    answers = {
        "s1": _answer({"cxr": A, "rep": B}),
        "s2": _answer({"cxr": A, "rep": B}),
        "s3": _answer({"cxr": C, "rep": B}),
        "s4": _answer({"rep": B}),  # holds no images: nothing to compare
    }
    decided = decide(answers, {})
    assert decided.excluded == {"s3": "fingerprint_mismatch:cxr"}
    assert decided.expected_fingerprints == {"cxr": A, "rep": B}
    # the run config's expected fingerprints win over the majority
    configured = decide(answers, {"cxr": C})
    assert configured.excluded == {
        "s1": "fingerprint_mismatch:cxr",
        "s2": "fingerprint_mismatch:cxr",
    }


def test_a_site_holding_a_modality_without_naming_its_backbone_is_excluded():
    """Leaving a fingerprint out would skip the check: a site that declared cxr training
    samples must name its cxr backbone; one holding no images need not."""
    answers = {
        "s1": _answer({"cxr": A, "rep": B}),
        "s2": _answer({"rep": B}),  # holds cxr, says nothing about its backbone
        "s3": _answer({"rep": B}),  # holds no images
    }
    held = {"s1": {"ehr", "cxr", "rep"}, "s2": {"ehr", "cxr", "rep"}, "s3": {"ehr", "rep"}}
    assert decide(answers, {}, held).excluded == {"s2": "fingerprint_missing:cxr"}
    assert decide(answers, {}).excluded == {}  # without declarations nothing is known


def test_no_majority_and_none_configured_stops_the_run_naming_the_sites():
    answers = {"s1": _answer({"cxr": A}), "s2": _answer({"cxr": C})}
    with pytest.raises(
        FingerprintConflict, match=r"cxr backbone \(s1: aaaaaaaaaaaa, s2: cccccccccccc\)"
    ):
        decide(answers, {})
    assert decide(answers, {"cxr": A}).excluded == {"s2": "fingerprint_mismatch:cxr"}


def test_implausible_statistics_are_excluded_and_left_out_of_the_normaliser(ehr_sites):
    good = site_statistics(ehr_sites[0], ["ehr"], min_count=1)
    bad = good.model_copy(
        update={"ehr_sums": [1e12] * NUM_FEATURES, "ehr_sumsq": [1e30] * NUM_FEATURES}
    )
    decided = decide({"good": good, "bad": bad}, {})
    assert decided.excluded == {"bad": "implausible_ehr_statistics"}
    assert decided.contributors == ["good"] and decided.normalizer.count == good.ehr_count


def _poisoned(good: SiteStatistics, how: str) -> SiteStatistics:
    """``good`` with one statistic a hostile site could send that passes the range checks
    of the 12 normalised channels."""
    sums, sumsq = list(good.ehr_sums), list(good.ehr_sumsq)
    heart = CHANNEL_OFFSETS["Heart Rate"]
    if how == "negative_variance":  # a plausible mean, S2 = 0: the pooled std would be 1e-7
        sumsq[heart] = 0.0
    elif how == "huge_one_hot":  # column 0 is a one-hot: never range-checked before
        sums[0] = sumsq[0] = 1e308
    else:  # a one-hot sum above its bin count
        sums[0] = sumsq[0] = good.ehr_count * 2.0
    return good.model_copy(update={"ehr_sums": sums, "ehr_sumsq": sumsq})


@pytest.mark.parametrize("how", ["negative_variance", "huge_one_hot", "one_hot_above_count"])
def test_statistics_that_no_real_values_give_are_excluded_and_the_normaliser_stays_finite(
    ehr_sites, tmp_path, how
):
    good = site_statistics(ehr_sites[0], ["ehr"], min_count=1)
    decided = decide({"good": good, "bad": _poisoned(good, how)}, {})
    assert decided.excluded == {"bad": "implausible_ehr_statistics"}
    assert decided.contributors == ["good"]
    write_normalizer(tmp_path, decided)  # JSON without NaN: raised for the huge one-hot sum
    pooled = EHRNormalizer.from_aggregates(good.ehr_count, good.ehr_sums, good.ehr_sumsq)
    np.testing.assert_array_equal(decided.normalizer.normalizer().stds, pooled.stds)


def test_every_real_sites_statistics_pass_the_checks(ehr_sites):
    """The checks hold for what prepared sites really send (one-hots and masks are 0/1)."""
    answers = {s.name: site_statistics(s, ["ehr"], min_count=1) for s in ehr_sites}
    assert decide(answers, {}).excluded == {}


def test_the_decision_survives_a_checkpoint():
    decided = decide({"s1": _answer({"cxr": A}, count=10), "s2": _answer({"cxr": C})}, {"cxr": A})
    again = Preprocessing.from_json(json.loads(json.dumps(decided.to_json())))
    assert again == decided


DECLARED = SiteDeclaration(site="s1", num_train=50, num_val=10, num_present={"ehr": 50})


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"ehr-sums": [1.0] * 3}, "ehr-sums:not_a_list_of_76_numbers"),
        ({"ehr-sumsq": [math.nan] * NUM_FEATURES}, "ehr-sumsq:not_finite_floats"),
        ({"ehr-sumsq": [-1.0] * NUM_FEATURES}, "ehr-sumsq:negative"),
        ({"ehr-stays": 51}, "ehr-stays:out_of_range"),
        ({"fingerprint.cxr": "A" * 64}, "fingerprint.cxr:not_a_sha256_hex_digest"),
        ({"fingerprint.other": A}, "statistics:unexpected_key:fingerprint.other"),
        ({"ehr-count": 0}, "statistics:ehr-sums_without_ehr-count"),
        ({"ehr-count": 1.5}, "ehr-count:not_an_int"),
        ({"ehr-count": 40 * MAX_BINS_PER_STAY + 1}, "ehr-count:above_35136_bins_per_stay"),
    ],
)
def test_a_malformed_statistics_answer_is_refused_with_a_reason(change, reason):
    record = encode_statistics(_answer({"cxr": A}, count=40))
    record.update(change)
    with pytest.raises(ReplyError) as error:
        decode_statistics(record, ["ehr", "cxr"], DECLARED, NUM_FEATURES)
    assert error.value.reason.startswith(reason)


def test_an_excluded_site_is_not_trained_and_the_round_says_why(
    flower_task_identity, model_config, site_registry, tmp_path
):
    run = FederationRunConfig(scenario_dir=tmp_path, run_dir=tmp_path, min_train_nodes=1)
    excluded = Preprocessing(excluded={"b_no_cxr": "fingerprint_mismatch:cxr"})
    strategy = OmniFuseStrategy(run, model_config, registry=site_registry, preprocessing=excluded)
    messages = [request_to(11), request_to(12)]  # a_full, b_no_cxr
    kept = strategy.without_excluded(1, messages)
    assert [m.metadata.dst_node_id for m in kept] == [11]
    record = strategy.records[1]
    assert record.history_entry()["excluded"] == {"b_no_cxr": "fingerprint_mismatch:cxr"}
    strategy.screen_train(1, [])
    [row] = record.audit
    assert (row.site, row.update_status) == ("b_no_cxr", "excluded:fingerprint_mismatch:cxr")


def test_the_fingerprint_is_the_sha256_of_the_cache_identity(ehr_sites):
    manifest = json.loads((ehr_sites[0].cache_dir / "manifest.json").read_text())
    answer = site_statistics(ehr_sites[0], ["ehr"], min_count=1)
    assert answer.fingerprints == {"ehr": fingerprint(manifest["identities"]["ehr"])}


def _rep_site_toml(tmp_path, vocab: bool) -> str:
    text = (
        'name = "site_r"\nmodalities = ["ehr", "rep"]\ncache_dir = "cache"\n'
        '[data]\nbenchmark_dir = "x"\n'
    )
    return text + ('[backbones]\nwordpiece_vocab = "vocab.txt"\n' if vocab else "")


def test_a_deployed_site_never_uses_a_vocabulary_learnt_from_its_own_reports(
    flower_task_identity, tmp_path, caplog
):
    path = tmp_path / "site.toml"
    path.write_text(_rep_site_toml(tmp_path, vocab=False))
    model = _model()
    [request] = statistics_messages([1], model.model_dump_json(), 5)
    deployed = Context(
        run_id=1,
        node_id=1,
        node_config={"site-config": str(path)},
        state=RecordDict(),
        run_config={},
    )
    reply = query(request, deployed)
    assert reply.has_error() and reply.error.reason == "text_backbone_not_shared:site=site_r"
    assert "backbones.wordpiece_vocab" in caplog.text  # the site's log says what to do
    path.write_text(_rep_site_toml(tmp_path, vocab=True))
    reply = query(request, deployed)  # past the check: now its cache is what is missing
    assert reply.has_error() and reply.error.reason.startswith("statistics_failed:")


def test_the_statistics_query_is_told_apart_from_the_registration(flower_task_identity):
    [message] = statistics_messages([3], "{}", 7)
    config = message.content["config"]
    assert isinstance(config, ConfigRecord)
    assert config["query-kind"] == "statistics" and config["audit-min-count"] == 7
    assert STATISTICS in ("statistics",)


def test_a_site_bound_after_the_phase_is_checked_before_its_first_round(
    flower_task_identity, model_config, site_registry, reply_from
):
    """a_full was checked before round 1; b_no_cxr's node registered late and reports
    another cxr backbone: it is excluded before it trains; nobody is asked twice."""
    preprocessing = Preprocessing(expected_fingerprints={"cxr": A}, checked=["a_full"])
    asked: list[list[int]] = []

    class Grid:
        def send_and_receive(self, messages, timeout):
            asked.append([m.metadata.dst_node_id for m in messages])
            answer = encode_statistics(_answer({"cxr": C}))
            return [
                reply_from(RecordDict({STATISTICS: ConfigRecord(answer)}), 12, MessageType.QUERY)
            ]

    for _ in range(2):
        check_late_sites(
            Grid(), site_registry, preprocessing, model_config.model_dump_json(),
            model_config.modality_names, 5, 5,
        )  # fmt: skip
    assert asked == [[12]]
    assert preprocessing.excluded == {"b_no_cxr": "fingerprint_mismatch:cxr"}


def test_a_late_site_without_an_answer_is_asked_again_with_back_off(
    flower_task_identity, model_config, site_registry
):
    preprocessing = Preprocessing(expected_fingerprints={"cxr": A}, checked=["a_full"])
    queries: list[list[int]] = []

    class SilentGrid:
        def send_and_receive(self, messages, timeout):
            queries.append([m.metadata.dst_node_id for m in messages])
            return []

    asked_in = []
    for round_ in range(1, 9):
        before = len(queries)
        check_late_sites(
            SilentGrid(), site_registry, preprocessing, model_config.model_dump_json(),
            model_config.modality_names, 5, 5,
        )  # fmt: skip
        if len(queries) > before:
            asked_in.append(round_)
    assert asked_in == [1, 3, 7] and queries == [[12]] * 3
    assert "b_no_cxr" not in preprocessing.checked


def _answering_grid(reply_from, answers: dict[int, SiteStatistics]):
    class Grid:
        def send_and_receive(self, messages, timeout):
            return [
                reply_from(
                    RecordDict({STATISTICS: ConfigRecord(encode_statistics(answers[n]))}),
                    n,
                    MessageType.QUERY,
                )
                for n in (m.metadata.dst_node_id for m in messages)
            ]

    return Grid()


def test_the_server_records_the_normaliser_and_a_resume_keeps_it(
    flower_task_identity, model_config, site_registry, reply_from, ehr_sites, tmp_path
):
    from server.app import statistics_phase
    from server.checkpoint import ServerState

    run = FederationRunConfig(scenario_dir=tmp_path, run_dir=tmp_path)
    real = site_statistics(ehr_sites[0], ["ehr"], min_count=1)
    answers = {11: real, 12: real.model_copy(update={"fingerprints": {}})}
    state = ServerState(round=0)
    first = statistics_phase(
        _answering_grid(reply_from, answers), run, model_config, site_registry, state
    )
    saved = EHRNormalizer.load(tmp_path / "ehr_normalizer.json")
    np.testing.assert_array_equal(saved.stds, first.normalizer.normalizer().stds)
    assert state.preprocessing["normalizer"] == first.normalizer.model_dump()
    # a resumed run keeps the normaliser it started with, even if a site's sums changed
    answers[12] = site_statistics(ehr_sites[1], ["ehr"], min_count=1)
    again = statistics_phase(
        _answering_grid(reply_from, answers), run, model_config, site_registry, state
    )
    assert again.normalizer == first.normalizer


def test_a_fingerprint_conflict_fails_the_run_with_its_reason(
    flower_task_identity, model_config, site_registry, reply_from, tmp_path
):
    from server.app import statistics_phase
    from server.checkpoint import ServerState
    from server.run_outcome import read_outcome

    run = FederationRunConfig(scenario_dir=tmp_path, run_dir=tmp_path)
    grid = _answering_grid(reply_from, {11: _answer({"cxr": A}), 12: _answer({"cxr": C})})
    with pytest.raises(FingerprintConflict):
        statistics_phase(grid, run, model_config, site_registry, ServerState(round=0))
    outcome = read_outcome(tmp_path)
    assert outcome["status"] == "failed" and "a_full: aaaaaaaaaaaa" in outcome["reason"]

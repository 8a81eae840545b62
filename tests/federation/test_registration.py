"""Registration before round 1: node ids bound to sites, claims refused by name, never a crash."""

from __future__ import annotations

import copy

from flwr.app import (
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.app import query
from omnifuse_model import federation_schema as wire
from omnifuse_model.federation_replies import (
    REGISTRATION,
    SITE,
    SITE_NAME,
    SiteDeclaration,
    encode_declaration,
)
from server.site_registry import (
    REASON_CHARS,
    SiteRegistry,
    register_newcomers,
    registration_messages,
)

NAMES = ["ehr", "cxr"]
SITE_TOML = """name = "hospital_x"
modalities = ["ehr"]
cache_dir = "cache"
[data]
source = "synthetic_features"
synthetic_sizes = [120, 60]
[data.synthetic]
seed = 3
[[data.synthetic.modalities]]
name = "ehr"
dim = 8
[[data.synthetic.modalities]]
name = "cxr"
dim = 8
"""
DECLARED = SiteDeclaration(site="s1", num_train=100, num_val=20, num_present={"ehr": 90, "cxr": 40})


def _answer(reply_from, node: int, record: dict | None = None, content=None) -> Message:
    if content is None:
        content = RecordDict({REGISTRATION: ConfigRecord(record)})
    return reply_from(content, node, MessageType.QUERY)


def test_each_node_is_bound_to_the_site_it_declares(reply_from):
    registry = SiteRegistry()
    other = DECLARED.model_copy(update={"site": "s2"})
    registry.register(
        [
            _answer(reply_from, 7, encode_declaration(other)),
            _answer(reply_from, 5, encode_declaration(DECLARED)),
        ],
        NAMES,
        connected={5, 7},
    )
    assert registry.nodes == {5: "s1", 7: "s2"}
    assert registry.declarations["s1"] == DECLARED


def test_a_second_node_claiming_a_bound_site_is_refused(reply_from):
    registry = SiteRegistry()
    record = encode_declaration(DECLARED)
    registry.register(
        [_answer(reply_from, 9, record), _answer(reply_from, 4, record)], NAMES, connected={4, 9}
    )
    assert registry.nodes == {4: "s1"}  # node-id order: the first claim wins
    assert registry.refused[9] == "site_already_bound:s1:node 4"


def test_a_nodes_second_answer_cannot_undo_its_first(reply_from):
    registry = SiteRegistry()
    other = DECLARED.model_copy(update={"num_train": 200})
    registry.register(
        [
            _answer(reply_from, 5, encode_declaration(DECLARED)),
            _answer(reply_from, 5, encode_declaration(other)),
        ],
        NAMES,
        connected={5},
    )
    assert registry.nodes == {5: "s1"} and registry.refused == {}
    assert registry.declarations["s1"] == DECLARED


def test_a_refusal_names_a_giant_record_in_a_short_reason(reply_from):
    registry = SiteRegistry()
    content = RecordDict({"k" * 200_000: ConfigRecord({"x": 1})})
    registry.register([_answer(reply_from, 5, content=content)], NAMES, {5})
    assert registry.refused[5].startswith("registration:bad_records:")
    assert len(registry.refused[5]) <= REASON_CHARS


def test_resume_keeps_the_binding_and_a_new_node_takes_over_a_gone_one(reply_from):
    registry = SiteRegistry()
    registry.register([_answer(reply_from, 4, encode_declaration(DECLARED))], NAMES, {4})
    registry.last_counts["s1"] = {wire.NUM_EXAMPLES: 100}
    restored = SiteRegistry.from_json(registry.to_json())
    assert restored.to_json() == registry.to_json()
    # a new simulation: node 4 is gone, node 8 declares the same site and sizes
    restored.register([_answer(reply_from, 8, encode_declaration(DECLARED))], NAMES, {8})
    assert restored.nodes == {8: "s1"} and restored.last_counts["s1"] == {wire.NUM_EXAMPLES: 100}
    # ... but not with other sizes
    again = SiteRegistry.from_json(registry.to_json())
    bigger = DECLARED.model_copy(update={"num_train": 1_000_000})
    again.register([_answer(reply_from, 8, encode_declaration(bigger))], NAMES, {8})
    assert again.nodes == {4: "s1"} and again.refused[8] == "declaration_changed:s1"
    # while the bound node is still connected, nobody else may take its site
    live = SiteRegistry.from_json(registry.to_json())
    live.register([_answer(reply_from, 8, encode_declaration(DECLARED))], NAMES, {4, 8})
    assert live.nodes == {4: "s1"} and live.refused[8] == "site_already_bound:s1:node 4"


def _bad_registration(data) -> tuple[str, dict | RecordDict]:
    record: dict = encode_declaration(DECLARED)
    keys = sorted(record)
    how = data.draw(st.sampled_from(["value", "delete", "extra", "records"]))
    if how == "value":
        key = data.draw(st.sampled_from(keys))
        if key == "site":
            bad = st.one_of(st.integers(), st.text().filter(lambda s: not SITE_NAME.match(s)))
        else:
            above = 101 if key.startswith("num-present") else 100_000_001  # num-train, MAX_COUNT
            bad = st.one_of(
                st.integers(min_value=above),
                st.integers(max_value=-1),
                st.floats(),
                st.text(max_size=5),
                st.booleans(),
            )
        record[key] = data.draw(bad)
    elif how == "delete":
        del record[data.draw(st.sampled_from(keys))]
    elif how == "extra":
        record[data.draw(st.text(min_size=1).filter(lambda k: k not in keys))] = 1
    else:
        content = data.draw(
            st.sampled_from(
                [
                    RecordDict(),
                    RecordDict({REGISTRATION: MetricRecord({"num-train": 1})}),
                    RecordDict({REGISTRATION: ConfigRecord(record), "x": ConfigRecord()}),
                ]
            )
        )
        return how, content
    return how, record


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    database=None,
)
@given(data=st.data())
def test_a_malformed_registration_is_refused_with_a_reason(data, reply_from):
    how, bad = _bad_registration(data)
    content = bad if isinstance(bad, RecordDict) else None
    record = None if content is not None else bad
    good = SiteDeclaration(site="s2", num_train=10, num_val=5, num_present={"ehr": 10, "cxr": 0})
    registry = SiteRegistry()
    registry.register(
        [
            _answer(reply_from, 3, record, content),
            _answer(reply_from, 6, encode_declaration(good)),
        ],
        NAMES,
        connected={3, 6},
    )
    assert registry.nodes == {6: "s2"}, how
    assert 0 < len(registry.refused[3]) <= 300


def test_the_client_app_answers_the_registration(
    flower_task_identity, model_config, tmp_path, reply_from
):
    path = tmp_path / "site.toml"
    path.write_text(SITE_TOML)
    [request] = registration_messages([5], model_config.model_dump_json(), 7)
    assert request.content["config"]["audit-min-count"] == 7
    reply = query(request, _context(path))
    registry = SiteRegistry()
    registry.register([_answer(reply_from, 5, content=reply.content)], NAMES, {5})
    declaration = registry.declarations["hospital_x"]
    assert registry.nodes == {5: "hospital_x"}
    assert declaration.num_present["cxr"] == 0  # the site does not hold cxr
    assert 0 < declaration.num_present["ehr"] <= declaration.num_train
    assert declaration.num_val > 0
    # every declared size is published as a round publishes it: rounded up to a multiple of 7
    sizes = [declaration.num_train, declaration.num_val, *declaration.num_present.values()]
    assert all(size % 7 == 0 for size in sizes), sizes


def test_a_registration_query_without_the_threshold_is_refused_by_name(
    flower_task_identity, model_config, tmp_path, caplog
):
    """The server gets a named code only; the missing key is named in the site's own log."""
    path = tmp_path / "site.toml"
    path.write_text(SITE_TOML)
    [request] = registration_messages([5], model_config.model_dump_json(), 5)
    del request.content["config"]["audit-min-count"]
    reply = query(request, _context(path))
    assert reply.has_error()
    assert reply.error.reason.startswith("bad_instructions:ValueError")
    assert "no 'audit-min-count' key" in caplog.text


def test_a_site_whose_data_does_not_load_names_itself_in_the_error(
    flower_task_identity, model_config, tmp_path
):
    path = tmp_path / "broken.toml"
    path.write_text('name = "site_9"\nmodalities = ["ehr"]\n[data]\nbenchmark_dir = "missing"\n')
    [request] = registration_messages([5], model_config.model_dump_json(), 5)
    reply = query(request, _context(path))
    assert reply.has_error()
    assert reply.error.reason == "data_unreadable:FileNotFoundError:site=site_9"


def _context(path) -> Context:
    return Context(
        run_id=1,
        node_id=5,
        node_config={"site-config": str(path)},
        state=RecordDict(),
        run_config={},
    )


def test_registration_state_is_plain_json():
    registry = SiteRegistry(nodes={1: "s1"}, declarations={"s1": DECLARED})
    assert copy.deepcopy(registry.to_json())["nodes"] == {"1": "s1"}


def test_a_node_connecting_after_the_registration_is_asked_before_the_next_round(reply_from):
    registry = SiteRegistry()
    registry.register([_answer(reply_from, 4, encode_declaration(DECLARED))], NAMES, {4})
    late = DECLARED.model_copy(update={"site": "s2"})
    asked: list[list[int]] = []

    class Grid:
        def get_node_ids(self):
            return [4, 8]

        def send_and_receive(self, messages, timeout):
            asked.append([m.metadata.dst_node_id for m in messages])
            assert all(m.metadata.message_type == MessageType.QUERY for m in messages)
            return [_answer(reply_from, 8, encode_declaration(late))]

    register_newcomers(Grid(), registry, "{}", NAMES, timeout=5, audit_min_count=5)
    register_newcomers(
        Grid(), registry, "{}", NAMES, timeout=5, audit_min_count=5
    )  # nobody new: no query
    assert asked == [[8]] and registry.nodes == {4: "s1", 8: "s2"}


class _ScriptedGrid:
    """Connected node ids and, per asked node, an answer builder (None: silent)."""

    def __init__(self, nodes: list[int], answers: dict) -> None:
        self.nodes, self.answers, self.asked = nodes, answers, []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout):
        asked = [m.metadata.dst_node_id for m in messages]
        self.asked.append(asked)
        return [self.answers[n]() for n in asked if self.answers.get(n) is not None]


def test_a_silent_node_is_asked_again_with_back_off_not_every_round(reply_from):
    grid, registry = _ScriptedGrid([5], {5: None}), SiteRegistry()
    asked_in = []
    for round_ in range(1, 17):  # configure_train of rounds 1..16
        before = len(grid.asked)
        register_newcomers(grid, registry, "{}", NAMES, timeout=120, audit_min_count=5)
        if len(grid.asked) > before:
            asked_in.append(round_)
    assert asked_in == [1, 3, 7, 15]  # 1, 2, 4, 8 rounds apart
    grid.answers[5] = lambda: _answer(reply_from, 5, encode_declaration(DECLARED))
    for _ in range(16):  # it answers when next asked, and is then bound
        register_newcomers(grid, registry, "{}", NAMES, timeout=120, audit_min_count=5)
    assert registry.nodes == {5: "s1"} and len(grid.asked) == 5


def test_a_restarted_sites_new_node_is_bound_once_its_old_node_is_gone(reply_from):
    """A restarted SuperNode gets a new node id while the old one is still listed: refused
    as site_already_bound, then bound once the old node's heartbeat has expired."""
    registry = SiteRegistry()
    registry.bind(4, DECLARED, set())
    declared = lambda: _answer(reply_from, 8, encode_declaration(DECLARED))  # noqa: E731
    grid = _ScriptedGrid([4, 8], {8: declared})
    register_newcomers(grid, registry, "{}", NAMES, timeout=120, audit_min_count=5)
    assert registry.refused[8] == "site_already_bound:s1:node 4"
    register_newcomers(grid, registry, "{}", NAMES, timeout=120, audit_min_count=5)
    assert grid.asked == [[8]]  # node 4 still connected: 8 is not asked again
    grid.nodes = [8]
    register_newcomers(grid, registry, "{}", NAMES, timeout=120, audit_min_count=5)
    assert registry.nodes == {8: "s1"} and 8 not in registry.refused


def test_a_malformed_declaration_stays_refused_and_an_error_reply_is_retried(reply_from):
    registry = SiteRegistry()
    bad = dict(encode_declaration(DECLARED))
    bad[SITE] = "bad name!"
    failing = lambda: Message(  # noqa: E731
        Error(code=0, reason="data not ready"), reply_to=_query_to(6)
    )
    grid = _ScriptedGrid([5, 6], {5: lambda: _answer(reply_from, 5, bad), 6: failing})
    for _ in range(4):
        register_newcomers(grid, registry, "{}", NAMES, timeout=120, audit_min_count=5)
    assert grid.asked == [[5, 6], [6]]  # rounds 1 and 3: node 6 backs off, 5 never again
    assert registry.refused[5] == "registration:site:bad_name"
    assert registry.refused[6].startswith("error_reply:")


def _query_to(node: int) -> Message:
    return Message(
        content=RecordDict({"config": ConfigRecord()}),
        message_type=MessageType.QUERY,
        dst_node_id=node,
    )

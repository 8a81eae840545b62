"""Fixed-cost breakdown: what a client message and a server round cost besides local training.

    python -m simulation.benchmarks.client_overhead [--sites 10 100] [--repeats 5] [--quick]
        [--out benchmark_results/client_overhead.json]

In-process, without Flower's engine: the real ``OmniFuseStrategy.configure_train`` /
``configure_evaluate`` build the round's Flower ``Message``s (a stub grid lists the nodes;
every node is registered and checked, so ``register_newcomers`` / ``check_late_sites`` send
nothing), and ``client.app``'s own ``train`` / ``evaluate`` functions answer them for the
sites of ``simulation.benchmarks.scale.site_scenario`` (40 train / 20 val samples, the
paper-size model d 128 K 5; ``--quick``: a tiny model, 1 repeat). Sites alternate between
two sites, as a ClientApp process serves several.

Client rows (ms per message, median over ``repeats`` after one warm-up): the whole
``train`` / ``evaluate`` functions, their pieces (site config, round plan, site data, weight
decoding, model construction, ``load_state_dict``, ``train_round`` with its reported
``train-seconds``, the update's encoding, ``evaluate_global``) and the pickled size and time
of each message (what Flower's simulation engine ships to a ClientApp). The scale
benchmark's fixed cost counts everything outside ``train-seconds``: a train message's
``train() - train-seconds`` plus the whole evaluate message.

Server rows (ms per round, for each ``--sites`` N, in round 3 so the files hold 3 rounds of
audit rows): ``configure_train`` (its arrays are the record it saw before, as in every round
after the first, where the aggregation's downlink is reused; the first round's downlink
encoding is timed alone),
``configure_evaluate``, ``aggregate_evaluate`` of N replies, the server-side test evaluation,
the checkpoint, the audit and metrics files; and per client (the round's total / N).
``aggregate_train`` is the strategy-cost benchmark's (``simulation.benchmarks.strategy_cost``).
The JSON records the load average before and after; times on a loaded machine are inflated.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from client import app as client_app
from client.local_training import evaluate_global, train_round
from client.model_cache import loaded_model
from client.transport import decode_global, encode_update, sent_modalities
from omnifuse_model import federation_schema as wire
from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.federation_replies import SiteDeclaration
from omnifuse_model.model import OmniFuse
from omnifuse_model.scenario import Scenario
from omnifuse_model.site_config import load_site_config
from server.app import _server_evaluator
from server.audit_log import write_audit
from server.checkpoint import ServerState, save_round
from server.round_record import RoundRecorder
from server.run_config import FederationRunConfig
from server.site_registry import SiteRegistry
from server.statistics_phase import Preprocessing
from server.strategy import OmniFuseStrategy
from simulation.benchmarks.scale import site_scenario

TINY_MODEL = {"d": 8, "num_blocks": 1, "cra_hidden": [8]}
TRAIN, VAL = 40, 20
ROUND = 3  # the timed round: the files hold this many rounds of rows
NODE0 = 100


class StubGrid:
    """The grid ``configure_train`` asks for node ids; it never has to send anything."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):  # pragma: no cover - a failure
        raise RuntimeError("client_overhead: every node is registered; nothing may be sent")


def _timed(function: Callable[[], object]) -> tuple[float, float, object]:
    """(wall ms, CPU ms, result) of one call."""
    started, cpu = time.perf_counter(), time.process_time()
    result = function()
    return 1000 * (time.perf_counter() - started), 1000 * (time.process_time() - cpu), result


class Timings:
    """Per-row wall/CPU samples; ``measure`` drops the first (warm-up) call of each row."""

    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[float, float | None]]] = {}
        self.seen: set[str] = set()

    def measure(self, name: str, function: Callable[[], object]) -> object:
        wall, cpu, result = _timed(function)
        self.add(name, wall, cpu)
        return result

    def add(self, name: str, wall: float, cpu: float | None) -> None:
        """One sample; ``cpu`` None for a row derived from a reported wall time."""
        if name not in self.seen:
            self.seen.add(name)  # the warm-up sample
            return
        self.samples.setdefault(name, []).append((wall, cpu))

    def rows(self) -> list[dict]:
        return [
            {
                "name": name,
                "ms": statistics.median(w for w, _ in samples),
                "cpu_ms": None
                if any(c is None for _, c in samples)
                else statistics.median(c for _, c in samples),
                "n": len(samples),
            }
            for name, samples in self.samples.items()
        ]


def _with_metadata(message: Message, node: int, kind: str) -> Message:
    """The message as the engine delivers it: a message id, addressed to ``node``."""
    metadata = Metadata(
        run_id=1,
        message_id=f"{kind}-{node}-{time.perf_counter_ns()}",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id=str(ROUND),
        created_at=time.time(),
        ttl=3600.0,
        message_type=message.metadata.message_type,
    )
    return Message(metadata=metadata, content=message.content)


def _reply_as_received(reply: Message, node: int) -> Message:
    """A ClientApp's reply as the server receives it (from ``node``)."""
    meta = reply.metadata
    metadata = Metadata(
        run_id=1,
        message_id=f"reply-{node}-{time.perf_counter_ns()}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id=meta.reply_to_message_id,
        group_id=meta.group_id,
        created_at=time.time(),
        ttl=3600.0,
        message_type=meta.message_type,
    )
    return Message(metadata=metadata, content=reply.content)


class Federation:
    """A scenario, a strategy with every site registered, and the ClientApp's contexts."""

    def __init__(self, root: Path, sites: int, model: dict) -> None:
        self.scenario_dir = site_scenario(root / "scenario", sites, TRAIN, VAL, model)
        self.scenario = Scenario.load(self.scenario_dir)
        self.config: OmniFuseConfig = self.scenario.model
        self.run = FederationRunConfig(
            scenario_dir=self.scenario_dir,
            run_dir=root / "run",
            min_train_nodes=sites,
            min_evaluate_nodes=sites,
            min_available_nodes=sites,
            local_epochs=1,
            server_eval=True,
        )
        self.registry = SiteRegistry()
        names = self.config.modality_names
        for index, path in enumerate(self.scenario.site_configs):
            site = load_site_config(path)
            declaration = SiteDeclaration(
                site=site.name,
                num_train=TRAIN,
                num_val=VAL,
                num_present={m: TRAIN for m in names},
            )
            self.registry.bind(NODE0 + index, declaration, connected=set())
        self.preprocessing = Preprocessing(checked=sorted(self.registry.declarations))
        self.strategy = OmniFuseStrategy(
            self.run,
            self.config,
            round_offset=ROUND - 1,
            registry=self.registry,
            preprocessing=self.preprocessing,
        )
        self.grid = StubGrid(sorted(self.registry.nodes))
        torch.manual_seed(0)
        self.arrays = ArrayRecord(OmniFuse(self.config).state_dict())

    def context(self, index: int) -> Context:
        return Context(
            run_id=1,
            node_id=NODE0 + index,
            node_config={"partition-id": index, "num-partitions": len(self.registry.nodes)},
            state=RecordDict(),
            run_config={"scenario-dir": str(self.scenario_dir), "client-torch-threads": 1},
        )

    def train_messages(self) -> list[Message]:
        messages = self.strategy.configure_train(1, self.arrays, ConfigRecord(), self.grid)
        return [_with_metadata(m, m.metadata.dst_node_id, "train") for m in messages]

    def evaluate_messages(self) -> list[Message]:
        messages = self.strategy.configure_evaluate(1, self.arrays, ConfigRecord(), self.grid)
        return [_with_metadata(m, m.metadata.dst_node_id, "evaluate") for m in messages]


def _answer(handler, message: Message, context: Context) -> Message:
    reply = handler(message, context)
    if reply.has_error():
        raise RuntimeError(f"client_overhead: {handler.__name__} failed: {reply.error.reason}")
    return reply


def client_rows(fed: Federation, repeats: int, progress: Progress) -> tuple[list[dict], dict]:
    """Per-message client costs, alternating between sites 0 and 1 (see the module doc)."""
    timings = Timings()
    train_messages, evaluate_messages = fed.train_messages(), fed.evaluate_messages()
    sizes: dict[str, int] = {}
    task = progress.add_task("client messages", total=repeats + 1)
    for repeat in range(repeats + 1):
        index = repeat % 2
        messages = (train_messages[index], evaluate_messages[index])
        sizes = _client_messages(timings, fed, fed.context(index), *messages)
        progress.advance(task)
    return timings.rows(), sizes


def _client_messages(
    timings: Timings, fed: Federation, context: Context, train: Message, evaluate: Message
) -> dict[str, int]:
    """One train and one evaluate message, whole and piece by piece; the pickled sizes."""
    wall, cpu, reply = _timed(lambda: _answer(client_app.train, train, context))
    seconds = float(reply.content[wire.METRICS][wire.TRAIN_SECONDS]) * 1000
    timings.add("train(): whole message", wall, cpu)
    timings.add("train(): outside train-seconds", wall - seconds, None)
    timings.measure(
        "evaluate(): whole message", lambda: _answer(client_app.evaluate, evaluate, context)
    )
    _client_pieces(timings, fed, context, train)
    sizes = {}
    named = {"train message": train, "train reply": reply, "evaluate message": evaluate}
    for name, message in named.items():
        sizes[name] = len(timings.measure(f"pickle {name}", lambda m=message: pickle.dumps(m)))
    return sizes


def _client_pieces(timings: Timings, fed: Federation, context: Context, message: Message) -> None:
    """The train message's steps one by one, as ``client.app._train`` runs them."""
    config = message.content[wire.CONFIG]
    site = timings.measure("  site config (scenario + TOML)", lambda: client_app._site(context))
    instructions = timings.measure(
        "  round plan + instructions", lambda: client_app._instructions(config, site)
    )
    plan = client_app._plan(config)
    datasets = timings.measure("  site data", lambda: client_app._datasets(site, plan))
    state = timings.measure(
        "  decode global weights", lambda: decode_global(message.content[wire.ARRAYS])
    )
    model_config = instructions.model_config
    model = timings.measure("  model construction", lambda: OmniFuse(model_config))
    timings.measure("  load_state_dict", lambda: model.load_state_dict(state))
    timings.measure("  model as used (client.model_cache)", lambda: _load(model_config, state))
    wall, cpu, result = _timed(lambda: train_round(site.name, datasets, instructions, state))
    timings.add("  train_round wall", wall, cpu)
    seconds = float(result.metrics[wire.TRAIN_SECONDS]) * 1000
    timings.add("  train_round train-seconds (reported)", seconds, None)
    timings.add("  train_round after train-seconds (audit, copy)", wall - seconds, None)
    held = sent_modalities(config, instructions.wire)
    names = model_config.modality_names
    timings.measure(
        "  encode update",
        lambda: encode_update(result.state, state, instructions.wire, names, held),
    )
    timings.measure(
        "  evaluate_global",
        lambda: evaluate_global(
            datasets, model_config, state, instructions.train_config, instructions.audit_min_count
        ),
    )


def _load(config: OmniFuseConfig, state: dict) -> bool:
    with loaded_model(config, state) as loaded:
        return loaded.reused


def _audit_rows(fed: Federation, sites: int) -> list[wire.AuditRow]:
    """ROUND rounds of one audit row per site, from a real train reply's row."""
    message = fed.train_messages()[0]
    reply = _answer(client_app.train, message, fed.context(0))
    row = wire.decode_audit(reply.content[wire.AUDIT])
    return [
        row.model_copy(update={"site": f"site_{i}", "round": r})
        for r in range(1, ROUND + 1)
        for i in range(sites)
    ]


def server_rows(fed: Federation, sites: int, repeats: int, progress: Progress) -> list[dict]:
    """Per-round server costs for ``sites`` sites (see the module doc)."""
    timings = Timings()
    rows = _audit_rows(fed, sites)
    evaluation = _answer(client_app.evaluate, fed.evaluate_messages()[0], fed.context(0))
    replies = [
        _reply_as_received(evaluation, NODE0 + i)
        for i in range(sites)  # the same metrics from every node: the screening is per reply
    ]
    evaluator = _server_evaluator(fed.run, fed.scenario, fed.preprocessing)
    task = progress.add_task(f"server rounds, {sites} sites", total=repeats + 1)
    for _ in range(repeats + 1):
        _server_round(timings, fed, rows, replies, evaluator)
        progress.advance(task)
    return timings.rows()


def _server_round(
    timings: Timings,
    fed: Federation,
    rows: list[wire.AuditRow],
    replies: list[Message],
    evaluator: Callable[[dict], dict] | None,
) -> None:
    """One round's server steps, whole and piece by piece."""
    strategy, grid, arrays = fed.strategy, fed.grid, fed.arrays
    master = {k: v.numpy() for k, v in arrays.items()}
    timings.measure(
        "configure_train", lambda: strategy.configure_train(1, arrays, ConfigRecord(), grid)
    )
    timings.measure(
        "  downlink encoding (round 1 only; later rounds reuse the aggregation's)",
        lambda: _downlink(strategy, master, arrays),
    )
    timings.measure(
        "configure_evaluate", lambda: strategy.configure_evaluate(1, arrays, ConfigRecord(), grid)
    )
    timings.measure("aggregate_evaluate", lambda: strategy.aggregate_evaluate(1, replies))
    recorder = _recorder(fed, rows, len(replies), evaluator)
    timings.measure("evaluate_fn (server-eval + checkpoint + files)", lambda: recorder(1, arrays))
    if evaluator is not None:
        weights = {k: torch.from_numpy(np.array(v)) for k, v in master.items()}
        timings.measure("  server-eval", lambda: evaluator(weights))
    state, run_dir = recorder.state, fed.run.run_dir
    timings.measure("  checkpoint", lambda: save_round(run_dir, master, state))
    dumped = state.audit_rows
    timings.measure("  audit.csv + audit.json", lambda: write_audit(run_dir, rows, dumped))
    history = state.history
    timings.measure(
        "  metrics.json",
        lambda: (run_dir / "metrics.json").write_text(json.dumps(history, indent=2)),
    )


def _downlink(strategy: OmniFuseStrategy, master: dict, arrays: ArrayRecord) -> ArrayRecord:
    from server.master_weights import downlink_arrays

    return downlink_arrays(master, strategy.wire, arrays)


def _recorder(fed: Federation, rows: list[wire.AuditRow], sites: int, evaluator) -> RoundRecorder:
    """The ServerApp's evaluate_fn in round ROUND, ROUND - 1 rounds already on file."""
    fed.run.run_dir.mkdir(parents=True, exist_ok=True)
    record = fed.strategy.record(ROUND)
    record.audit = [r for r in rows if r.round == ROUND]
    record.accepted_sites = [r.site for r in record.audit]
    record.train = {wire.NUM_EXAMPLES: float(TRAIN * sites), wire.TRAIN_SECONDS + "-sum": 1.0}
    state = ServerState(
        round=ROUND - 1,
        history={str(r): record.history_entry() for r in range(1, ROUND)},
        audit_rows=[r.model_dump(mode="json") for r in rows if r.round < ROUND],
        run_config=json.loads(fed.run.model_dump_json()),
        model_config=fed.config.model_dump(mode="json"),
    )
    return RoundRecorder(
        run_dir=fed.run.run_dir,
        state=state,
        records=lambda _: record,
        current=lambda: ({}, "", fed.registry.to_json()),
        global_round=lambda _: ROUND,
        server_evaluate=evaluator,
    )


@contextmanager
def task_identity() -> Iterator[None]:
    """Flower's process identity, which building a server-side ``Message`` reads (set by the
    engine in a real run); restored afterwards."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def run_benchmark(sites: list[int], repeats: int, quick: bool) -> dict:
    load_before = os.getloadavg()
    model = TINY_MODEL if quick else {}
    torch.set_num_threads(1)  # as the scale benchmark's ClientApps (one thread per client)
    with (
        tempfile.TemporaryDirectory(prefix="omnifuse-overhead-") as tmp,
        Progress(transient=True) as progress,
        task_identity(),
    ):
        root = Path(tmp)
        client, sizes = client_rows(Federation(root / "client", 2, model), repeats, progress)
        server = {
            str(n): server_rows(Federation(root / f"s{n}", n, model), n, repeats, progress)
            for n in sites
        }
    return {
        "benchmark": "client_overhead",
        "model": "tiny" if quick else "paper (d 128, K 5)",
        "repeats": repeats,
        "client": client,
        "pickled_bytes": sizes,
        "server": server,
        "summary": summarise(client, server),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def _ms(rows: list[dict], name: str) -> float:
    return next(r["ms"] for r in rows if r["name"] == name)


def summarise(client: list[dict], server: dict[str, list[dict]]) -> dict:
    """The client's fixed ms per site and round (train outside train-seconds + evaluate) and,
    per site count, the server's ms per round and per client."""
    fixed = _ms(client, "train(): outside train-seconds") + _ms(client, "evaluate(): whole message")
    per_round = {
        n: sum(r["ms"] for r in rows if not r["name"].startswith(" ")) for n, rows in server.items()
    }
    return {
        "client_fixed_ms_per_site_round": fixed,
        "server_ms_per_round": per_round,
        "server_ms_per_client": {n: ms / int(n) for n, ms in per_round.items()},
    }


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_report(result: dict, console: Console) -> None:
    table = Table(title=f"Client, ms per message ({result['model']}, 1 torch thread)")
    table.add_column("step")
    table.add_column("wall ms", justify="right")
    table.add_column("CPU ms", justify="right")
    for row in result["client"]:
        table.add_row(row["name"], f"{row['ms']:.1f}", _cell(row["cpu_ms"]))
    console.print(table)
    sizes = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in result["pickled_bytes"].items())
    console.print(f"pickled: {sizes}")
    server = Table(title="Server, ms per round")
    server.add_column("step")
    counts = list(result["server"])
    for n in counts:
        server.add_column(f"{n} sites wall", justify="right")
        server.add_column(f"{n} sites CPU", justify="right")
    for index, row in enumerate(result["server"][counts[0]]):
        cells = []
        for n in counts:
            other = result["server"][n][index]
            cells += [f"{other['ms']:.1f}", _cell(other["cpu_ms"])]
        server.add_row(row["name"], *cells)
    console.print(server)
    summary = result["summary"]
    console.print(
        f"client fixed cost per site and round: "
        f"{summary['client_fixed_ms_per_site_round']:.1f} ms (train outside train-seconds "
        "+ evaluate)"
    )
    for n, ms in summary["server_ms_per_round"].items():
        console.print(
            f"server, {n} sites: {ms:.1f} ms per round, "
            f"{summary['server_ms_per_client'][n]:.2f} ms per client"
        )
    load = ", ".join(f"{v:.2f}" for v in result["loadavg_before"])
    console.print(f"load average before: {load}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 sites, 1 repeat")
    parser.add_argument("--out", type=Path, default=Path("benchmark_results/client_overhead.json"))
    args = parser.parse_args(argv)
    sites, repeats = ([2], 1) if args.quick else (args.sites, args.repeats)
    if min(sites) < 2 or repeats < 1:
        parser.error(f"--sites {sites} (>= 2 each) and --repeats {repeats} (>= 1)")
    result = run_benchmark(sites, repeats, args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_report(result, Console(width=120))
    return result


if __name__ == "__main__":
    main()

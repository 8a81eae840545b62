"""Round bookkeeping: one record per round, the recorder, checkpoints and resume, the outcome."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from safetensors.torch import save_file

from omnifuse_model.model import OmniFuse
from server.app import finish, initial_state
from server.checkpoint import CHECKPOINTS, LATEST, ServerState, load_latest, save_round
from server.round_record import RoundRecord, RoundRecorder
from server.run_config import FederationRunConfig
from server.run_outcome import SitesFailedError, read_outcome
from server.site_registry import SiteRegistry, error_reason
from simulation.federation import FederationError, _check_completed


def _weights(model_config, seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return {k: v.numpy() for k, v in OmniFuse(model_config).state_dict().items()}


def _state(model_config, round_: int) -> ServerState:
    return ServerState(
        round=round_,
        site_laziness={"a": "ehr"},
        history={str(r): {"train": {}} for r in range(1, round_ + 1)},
        model_config=model_config.model_dump(mode="json"),
        sites={"nodes": {"4": "a"}, "declarations": {}, "last_counts": {}},
    )


def test_a_round_checkpoint_is_a_model_checkpoint_and_resumes_exactly(model_config, tmp_path):
    weights = _weights(model_config, 1)
    folder = save_round(tmp_path, weights, _state(model_config, 1))
    model = OmniFuse.from_checkpoint(folder)  # the model's own loader reads it
    assert all(torch.equal(model.state_dict()[k], torch.from_numpy(v)) for k, v in weights.items())
    loaded = load_latest(tmp_path, model_config)
    assert loaded.note == "" and loaded.state == _state(model_config, 1)
    assert all(np.array_equal(loaded.weights[k], v) for k, v in weights.items())


@pytest.mark.parametrize("damage", ["truncate_weights", "corrupt_config", "remove_folder"])
def test_resume_falls_back_to_the_newest_readable_checkpoint(model_config, tmp_path, damage):
    save_round(tmp_path, _weights(model_config, 1), _state(model_config, 1))
    save_round(tmp_path, _weights(model_config, 2), _state(model_config, 2))
    newest = tmp_path / CHECKPOINTS / "round_0002"
    if damage == "truncate_weights":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "corrupt_config":
        (newest / "config.json").write_text('{"config": ')
    else:
        for path in newest.iterdir():
            path.unlink()
        newest.rmdir()
    loaded = load_latest(tmp_path, model_config)
    assert loaded.state.round == 1
    assert loaded.note.startswith("resumed from round_0001; skipped unreadable round_0002")
    expected = _weights(model_config, 1)
    assert all(np.array_equal(loaded.weights[k], v) for k, v in expected.items())


def test_no_readable_checkpoint_is_an_error_and_none_at_all_is_a_fresh_start(
    model_config, tmp_path
):
    assert load_latest(tmp_path, model_config) is None
    save_round(tmp_path, _weights(model_config, 1), _state(model_config, 1))
    (tmp_path / CHECKPOINTS / "round_0001" / "config.json").write_text("not json")
    with pytest.raises(ValueError, match="no readable checkpoint"):
        load_latest(tmp_path, model_config)
    assert (tmp_path / CHECKPOINTS / LATEST).read_text() == "round_0001"


def _recorder(model_config, tmp_path, records: dict[int, RoundRecord], note: str = ""):
    state = ServerState(round=0, model_config=model_config.model_dump(mode="json"))
    return RoundRecorder(
        run_dir=tmp_path,
        state=state,
        records=lambda r: records.setdefault(r, RoundRecord(round=r)),
        current=lambda: ({"a": "ehr"}, "", {"nodes": {"4": "a"}}),
        global_round=lambda r: r + 2,  # resumed after round 2
        note=note,
    )


def test_the_recorder_writes_one_record_per_round_and_names_sites_never_accepted(
    model_config, tmp_path
):
    records = {
        3: RoundRecord(
            round=3,
            accepted_sites=["a"],
            problems=[
                {"node": 4, "status": "failed", "site": "b", "reason": "boom"},
                {"node": 9, "status": "rejected", "site": None, "reason": "unregistered_node"},
            ],
        ),
        4: RoundRecord(
            round=4,
            accepted_sites=["a", "c"],
            problems=[{"node": 4, "status": "rejected", "site": "b", "reason": "dtype"}],
        ),
    }
    recorder = _recorder(model_config, tmp_path, records, note="resumed from round_0002")
    weights = ArrayRecord({k: Array(v) for k, v in _weights(model_config, 0).items()})
    assert recorder(0, weights) is None  # Flower's call before round 1
    recorder(1, weights)
    recorder(2, weights)
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert set(history) == {"3", "4"}
    assert history["3"]["note"] == "resumed from round_0002" and "note" not in history["4"]
    assert history["4"]["failed_or_rejected"][0]["reason"] == "dtype"
    loaded = load_latest(tmp_path, model_config)
    assert loaded.state.round == 4 and loaded.state.sites == {"nodes": {"4": "a"}}
    assert recorder.never_accepted() == {
        "b": "rejected: dtype",
        "node 9": "rejected: unregistered_node",
    }


def _skipped(round_: int, reason: str) -> RoundRecord:
    record = RoundRecord(round=round_, accepted_sites=["a", "c"])
    record.not_aggregated("skipped", reason)
    return record


@pytest.mark.parametrize("rounds_aggregated", [0, 1])
def test_a_kept_model_is_the_aggregates_failure_and_fails_the_run_only_if_never_aggregated(
    model_config, tmp_path, rounds_aggregated
):
    records = {3: _skipped(3, "too_few_accepted:2<3")}
    records[4] = (
        RoundRecord(round=4, accepted_sites=["a", "c"])
        if rounds_aggregated
        else _skipped(4, "too_few_accepted:1<3")
    )
    assert records[3].accepted_sites == [] and not records[3].aggregated()
    recorder = _recorder(model_config, tmp_path, records)
    weights = ArrayRecord({k: Array(v) for k, v in _weights(model_config, 0).items()})
    recorder(1, weights)
    recorder(2, weights)
    expected = {} if rounds_aggregated else {"(aggregate)": "skipped: too_few_accepted:1<3"}
    assert recorder.never_accepted() == expected


def test_finish_raises_naming_the_failing_site_and_writes_the_outcome(model_config, tmp_path):
    records = {3: RoundRecord(round=3, problems=[{"node": 4, "status": "failed", "reason": "x"}])}
    recorder = _recorder(model_config, tmp_path, records)
    recorder(1, ArrayRecord({k: Array(v) for k, v in _weights(model_config, 0).items()}))
    run = FederationRunConfig(scenario_dir=tmp_path, run_dir=tmp_path)
    registry = SiteRegistry(refused={4: "error_reply: site 'site_1': registration failed"})
    with pytest.raises(SitesFailedError, match="node 4 \\(registration error_reply: site 'site_1'"):
        finish(run, recorder, registry)
    outcome = read_outcome(tmp_path)
    assert outcome["status"] == "failed" and "site_1" in outcome["reason"]
    # the simulation harness turns the outcome into a failure, even with all rounds done
    config = {"run-dir": str(tmp_path), "num-server-rounds": 3}
    with pytest.raises(FederationError, match="site_1"):
        _check_completed(config, tmp_path, returncode=0)


def test_finish_with_every_site_accepted_completes(model_config, tmp_path):
    records = {3: RoundRecord(round=3, accepted_sites=["a"])}
    recorder = _recorder(model_config, tmp_path, records)
    recorder(1, ArrayRecord({k: Array(v) for k, v in _weights(model_config, 0).items()}))
    finish(FederationRunConfig(scenario_dir=tmp_path, run_dir=tmp_path), recorder, SiteRegistry())
    assert read_outcome(tmp_path)["status"] == "completed"
    _check_completed({"run-dir": str(tmp_path), "num-server-rounds": 3}, tmp_path, returncode=0)


def test_an_error_replys_reason_is_the_sites_own_message_shortened():
    ray = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor"
        ".run()\x1b[39m (pid=1)\n"
        + '  File "ray_actor.py", line 65, in run\n    raise ClientAppException(str(ex))\n'
        * 20
        + "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException "
        "occurred. Message: site 'site_1': registration failed: missing_folder not found'>"
    )
    assert error_reason(ray) == "site 'site_1': registration failed: missing_folder not found"
    assert error_reason("Traceback\nValueError: x\n  more\nKeyError: 'k'") == "KeyError: 'k'"
    assert len(error_reason("x" * 10_000)) == 300
    assert error_reason("") == "no reason given"
    assert error_reason("line\nbreak\x00\u2603") == "line break \\u2603"


@pytest.mark.parametrize("wrong", ["config", "weights"])
def test_a_checkpoint_of_another_model_is_never_resumed(model_config, tmp_path, wrong):
    """A d=16 checkpoint loaded against a d=8 run with no error (the probe: 55 of 154
    tensors with the wrong shape). Now the round is skipped, naming why; none fits: error."""
    other = model_config.model_copy(update={"d": 16})
    save_round(tmp_path, _weights(model_config, 1), _state(model_config, 1))
    if wrong == "config":  # the whole round written by another model
        save_round(tmp_path, _weights(other, 2), _state(other, 2))
        why = "'config' is not the run's model config \\(d: 16 != 8\\)"
    else:  # the run's config.json, another model's weights
        save_round(tmp_path, _weights(model_config, 2), _state(model_config, 2))
        newest = tmp_path / CHECKPOINTS / "round_0002" / "model.safetensors"
        save_file({k: torch.from_numpy(v) for k, v in _weights(other, 2).items()}, str(newest))
        why = "model.safetensors: weights do not match the model config"
    loaded = load_latest(tmp_path, model_config)
    assert loaded.state.round == 1
    assert re.search(f"skipped unreadable round_0002: .*{why}", loaded.note)
    shutil.rmtree(tmp_path / CHECKPOINTS / "round_0001")
    with pytest.raises(ValueError, match=f"no readable checkpoint \\(round_0002: .*{why}"):
        load_latest(tmp_path, model_config)


@pytest.mark.parametrize(
    "pointer",
    [b"../../other/checkpoints/round_0001", b"/abs/round_0001", b"round_1", b"\xff\xfe\x00"],
)
def test_latest_must_name_a_plain_round_folder_else_it_is_ignored_with_a_note(
    model_config, tmp_path, pointer
):
    """'latest' was followed out of the run folder, and a non-UTF-8 one raised a bare
    UnicodeDecodeError with no fallback."""
    save_round(tmp_path / "other", _weights(model_config, 7), _state(model_config, 1))
    run_dir = tmp_path / "run"
    save_round(run_dir, _weights(model_config, 1), _state(model_config, 1))
    (run_dir / CHECKPOINTS / LATEST).write_bytes(pointer)
    loaded = load_latest(run_dir, model_config)
    assert loaded.note.startswith("resumed from round_0001; skipped unreadable latest: ")
    expected = _weights(model_config, 1)
    assert all(np.array_equal(loaded.weights[k], v) for k, v in expected.items())


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("2", "valid integer"),
        (None, "valid integer"),
        (1.5, "valid integer"),
        (-5, "greater than or equal to 1"),
        (99999, "round' is 99999, the folder is round_0002"),
    ],
)
def test_the_server_state_is_validated_strictly_and_agrees_with_its_folder(
    model_config, tmp_path, value, why
):
    """'round': "2" or null was a TypeError in main, -5 and 1.5 were accepted and 99999
    ended the run 'completed: nothing to do'."""
    save_round(tmp_path, _weights(model_config, 1), _state(model_config, 1))
    save_round(tmp_path, _weights(model_config, 2), _state(model_config, 2))
    config = tmp_path / CHECKPOINTS / "round_0002" / "config.json"
    meta = json.loads(config.read_text())
    meta["extra"]["server_state"]["round"] = value
    config.write_text(json.dumps(meta))
    loaded = load_latest(tmp_path, model_config)
    assert loaded.state.round == 1
    assert "round_0002: checkpoint" in loaded.note and why in loaded.note
    assert "server_state" in loaded.note


def test_a_resume_with_no_fitting_checkpoint_fails_and_says_why_in_the_outcome(
    model_config, tmp_path
):
    other = model_config.model_copy(update={"d": 16})
    save_round(tmp_path, _weights(other, 1), _state(other, 1))
    run = FederationRunConfig(scenario_dir=tmp_path, run_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="not the run's model config"):
        initial_state(run, model_config)
    outcome = read_outcome(tmp_path)
    assert outcome["status"] == "failed" and "resume: " in outcome["reason"]
    assert "d: 16 != 8" in outcome["reason"]

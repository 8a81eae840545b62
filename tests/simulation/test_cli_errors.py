"""Every bad invocation of the `omnifuse` commands the issue lists: one line naming what is
wrong and where, exit code 1, no traceback. And `federate`'s behaviour around `flwr run`
(which is replaced here by a fake that writes what the ServerApp writes): the run config it
is given, progress lines, the summary table at 80 columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.synthetic import SyntheticFeatureConfig, SyntheticModality
from simulation import federation
from simulation.cli import main
from simulation.federation import FederationError
from simulation.scenarios import write_feature_scenario


def _scenario(directory: Path, names: list[str] | None = None) -> Path:
    data = SyntheticFeatureConfig(
        modalities=[
            SyntheticModality(name="ehr", dim=4, signal=1.5, noise=0.5, missing_rate=0.1),
            SyntheticModality(name="cxr", dim=4, signal=1.0, noise=1.0, missing_rate=0.4),
        ]
    )
    model = OmniFuseConfig(
        modalities=data.modality_specs(), task="binary", d=8, cra_hidden=(16, 8), num_blocks=1
    )
    count = len(names) if names else 3
    write_feature_scenario(
        directory, data, model, [["ehr", "cxr"]] * count, [(20, 10)] * count, test_size=20
    )
    for index, name in enumerate(names or []):
        path = directory / f"site_{index}.toml"
        path.write_text(path.read_text().replace(f'"site_{index}"', f'"{name}"'))
    return directory


def _one_line_error(capsys, code: int, *needles: str) -> str:
    captured = capsys.readouterr()
    assert code == 1, captured
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in captured.err + captured.out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_partition_without_data(tmp_path, capsys):
    code = main(["partition", "--out", str(tmp_path / "p")])
    _one_line_error(capsys, code, "--data", "--config")


def test_partition_with_a_missing_config(tmp_path, capsys):
    code = main(["partition", "--config", str(tmp_path / "none.toml"), "--out", str(tmp_path)])
    _one_line_error(capsys, code, "none.toml", "no such file")


def test_partition_with_a_bad_config_names_the_file(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("data_dir = 3\n")
    code = main(["partition", "--config", str(config), "--out", str(tmp_path / "p")])
    captured = capsys.readouterr()
    assert code == 1 and "bad.toml" in captured.err.splitlines()[0]
    assert "Traceback" not in captured.err


def test_synth_into_an_existing_folder(tmp_path, capsys):
    (tmp_path / "old.txt").write_text("keep me")
    code = main(["synth", "--out", str(tmp_path), "--stays", "10"])
    _one_line_error(capsys, code, str(tmp_path), "new or empty folder")
    assert (tmp_path / "old.txt").read_text() == "keep me"


def test_synth_with_bad_config_json(tmp_path, capsys):
    code = main(["synth", "--out", str(tmp_path / "s"), "--config-json", "{bad"])
    _one_line_error(capsys, code, "--config-json", "not JSON")


def test_schema_into_a_missing_folder(tmp_path, capsys):
    code = main(["site-config-schema", "--out", str(tmp_path / "no" / "schema.json")])
    _one_line_error(capsys, code, "--out", "not found")


def test_audit_of_a_folder_without_a_run(tmp_path, capsys):
    _one_line_error(capsys, main(["audit", str(tmp_path)]), "audit.json")


def test_federate_without_a_scenario(tmp_path, capsys):
    code = main(["federate", "--scenario", str(tmp_path), "--run-dir", str(tmp_path / "r")])
    _one_line_error(capsys, code, "scenario.json not found", "omnifuse partition")


@pytest.fixture
def never_run(monkeypatch):
    """Fail the test if anything would start Flower."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("run_federation called")

    monkeypatch.setattr(federation, "run_federation", refuse)


@pytest.mark.parametrize(
    ("run_config", "extra", "needles"),
    [
        ("num-rounds=2", [], ("unknown key(s) num-rounds", "num-server-rounds")),
        ("num-server-rounds=7", ["--rounds", "3"], ("--rounds 3", "num-server-rounds=7")),
        ("lr=1.2.3", [], ("'lr=1.2.3'", "quote")),
        ("min-train-nodes=5", [], ("min-train-nodes=5", "3 site(s)")),
    ],
)
def test_federate_bad_run_config_is_refused_before_flower_starts(
    tmp_path, capsys, never_run, run_config, extra, needles
):
    scenario = _scenario(tmp_path / "scenario")
    code = main(
        [
            *("federate", "--scenario", str(scenario), "--run-dir", str(tmp_path / "run")),
            *("--run-config", run_config, *extra),
        ]
    )
    _one_line_error(capsys, code, *needles)


def _fake_federation(calls: list, sites: list[str], fail_after: int | None = None):
    """What `run_federation` does, seen from the run directory: metrics.json and audit.json
    grow by one round per poll."""

    def fake(values, num_supernodes, work_dir, http_port=None, on_poll=None, **options):
        calls.append({"values": values, "nodes": num_supernodes, "work_dir": work_dir, **options})
        run_dir = Path(values["run-dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        history, rows = {}, []
        for number in range(1, int(values["num-server-rounds"]) + 1):
            if fail_after is not None and number > fail_after:
                raise FederationError(
                    f"federation stopped after round {fail_after} of "
                    f"{values['num-server-rounds']} (flwr run exit code 1): ValueError: boom"
                )
            problems = [{"site": sites[-1], "status": "rejected", "reason": "norm"}]
            history[str(number)] = {
                "server": {"test-auroc": 0.5 + number / 10},
                "failed_or_rejected": problems,
                "wall_seconds": 1.0,
            }
            rows += [{"site": s, "round": number, "update_status": "accepted"} for s in sites[:-1]]
            (run_dir / "metrics.json").write_text(json.dumps(history))
            (run_dir / "audit.json").write_text(json.dumps(rows))
            on_poll()
        return 0

    return fake


def test_federate_passes_one_node_per_site_and_the_merged_run_config(tmp_path, capsys, monkeypatch):
    scenario = _scenario(tmp_path / "scenario")
    calls: list = []
    fake = _fake_federation(calls, ["site_0", "site_1", "site_2"])
    monkeypatch.setattr(federation, "run_federation", fake)
    run_dir = tmp_path / "run"
    code = main(
        [
            *("federate", "--scenario", str(scenario), "--run-dir", str(run_dir)),
            *("--run-config", "num-server-rounds=2 strategy=fedprox"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    (call,) = calls
    assert call["nodes"] == 3 and call["work_dir"] == run_dir.resolve() / "flwr"
    assert call["client_cpus"] == federation.DEFAULT_CLIENT_CPUS == 1  # the measured default
    values = call["values"]
    assert values["strategy"] == "fedprox" and values["num-server-rounds"] == 2
    assert values["min-available-nodes"] == 3 and values["run-dir"] == str(run_dir.resolve())
    assert "round 1 of 2  AUROC 0.600  replied: site_0, site_1  rejected: site_2" in out
    assert "round 2 of 2  AUROC 0.700" in out
    assert "Federation summary" in out


def test_federate_passes_client_cpus_and_refuses_zero(tmp_path, capsys, monkeypatch):
    scenario = _scenario(tmp_path / "scenario")
    calls: list = []
    monkeypatch.setattr(federation, "run_federation", _fake_federation(calls, ["a", "b", "c"]))
    base = ["federate", "--scenario", str(scenario), "--run-dir", str(tmp_path / "run")]
    assert main([*base, "--client-cpus", "2"]) == 0
    assert calls[0]["client_cpus"] == 2
    with pytest.raises(SystemExit):
        main([*base, "--client-cpus", "0"])
    assert "--client-cpus: 0: expected a whole number >= 1" in capsys.readouterr().err


def test_federate_summary_fits_80_columns_with_a_legend_for_long_names(
    tmp_path, capsys, monkeypatch
):
    names = ["hospital_north_general", "hospital_south_university", "hospital_east_county"]
    scenario = _scenario(tmp_path / "scenario", names)
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(federation, "run_federation", _fake_federation([], names))
    code = main(["federate", "--scenario", str(scenario), "--run-dir", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert "…" not in out and "..." not in out
    assert "S1 = hospital_north_general" in " ".join(out.split())
    assert "replied: S1, S2  rejected: S3" in out


def test_a_failed_federation_is_one_line_after_the_rounds_that_finished(
    tmp_path, capsys, monkeypatch
):
    scenario = _scenario(tmp_path / "scenario")
    fake = _fake_federation([], ["site_0", "site_1", "site_2"], fail_after=1)
    monkeypatch.setattr(federation, "run_federation", fake)
    code = main(
        [
            *("federate", "--scenario", str(scenario), "--run-dir", str(tmp_path / "run")),
            *("--rounds", "3"),
        ]
    )
    captured = capsys.readouterr()
    assert "round 1 of 3" in captured.out and "Federation summary" in captured.out
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 1 and len(err) == 1 and "stopped after round 1 of 3" in err[0]
    assert "ValueError: boom" in err[0] and "Traceback" not in captured.err


def test_an_incomplete_run_names_the_last_exception_of_the_flwr_log(tmp_path):
    """As flwr 1.42 logs a ServerApp that raised (measured: `flwr run` then exits 0)."""
    (tmp_path / "flwr_run.log").write_text(
        'INFO : Starting\nTraceback (most recent call last):\n  File "x.py", line 1\n'
        "ERROR :     ServerApp thread raised an exception\n"
        "FileNotFoundError: scenario runs/demo/scenario/scenario.json not found\n"
        "\x1b[91mERROR \x1b[0m:     Exit Code: 700\n"
        "An unhandled exception occurred when running the simulation.\n"
    )
    config = {"run-dir": str(tmp_path / "run"), "num-server-rounds": 2}
    with pytest.raises(FederationError) as error:
        federation._check_completed(config, tmp_path, 0)
    message = str(error.value)
    assert "\n" not in message and "after round 0 of 2" in message
    assert "FileNotFoundError: scenario runs/demo/scenario/scenario.json not found" in message
    assert str(tmp_path / "flwr_run.log") in message


def test_progress_announces_new_rounds_only(tmp_path):
    """A resumed run's earlier rounds are not announced again; a rewritten round is."""
    import io

    from rich.console import Console

    from simulation.federation_progress import FederationProgress

    def write(rounds: dict[int, float]) -> None:
        history = {
            str(k): {"server": {"test-auroc": v}, "wall_seconds": 1.0} for k, v in rounds.items()
        }
        (tmp_path / "metrics.json").write_text(json.dumps(history))

    write({1: 0.6})
    out = io.StringIO()
    progress = FederationProgress(tmp_path, 3, ["a"], Console(file=out, width=80))
    progress()
    assert out.getvalue() == ""
    write({1: 0.6, 2: 0.7})
    progress()
    write({1: 0.65, 2: 0.7})  # the server rewrote round 1 (a fresh run into an old run dir)
    progress()
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["round 2 of 3", "round 1 of 3"]
    assert "AUROC 0.650" in lines[1] and "replied: none" in lines[1]


def test_a_corrupt_feature_shard_is_one_line(tmp_path, capsys, monkeypatch):
    from omnifuse_model.data.features.shard_checks import CorruptShardError
    from simulation import prepared_sites

    def corrupt(_scenario):
        raise CorruptShardError(
            "cache/ehr/ab12.npz: feature shard fails its checksum; run omnifuse prepare again"
        )

    monkeypatch.setattr(prepared_sites, "from_scenario", corrupt)
    scenario = tmp_path / "scenario"
    code = main(["train", "--scenario", str(scenario), "--out", str(tmp_path / "run")])
    _one_line_error(capsys, code, "ab12.npz", "omnifuse prepare")

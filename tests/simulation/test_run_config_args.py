"""`omnifuse federate --run-config`: Flower's parser, unknown keys named before anything
starts, explicit keys never silently overridden, one node per site."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulation.run_config_args import (
    app_config_defaults,
    federate_run_config,
    parse_run_config,
)

KNOWN = app_config_defaults()


def _merge(explicit, *, rounds=None, resume=False, sites=3, tmp=Path("/tmp/x")):
    return federate_run_config(
        explicit,
        scenario_dir=tmp / "scenario",
        run_dir=tmp / "run",
        num_sites=sites,
        rounds=rounds,
        resume=resume,
        known=KNOWN,
    )


def test_values_take_flowers_types_and_bare_words_are_strings():
    values = parse_run_config('num-server-rounds=5 lr=0.01 modality-aware=false strategy="fedprox"')
    assert values == {
        "num-server-rounds": 5,
        "lr": 0.01,
        "modality-aware": False,
        "strategy": "fedprox",
    }
    assert parse_run_config("strategy=fedprox tla-scope=global") == {
        "strategy": "fedprox",
        "tla-scope": "global",
    }


def test_an_unreadable_value_is_named_with_how_to_quote():
    with pytest.raises(ValueError, match=r"'lr=1\.2\.3'.*quote strings"):
        parse_run_config("lr=1.2.3")
    with pytest.raises(ValueError, match="key=value pairs"):
        parse_run_config("num-server-rounds 5")


def test_unknown_keys_are_named_with_the_valid_ones():
    with pytest.raises(ValueError) as error:
        _merge({"num-rounds": 2, "strategy": "fedavg"})
    message = str(error.value)
    assert "unknown key(s) num-rounds;" in message
    assert "num-server-rounds" in message and "proximal-mu" in message


def test_rounds_in_run_config_are_not_overridden_by_a_cli_default():
    assert _merge({"num-server-rounds": 7})["num-server-rounds"] == 7
    assert _merge({}, rounds=4)["num-server-rounds"] == 4
    assert _merge({"num-server-rounds": 4}, rounds=4)["num-server-rounds"] == 4
    assert "num-server-rounds" not in _merge({})  # pyproject's default applies


def test_rounds_given_both_ways_and_differing_is_an_error():
    with pytest.raises(ValueError, match="--rounds 3 and --run-config num-server-rounds=7"):
        _merge({"num-server-rounds": 7}, rounds=3)
    with pytest.raises(ValueError, match="--resume True and --run-config resume=False"):
        _merge({"resume": False}, resume=True)


def test_scenario_and_run_dir_from_options_and_a_contradiction_refused(tmp_path):
    values = _merge({}, tmp=tmp_path)
    assert values["scenario-dir"] == str(tmp_path / "scenario")
    with pytest.raises(ValueError, match="--run-dir .* and --run-config run-dir=elsewhere"):
        _merge({"run-dir": "elsewhere"}, tmp=tmp_path)


def test_node_minimums_follow_the_scenario_size():
    values = _merge({}, sites=1)
    assert values["min-available-nodes"] == 1 and values["min-train-nodes"] == 1
    assert _merge({}, sites=5)["min-available-nodes"] == 5
    assert _merge({"min-train-nodes": 3}, sites=5)["min-train-nodes"] == 3
    with pytest.raises(ValueError, match="min-train-nodes=4: the scenario has 3 site"):
        _merge({"min-train-nodes": 4}, sites=3)


def test_pyprojects_relative_scenario_dir_fails_with_where_it_looked_and_what_to_do(
    tmp_path, monkeypatch
):
    """Plain `flwr run .` with pyproject's defaults: the ServerApp runs in Flower's app
    folder, so the relative scenario-dir is not found; the error says why and what to do."""
    from server.run_config import FederationRunConfig

    monkeypatch.chdir(tmp_path)  # as Flower's app folder: no runs/ there
    run = FederationRunConfig.from_flower(KNOWN)
    with pytest.raises(FileNotFoundError) as error:
        run.scenario()
    message = str(error.value)
    assert "run config 'scenario-dir'" in message and str(Path.cwd()) in message
    assert "give absolute paths" in message and "omnifuse federate" in message


def test_the_harness_sends_absolute_paths_and_every_key(tmp_path, monkeypatch):
    """run_federation's run config: pyproject's defaults for missing keys, paths absolute
    against the caller's folder (so the completion check reads the real run dir)."""
    from simulation.federation import complete_run_config
    from simulation.flower_processes import REPO_ROOT

    monkeypatch.chdir(tmp_path)
    values = complete_run_config({"run-dir": "mine", "num-server-rounds": 2}, REPO_ROOT)
    assert values["run-dir"] == str(tmp_path / "mine")
    assert values["scenario-dir"] == str(tmp_path / KNOWN["scenario-dir"])
    assert values["num-server-rounds"] == 2 and set(values) == set(KNOWN)

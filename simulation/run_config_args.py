"""`--run-config` for `omnifuse federate`: parsed by Flower's own parser, checked against the
app's keys before anything starts, merged with the command's options by explicit rules.

Precedence: a key given in ``--run-config`` is never silently replaced. A command-line option
(``--rounds``, ``--resume``) applies only when it is given; given both ways with different
values it is an error naming both. Keys neither way come from ``[tool.flwr.app.config]``
except those the scenario decides (``scenario-dir``, ``run-dir``) and the node minimums,
which are capped at the scenario's site count so a small scenario cannot wait forever.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import click
from flwr.common.config import parse_config_args

from simulation.flower_processes import REPO_ROOT

# the same key=value split Flower uses (flwr.common.config.parse_config_args)
_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")
_BARE_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_TOML_WORDS = {"true", "false", "inf", "nan"}
NODE_MINIMUMS = ("min-train-nodes", "min-evaluate-nodes", "min-available-nodes")


def app_config_defaults(app_dir: Path = REPO_ROOT) -> dict[str, object]:
    """The app's run-config keys and defaults: ``[tool.flwr.app.config]`` of pyproject.toml."""
    path = Path(app_dir) / "pyproject.toml"
    try:
        project = tomllib.loads(path.read_text(encoding="utf-8"))
        return dict(project["tool"]["flwr"]["app"]["config"])
    except (OSError, tomllib.TOMLDecodeError, KeyError) as error:
        raise ValueError(f"{path}: no readable [tool.flwr.app.config] ({error})") from error


def _parse_pair(key: str, value: str) -> dict[str, object]:
    """One ``key=value`` through Flower's parser; a bare word (``strategy=fedprox``, which
    TOML and so Flower reject) is read as the string it plainly is."""
    try:
        return parse_config_args([f"{key}={value}"])
    except click.ClickException:
        if _BARE_WORD.fullmatch(value) and value.lower() not in _TOML_WORDS:
            return parse_config_args([f'{key}="{value}"'])
        raise ValueError(
            f"--run-config '{key}={value}': {value} is not a bool, int, float or string; "
            f"quote strings with double quotes inside single ones: '{key}=\"...\"'"
        ) from None


def parse_run_config(text: str | None) -> dict[str, object]:
    """``'k1=v1 k2="v2"'`` -> ``{k1: v1, k2: "v2"}`` (Flower's syntax and value types)."""
    if not text or not text.strip():
        return {}
    values: dict[str, object] = {}
    matched = _PAIR.findall(text)
    leftover = _PAIR.sub("", text).strip()
    if leftover or not matched:
        raise ValueError(
            f"--run-config: cannot read {leftover or text!r}; expected space-separated "
            "key=value pairs, e.g. 'num-server-rounds=5 strategy=\"fedprox\"'"
        )
    for key, value in matched:
        values.update(_parse_pair(key, value))
    return values


def check_known_keys(values: dict[str, object], known: dict[str, object]) -> None:
    """Name every unknown key and list the valid ones (Flower would only say
    "[code: 15] Invalid run configuration" after starting the SuperLink)."""
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(
            f"--run-config: unknown key(s) {', '.join(unknown)}; valid keys (pyproject.toml "
            f"[tool.flwr.app.config]): {', '.join(sorted(known))}"
        )


def _take(values: dict[str, object], key: str, option: str, given: object) -> None:
    """Put an option's value under ``key`` unless ``--run-config`` already holds a
    different one (then the user said two things: refuse)."""
    if given is None:
        return
    if key in values and values[key] != given:
        raise ValueError(
            f"{option} {given} and --run-config {key}={values[key]} disagree: give one of them"
        )
    values[key] = given


def federate_run_config(
    explicit: dict[str, object],
    *,
    scenario_dir: Path,
    run_dir: Path,
    num_sites: int,
    rounds: int | None,
    resume: bool,
    known: dict[str, object],
) -> dict[str, object]:
    """The run config `omnifuse federate` hands to `flwr run` (see the module docstring)."""
    check_known_keys(explicit, known)
    values = dict(explicit)
    for key, option, path in (
        ("scenario-dir", "--scenario", scenario_dir),
        ("run-dir", "--run-dir", run_dir),
    ):
        if key in values and Path(str(values[key])).resolve() != path:
            raise ValueError(
                f"{option} {path} and --run-config {key}={values[key]} disagree: give one of them"
            )
        values[key] = str(path)
    _take(values, "num-server-rounds", "--rounds", rounds)
    _take(values, "resume", "--resume", True if resume else None)
    for key in NODE_MINIMUMS:
        if key not in values:
            default = int(known.get(key, num_sites))  # type: ignore[arg-type]
            values[key] = num_sites if key == "min-available-nodes" else min(default, num_sites)
        elif int(values[key]) > num_sites:  # type: ignore[arg-type]
            raise ValueError(
                f"--run-config {key}={values[key]}: the scenario has {num_sites} site(s), "
                f"one simulated node each; {key} cannot exceed {num_sites}"
            )
    return values

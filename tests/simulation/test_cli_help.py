"""Every command and subcommand explains itself: a description, a help line per option and,
where an option has a default, that default."""

from __future__ import annotations

import argparse

import pytest

from simulation.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


COMMANDS = [path for path, _ in _commands(build_parser())]


def test_every_command_is_listed():
    assert ("federate",) in COMMANDS and ("deploy", "certs") in COMMANDS
    assert ("partition",) in COMMANDS and ("audit",) in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "omnifuse")
def test_help_has_description_and_each_option_its_help_and_default(path, capsys):
    parser = dict(_commands(build_parser()))[path]
    assert parser.description, f"omnifuse {' '.join(path)}: no description"
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps at '-'
    assert " ".join(parser.description.split())[:40] in text
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"omnifuse {' '.join(path)} {name}: no help text"
        shows_default = action.default not in (None, False) and action.option_strings
        if shows_default:
            assert f"(default: {action.default})" in text, f"{name}: default not shown"


def test_demo_help_states_the_demo_config_defaults(capsys):
    from simulation.demo import DemoConfig

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("stays", "sites", "rounds"):
        assert f"(default {DemoConfig.model_fields[name].default})" in text, name

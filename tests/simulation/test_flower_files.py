"""The files the harness writes for Flower (run-config TOML, FLWR_HOME config.toml) are
written by tomli_w and read back exactly; ports are free ones."""

from __future__ import annotations

import socket
import tomllib

from flwr.common.config import parse_config_args

from simulation.federation import CONNECTION, _write_flwr_home
from simulation.flower_processes import free_port, write_run_config


def test_run_config_round_trips_through_flowers_reader(tmp_path):
    values = {
        "scenario-dir": 'C:\\odd "quoted" path',
        "num-server-rounds": 3,
        "lr": 0.003,
        "modality-aware": False,
        "strategy": "fedprox",
    }
    path = write_run_config(tmp_path / "run_config.toml", values)
    assert parse_config_args([str(path)]) == values


def test_flwr_home_names_the_superlink_on_its_port(tmp_path):
    home = _write_flwr_home(tmp_path, 40123)
    config = tomllib.loads((home / "config.toml").read_text())
    assert config["superlink"]["default"] == CONNECTION
    assert config["superlink"][CONNECTION] == {"address": "127.0.0.1:40123", "insecure": True}


def test_free_port_can_be_bound_on_loopback():
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", port))

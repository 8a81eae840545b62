"""argparse types for numeric command-line options: each value is checked at the command
line, and argparse refuses a bad one with the option's name and the range it must lie in
(never a library's message from deep inside, such as numpy's "negative dimensions")."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

SEED_MAX = 2**32 - 1
"""The largest seed every generator we seed takes (numpy, torch, Python's random)."""


def integer(low: int, high: int) -> Callable[[str], int]:
    """A type for an option that takes an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer from {low} to {high}")
        return value

    return parse


def number(low: float, high: float, low_open: bool = False) -> Callable[[str], float]:
    """A type for an option that takes a finite number in [low, high] ((low, high] if
    ``low_open``)."""
    bracket = "(" if low_open else "["

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        above = value > low if low_open else value >= low
        if not (math.isfinite(value) and above and value <= high):
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a finite number in {bracket}{low}, {high}]"
            )
        return value

    return parse


def seed() -> Callable[[str], int]:
    """A type for a random seed: an integer from 0 to `SEED_MAX`."""
    return integer(0, SEED_MAX)


def max_workers() -> int:
    """The most worker processes a command may start: 4 per CPU, at most 64."""
    return min(64, 4 * (os.cpu_count() or 1))

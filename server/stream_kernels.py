"""Compiled (numba) inner loop of the streamed pass for bfloat16 updates.

Per key of one site's update: decode the raw bfloat16 values (a 16-bit shift), sum their
squares, and add them, times the site's weight, to the key's part of the round's sum, in one
call while the key's values are in cache. numpy needs four calls and four passes over the
values for the same work (shift, dot, multiply, add), each with its Python overhead: at 10
sites of the paper-size model 18 ms against 10 ms here (docs/BENCHMARKS.md).

Numerics: the weighted sum is ``out = values * weight`` for the first participating site and
``out = out + values * weight`` for the others, in float32, each product and sum rounded
(no fused multiply-add: numba emits no contraction without fastmath), so the result equals
``server.aggregation``'s numpy FedAvg bit for bit (tested). Only the sum of squares may be
reassociated (vectorised partial sums, float32); NaN and infinity propagate (no
``nnan``/``ninf`` flags), so a non-finite update still has a non-finite norm.

Compiled on first use in a process and cached next to this file (``__pycache__``) for the
next processes; a process's first call still initialises numba (about 0.3-0.6 s), which the
ServerApp does at start-up (:func:`compile_now`), before its first round.
"""

from __future__ import annotations

import numba
import numpy as np

# reassociation (vectorised partial sums) and fused multiply-add for the squares only;
# NaN and infinity keep their meaning
_SQUARES_MATH = {"reassoc", "contract", "nsz", "arcp"}


@numba.njit(nogil=True, cache=True, fastmath=_SQUARES_MATH)
def _sum_of_squares(values: np.ndarray) -> float:
    total = np.float32(0.0)
    for i in range(values.size):
        total += values[i] * values[i]
    return total


@numba.njit(nogil=True, cache=True)
def bfloat16_step(
    part: np.ndarray,
    out: np.ndarray,
    bits: np.ndarray,
    values: np.ndarray,
    weight: float,
    first: bool,
    norms: bool,
) -> float:
    """Decode ``part`` (raw bfloat16 as ``uint16``) into ``values`` (``bits`` is the same
    scratch as ``uint32``), return its sum of squares (0 when not ``norms``) and, when
    ``weight > 0``, write (``first``) or add ``values * weight`` into ``out``."""
    size = part.size
    for i in range(size):
        bits[i] = np.uint32(part[i]) << np.uint32(16)
    squares = _sum_of_squares(values[:size]) if norms else 0.0
    if weight > 0:
        scale = np.float32(weight)
        if first:
            for i in range(size):
                out[i] = values[i] * scale
        else:
            for i in range(size):
                out[i] = out[i] + values[i] * scale
    return squares


def compile_now() -> None:
    """Compile (or load from the cache) and run the step once on a few values, so a process
    pays numba's one-time start (about 0.3-0.6 s, cache or not) before its first round."""
    part = np.frombuffer(bytes(4), "<u2")  # read-only, as a reply's views: numba's variant
    scratch = np.zeros(2, np.float32)
    bfloat16_step(part, np.zeros(2, np.float32), scratch.view(np.uint32), scratch, 1.0, True, True)

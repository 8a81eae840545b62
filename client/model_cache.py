"""One constructed ``OmniFuse`` per ClientApp process, reloaded with every message's weights.

Constructing the paper-size model (d 128, K 5: 3.3M parameters, their random initialisation)
costs about 10 ms, in every train and every evaluate message; a simulated ClientApp process
answers many messages, for many sites. ``loaded_model`` builds the model once per model
config and, for each message, puts it back in the state a freshly built model loaded with
the message's weights is in:

- parameters and persistent buffers: ``load_state_dict`` (strict) replaces every one;
- gradients: none (a fresh model has none); optimizers are created per ``fit``, so no
  optimizer state outlives a message;
- ``requires_grad`` on every parameter, training mode, no lazy combination
  (``model.laziness`` None), on the CPU;
- the one non-persistent buffer (the combination masks) follows from the model config,
  which is the cache key.

Randomness: a fresh model draws its initial weights from torch's global generator; a reused
one does not. Everything in a round that draws runs inside ``fit``, which reseeds first
(``seed_everything``), and evaluation draws nothing, so a reused model gives bit-identical
results (tests/federation/test_model_cache.py: two sites in sequence, fresh vs reused).

Not reused: DP-SGD rounds (``dp_compatible`` models; Opacus attaches hooks to the module),
and a model another thread holds at that moment (it gets a fresh one).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor

from omnifuse_model.config import OmniFuseConfig
from omnifuse_model.model import OmniFuse

_lock = threading.Lock()
_cached: dict[str, OmniFuse] = {}  # at most one entry: the last model config's


@dataclass
class LoadedModel:
    """A model holding a message's weights; ``reused`` when it is the process's cached one
    (its tensors are overwritten by the next message: copy what must outlive this one)."""

    model: OmniFuse
    reused: bool


def fresh_model(config: OmniFuseConfig, state: Mapping[str, Tensor] | None) -> OmniFuse:
    """A newly built model, loaded with ``state`` when given."""
    model = OmniFuse(config)
    if state is not None:
        model.load_state_dict(state)
    return model


def reset(model: OmniFuse, state: Mapping[str, Tensor]) -> OmniFuse:
    """Put ``model`` in the state ``fresh_model(model.config, state)`` would be in."""
    if any(p.device.type != "cpu" for p in model.parameters()):
        model.to("cpu")
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    model.requires_grad_(True)
    model.train()
    model.set_laziness(None)
    return model


@contextmanager
def loaded_model(config: OmniFuseConfig, state: Mapping[str, Tensor]) -> Iterator[LoadedModel]:
    """The process's model for ``config``, holding ``state``, for the ``with`` block's use."""
    if config.dp_compatible or not _lock.acquire(blocking=False):
        yield LoadedModel(fresh_model(config, state), reused=False)
        return
    try:
        key = config.model_dump_json()
        model = _cached.get(key)
        if model is None:
            _cached.clear()
            model = fresh_model(config, state)
            _cached[key] = model
        else:
            reset(model, state)
        yield LoadedModel(model, reused=True)
    finally:
        _lock.release()


def clear() -> None:
    """Forget the cached model (tests; a process that changes federations needs not)."""
    with _lock:
        _cached.clear()

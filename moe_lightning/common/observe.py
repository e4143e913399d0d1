"""Observing a module without changing it: its train/eval modes, the buffers it keeps, the random number generators,
grad mode, autocast and compiled code are all as they were afterwards, so training with and without observers ends
in the same weights."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

# The attributes every nn.Module keeps for itself (parameters, buffers, submodules, hooks, the train flag): not state
# a layer keeps of its own.
_MODULE_SLOTS = frozenset(vars(nn.Module()))


@contextmanager
def restored_modes(module: nn.Module | None, eval_mode: bool = True) -> Iterator[None]:
    """Put ``module`` in eval mode (if ``eval_mode``) and give every submodule its own train/eval mode back
    afterwards (``module.train(mode)`` would not: it sets one mode on all of them)."""
    modes = [(m, m.training) for m in module.modules()] if isinstance(module, nn.Module) else []
    try:
        if eval_mode and isinstance(module, nn.Module):
            module.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the CPU, CUDA, numpy and Python random states afterwards."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    np_rng, py_rng = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)


def _fingerprint(value: Any) -> tuple:
    """What tells whether an attribute changed: a tensor's identity and version counter (bumped by every in-place
    write), a plain value itself, a container's identity and length, any other object's identity."""
    if isinstance(value, Tensor):
        return ("tensor", id(value), value._version)
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return ("value", type(value), value)
    if isinstance(value, (list, tuple, dict, set)):
        return ("container", id(value), len(value))
    return ("object", id(value))


def _own_attributes(module: nn.Module) -> dict[str, Any]:
    """The attributes ``module`` keeps beyond what every nn.Module (and, for a LightningModule, every
    LightningModule) keeps: the state a forward pass could change outside the buffers."""
    skip = _MODULE_SLOTS | _framework_slots(type(module))
    return {k: v for k, v in vars(module).items() if k not in skip}


def _framework_slots(cls: type) -> frozenset[str]:
    for base in cls.__mro__:
        if base.__module__.startswith("lightning.") and base.__name__ == "LightningModule":
            return _LIGHTNING_SLOTS.setdefault(base, frozenset(vars(base())))
    return frozenset()


_LIGHTNING_SLOTS: dict[type, frozenset[str]] = {}


class StateChanges(list):
    """The paths (``"blocks.0.ffn.counter"``) of module state that a forward pass changed outside the buffers;
    filled when :func:`restored_state` exits. ``restored`` holds those that were put back."""

    restored: list[str]

    def __init__(self) -> None:
        super().__init__()
        self.restored = []


@contextmanager
def restored_state(module: nn.Module | None) -> Iterator[StateChanges]:
    """Give every buffer of ``module`` its values back afterwards, and find the other state its forward passes
    changed.

    A buffer written in place (a token counter, a running statistic) is copied back; a buffer slot given another
    tensor gets the original tensor back. Plain attributes of the submodules are compared before and after: one
    that now holds another object, or another plain value, is set back and listed in ``changes.restored``; one
    written in place (a tensor or a list it keeps) cannot be set back and is listed only. A forward pass that
    changes state outside the model (a module-level registry) cannot be seen here.
    """
    changes = StateChanges()
    if not isinstance(module, nn.Module):
        yield changes
        return
    named = list(module.named_modules(remove_duplicate=True))
    buffers = [
        (m, name, buf, buf.clone()) for _, m in named for name, buf in m._buffers.items() if isinstance(buf, Tensor)
    ]
    attributes = [(path, m, _own_attributes(m)) for path, m in named]
    prints = [{k: _fingerprint(v) for k, v in attrs.items()} for _, _, attrs in attributes]
    try:
        yield changes
    finally:
        with torch.no_grad():
            for m, name, buf, saved in buffers:
                if m._buffers.get(name) is not buf:
                    m._buffers[name] = buf
                if buf.shape != saved.shape:
                    buf.set_(saved)
                elif not torch.equal(buf, saved):
                    buf.copy_(saved)
        for (path, m, before), fingerprints in zip(attributes, prints, strict=True):
            after = _own_attributes(m)
            for key in sorted(set(before) | set(after)):
                if key in before and key in after and _fingerprint(after[key]) == fingerprints[key]:
                    continue
                where = f"{path}.{key}" if path else key
                changes.append(where)
                if key not in before:
                    object.__delattr__(m, key)
                elif key in after and after[key] is before[key]:
                    continue  # written in place: what it held before is gone
                else:
                    object.__setattr__(m, key, before[key])
                changes.restored.append(where)


@contextmanager
def observation(module: nn.Module, grad: bool = False) -> Iterator[StateChanges]:
    """Run a probe without leaving a trace: eval mode, no grad (unless ``grad``), no autocast, compiled code run
    eagerly (a probe neither waits for nor adds to ``torch.compile``'s caches, and double backward runs), and
    afterwards the modes, the buffers and the random states of before. Yields the state changes
    :func:`restored_state` found."""
    device_type = "cuda" if any(p.is_cuda for p in module.parameters()) else "cpu"
    with restored_modes(module), preserved_rng(), restored_state(module) as changes, torch.set_grad_enabled(grad):
        with torch.autocast(device_type=device_type, enabled=False), torch.compiler.set_stance("force_eager"):
            yield changes

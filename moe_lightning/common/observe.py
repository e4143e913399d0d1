"""Observing a module without changing it: its train/eval modes, the random number generators, grad mode and
autocast are all as they were afterwards, so training with and without observers ends in the same weights."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


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


@contextmanager
def observation(module: nn.Module, grad: bool = False) -> Iterator[None]:
    """Run a probe without leaving a trace: eval mode, no grad (unless ``grad``), no autocast, and the modes and
    random states of before restored afterwards."""
    device_type = "cuda" if any(p.is_cuda for p in module.parameters()) else "cpu"
    with restored_modes(module), preserved_rng(), torch.set_grad_enabled(grad):
        with torch.autocast(device_type=device_type, enabled=False):
            yield

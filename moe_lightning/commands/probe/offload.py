"""Probing a model that ``accelerate`` dispatched over GPUs, CPU memory and disk (``device_map="auto"``), one layer's
weights on the execution device at a time, and the peak memory of the run.

A dispatched model keeps each offloaded module's weights on the ``meta`` device; the ``AlignDevicesHook`` that
``accelerate`` wraps around the module's forward loads them onto the execution device (from CPU memory or the offload
folder) before the forward and puts them back after it. A model forward therefore works as it is, and capturing the
layers' inputs needs nothing more. The views and the probe, however, read a layer's weights directly (and lend the
layer, or its router, float64 copies of them through ``torch.func.functional_call``), so :func:`weights_on_device`
loads a layer's weights the way the hooks do and, while it is open, turns the layer's hooks into pass-throughs: a call
of the block from inside a view must not reload float32 weights over the lent float64 copies, nor drop them to
``meta`` afterwards. It restores the hooks and unloads the weights on exit; no parameter of a module without
offloaded weights is touched.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from moe_lightning.geometry import MoEView
from moe_lightning.geometry.lending import lent_modules


def is_dispatched(model: nn.Module) -> bool:
    """Whether any module of ``model`` carries an ``accelerate`` hook (``from_pretrained(device_map=...)``,
    ``accelerate.dispatch_model``)."""
    return any(getattr(module, "_hf_hook", None) is not None for module in model.modules())


@contextmanager
def weights_on_device(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Every offloaded weight of ``modules`` (and of their submodules) on its execution device, and their
    ``accelerate`` hooks pass-throughs, while the context is open; the hooks and the offload are restored on exit.

    The weights are loaded by each hook's own ``pre_forward`` and unloaded by its ``post_forward``, as
    ``accelerate.utils.align_module_device`` does for one module; this does it for a whole block and keeps the
    block's own calls (its router, its experts) from reloading or unloading them in between.
    """
    from accelerate.hooks import ModelHook
    from accelerate.utils import has_offloaded_params

    swapped: list[tuple[nn.Module, Any, bool]] = []
    try:
        for module in modules:
            for sub in module.modules():
                hook = getattr(sub, "_hf_hook", None)
                if hook is None or any(sub is done for done, _, _ in swapped):
                    continue
                offloaded = has_offloaded_params(sub)
                swapped.append((sub, hook, offloaded))
                if offloaded:
                    hook.pre_forward(sub)
                sub._hf_hook = ModelHook()  # the forward wrapper reads the hook at every call
        yield
    finally:
        for sub, hook, offloaded in reversed(swapped):
            sub._hf_hook = hook
            if offloaded:
                hook.post_forward(sub, None)


class LayerWeights:
    """The contexts that put a layer's weights on its execution device: around the adapters' scan of a block
    (``module_context``) and around the check and the probe of a view (``view_context``); empty contexts for a
    model that is not dispatched.

    Args:
        model: the model the layers belong to.
    """

    def __init__(self, model: nn.Module) -> None:
        self.dispatched = is_dispatched(model)

    def module_context(self, module: nn.Module) -> AbstractContextManager[None]:
        """The context in which ``module``'s weights are on its execution device."""
        return weights_on_device([module]) if self.dispatched else nullcontext()

    def view_context(self, view: MoEView) -> AbstractContextManager[None]:
        """The context in which every weight ``view``'s functions read is on its execution device."""
        return weights_on_device(lent_modules(view)) if self.dispatched else nullcontext()


def reset_peak_memory() -> None:
    """Start the CUDA peak-memory counters afresh (the CPU's peak resident set cannot be reset)."""
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """The peak memory of a probe that ran on ``device``, for ``probe.json`` and the summary.

    On CUDA: ``torch.cuda.max_memory_allocated`` of every CUDA device since :func:`reset_peak_memory` (the tensors
    PyTorch allocated, not the caching allocator's reserve), ``bytes`` being the largest. On the CPU: the peak resident
    set size of the whole process since it started (``resource.getrusage``), which includes the loaded model, the
    Python interpreter and anything the process held before the probe.

    Returns:
        ``{"bytes": int, "measure": str, "devices": {device: bytes}}``.
    """
    if device.type == "cuda":
        devices = {
            f"cuda:{i}": int(torch.cuda.max_memory_allocated(i))
            for i in range(torch.cuda.device_count())
            if torch.cuda.max_memory_allocated(i) > 0 or i == (device.index or 0)
        }
        return {"bytes": max(devices.values()), "measure": "torch.cuda.max_memory_allocated", "devices": devices}
    # ru_maxrss is in KiB on Linux and in bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"bytes": int(rss), "measure": "peak resident set size of the process (resource.getrusage)", "devices": {}}


def format_peak_memory(peak: dict[str, Any]) -> str:
    """One line for the summary: ``peak memory: 1.234 GiB (torch.cuda.max_memory_allocated, cuda:0)``."""
    where = ", ".join(peak["devices"]) or "cpu"
    return f"peak memory: {peak['bytes'] / 2**30:.4g} GiB ({peak['measure']}, {where})"

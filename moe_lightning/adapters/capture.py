"""Capturing what MoE layers see: temporary forward hooks on each view's module record its input tokens while a
model runs, and are removed afterwards, so no probe state lives in the model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from moe_lightning.geometry import MoEView


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` (a tensor, or dicts/lists/tuples of them) moved to ``device``; anything else as it is."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def layer_input(args: tuple, kwargs: dict) -> Tensor | None:
    """The hidden states an MoE block's forward was called with: its first positional tensor, or the
    ``hidden_states`` / ``x`` keyword."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    return kwargs.get("hidden_states", kwargs.get("x"))


def capture_layer_inputs(
    model: nn.Module,
    views: Sequence[MoEView],
    inputs: Sequence[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
    device: torch.device | None = None,
) -> dict[str, Tensor]:
    """Run ``model`` on each of ``inputs`` with temporary forward hooks on each view's module.

    Args:
        model: what runs the inputs (a LightningModule, or any module).
        views: the layers to capture; views that share one module share one hook.
        inputs: model inputs, one forward pass each.
        forward: how to run one input, ``forward(model, x)``; default ``model(x)``.
        device: where the inputs go first; default ``model.device``.

    Returns:
        Each view's captured layer inputs as ``(N, D)`` (empty when its layer never ran). Hooks are removed even
        if a forward pass fails.
    """
    captured: dict[str, list[Tensor]] = {v.name: [] for v in views}
    names_by_module: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for view in views:
        names_by_module.setdefault(id(view.module), []).append(view.name)
        modules[id(view.module)] = view.module

    def make_hook(names: list[str]):
        def hook(module, args, kwargs, output):
            x = layer_input(args, kwargs)
            if x is not None:
                for name in names:
                    captured[name].append(x.detach().reshape(-1, x.shape[-1]))

        return hook

    target = device if device is not None else model.device
    handles = []
    try:
        for key, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(names_by_module[key]), with_kwargs=True))
        for x in inputs:
            x = to_device(x, target)
            forward(model, x) if forward is not None else model(x)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(chunks) if chunks else torch.empty(0) for name, chunks in captured.items()}

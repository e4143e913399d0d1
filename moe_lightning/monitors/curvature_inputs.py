"""What the curvature probe reads from the training loop: the model's own loss on a batch, when the user gives no
loss function, and the torch optimiser inside a loop's wrapper, whose settings and state set the edge-of-stability
thresholds (docs/geometry.md §7)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["check_model_loss", "model_loss", "torch_optimizer"]


def model_loss(model: nn.Module, batch: Any) -> Tensor:
    """The model's own loss on ``batch``: ``model.loss(batch)`` (the first element of a tuple) where the model has
    such a method (moe-lightning's LightningModules), else the ``loss`` of ``model(**batch)`` for a dict batch (a
    Hugging Face model computes it when the batch holds ``labels``)."""
    loss = getattr(model, "loss", None)
    if callable(loss):
        out = loss(batch)
        return out[0] if isinstance(out, tuple) else out
    check_model_loss(model, batch)
    out = model(**batch)
    found = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if found is None:
        raise ValueError(
            f"{type(model).__name__}(**batch) returned no loss; put labels in the batch or pass "
            "loss_fn=lambda model, batch: <scalar loss>"
        )
    return found


def check_model_loss(model: nn.Module, batch: Any) -> None:
    """Raise the error that says how to give a loss when :func:`model_loss` has none for ``model`` and ``batch``."""
    if not callable(getattr(model, "loss", None)) and not isinstance(batch, Mapping):
        raise ValueError(
            f"{type(model).__name__} has no loss(batch) method and the batch is not a dict of model inputs; "
            "pass loss_fn=lambda model, batch: <scalar loss>"
        )


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimiser inside a loop's wrapper (Accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``): the thresholds read its type, its ``param_groups`` and its state."""
    inner = getattr(optimizer, "optimizer", None)
    while isinstance(inner, torch.optim.Optimizer):
        optimizer, inner = inner, getattr(inner, "optimizer", None)
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None

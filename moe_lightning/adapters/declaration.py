"""What a declaration (:func:`~moe_lightning.adapters.register_moe`) names, as data: where a layer's router
output keeps its gates (:class:`RouterOutput`), how its stacked experts are laid out (:class:`StackedExperts`), the
whole declaration (:class:`Declaration`), and reading attribute paths and settings from a layer.

Shape legend: ``N`` tokens, ``E`` experts, ``K`` experts per token, ``C`` capacity slots, ``D`` model dim, ``H``
expert hidden width.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from moe_lightning.geometry.activations import ACTIVATIONS

__all__ = ["Declaration", "Gates", "RouterOutput", "StackedExperts", "attribute", "first_tensor", "logit_gates"]

Gates = Callable[[nn.Module, Tensor], Tensor]  # (block, x (N, D)) -> (N, E)


@dataclass(frozen=True)
class RouterOutput:
    """Gates read from what the layer's router module returns, for a router that does its own top-k.

    Give ``combine`` (a combine tensor ``(N, E, C)`` or ``(N, E)``, summed over its capacity slots) or both
    ``weights`` and ``indices`` (``(N, K)`` each): the position of each in the router's output tuple, or ``None``
    for an output that is the tensor itself.

    Args:
        path: the router module, an attribute path in the layer (``"gate"``, ``"deepspeed_moe.gate"``).
        combine: where the combine tensor is in the router's output.
        weights: where the top-k weights are.
        indices: where the top-k expert indices are.
        args: attributes of the layer passed to the router after the tokens (torchtitan's ``("expert_bias",)``).
        batched: call the router with one sequence ``(1, N, D)`` rather than ``(N, D)``.
    """

    path: str
    combine: int | None = None
    weights: int | None = None
    indices: int | None = None
    args: tuple[str, ...] = ()
    batched: bool = False

    def __post_init__(self) -> None:
        if (self.combine is None) == (self.weights is None and self.indices is None) or (
            self.combine is None and (self.weights is None or self.indices is None)
        ):
            raise ValueError(
                f"RouterOutput({self.path!r}): give combine=, or both weights= and indices=; got combine="
                f"{self.combine!r}, weights={self.weights!r}, indices={self.indices!r}"
            )

    def gates(self, block: nn.Module, x_ND: Tensor, num_experts: int) -> Tensor:
        router = attribute(block, self.path)
        extra = [attribute(block, name) for name in self.args]
        output = router(x_ND.unsqueeze(0) if self.batched else x_ND, *extra)

        def item(index: int | None, *shape: int) -> Tensor:
            # Token first, whether the router keeps the sequence axis or flattens it: (1, N, ...) or (N, ...).
            return (output if index is None else output[index]).reshape(x_ND.shape[0], *shape, -1)

        if self.combine is not None:
            return item(self.combine, num_experts).sum(-1).to(x_ND.dtype)
        weights, indices = item(self.weights), item(self.indices).long()
        gates_NE = torch.zeros(x_ND.shape[0], num_experts, dtype=x_ND.dtype, device=x_ND.device)
        return gates_NE.scatter_add(-1, indices, weights.to(x_ND.dtype))


@dataclass(frozen=True)
class StackedExperts:
    """Experts kept as stacked weight tensors, expert first.

    An expert is ``act(x W_in + b_in) W_out + b_out``, or ``(act(x W_gate) * (x W_in)) W_out + b_out`` with
    ``w_gate`` (a SwiGLU when ``act`` is SiLU).

    Args:
        w_in: attribute path of the input projections.
        w_out: attribute path of the output projections.
        w_gate: attribute path of the gate projections of a gated (GLU) expert, or None.
        layout: ``"in_out"`` for ``w_in`` ``(E, D, H)`` and ``w_out`` ``(E, H, D)`` (``x @ w``), ``"out_in"`` for
            ``nn.Linear``'s ``(E, H, D)`` and ``(E, D, H)`` (``x @ w.T``).
        activation: a name of ``moe_lightning.geometry.activations.ACTIVATIONS`` (``"silu"``, ``"gelu"``,
            ``"relu"``, ...) or the attribute path of the layer's activation module.
        b_in: attribute path of the input biases (``H`` numbers per expert, ``(E, H)`` or ``(E, 1, H)``) of an
            ungated expert, or None; where the layer keeps None (built without biases), there is no bias.
        b_out: attribute path of the output biases (``D`` numbers per expert), likewise.
    """

    w_in: str
    w_out: str
    w_gate: str | None = None
    layout: Literal["in_out", "out_in"] = "in_out"
    activation: str = "silu"
    b_in: str | None = None
    b_out: str | None = None

    def __post_init__(self) -> None:
        if self.layout not in ("in_out", "out_in"):
            raise ValueError(f"StackedExperts: layout={self.layout!r} is not allowed; allowed 'in_out', 'out_in'")
        if self.w_gate is not None and self.b_in is not None:
            raise ValueError("StackedExperts: b_in is for ungated experts; give b_in=None with w_gate")

    def weights(self, block: nn.Module, e: int, dtype: torch.dtype) -> tuple[Tensor | None, ...]:
        """Expert ``e``'s ``(w_in (D, H), w_out (H, D), w_gate (D, H), b_in (H,), b_out (D,))`` in ``x @ w`` layout,
        None for a part it has not."""

        def read(path: str | None, bias: bool = False) -> Tensor | None:
            found = None if path is None else attribute(block, path)
            if found is None:
                return None
            w = found[e].to(dtype)
            return w.reshape(-1) if bias else w.T if self.layout == "out_in" else w

        return read(self.w_in), read(self.w_out), read(self.w_gate), read(self.b_in, True), read(self.b_out, True)

    def act(self, block: nn.Module) -> str | Callable[[Tensor], Tensor]:
        return self.activation if self.activation in ACTIVATIONS else attribute(block, self.activation)


@dataclass(frozen=True)
class Declaration:
    """A declared layer: how to read its gates, experts, selection bias and shared experts, and when to refuse it."""

    experts: str | StackedExperts
    gates: Callable[[nn.Module, Tensor, int], Tensor]
    selection_bias: str | None
    shared_experts: str | None
    shared_gate: str | Gates | None
    refuse: Callable[[nn.Module], str | None] | None


def attribute(block: nn.Module, path: str) -> Any:
    """``block.a.b.c`` for the path ``"a.b.c"`` (a number steps into a list: ``"experts.0"``)."""
    step = lambda obj, name: obj[int(name)] if name.isdigit() else getattr(obj, name)  # noqa: E731
    return functools.reduce(step, path.split("."), block)


def _setting(block: nn.Module, value: Any) -> Any:
    """A declared setting: a constant, or the attribute path where the layer keeps it."""
    return attribute(block, value) if isinstance(value, str) else value


def logit_gates(router: str, top_k: int | str | None, score: str, renormalize: bool | str, route_scale, bias):
    """Gates from a router that returns logits ``(N, E)``: ``score``, the top-k chosen on score plus selection bias
    (which does not weight), optionally renormalised over the k, times ``route_scale``; no top-k, every expert."""

    def gates(block: nn.Module, x_ND: Tensor, num_experts: int) -> Tensor:
        logits = attribute(block, router)(x_ND)
        logits_NE = (logits[0] if isinstance(logits, (tuple, list)) else logits).to(x_ND.dtype)
        scores_NE = logits_NE.softmax(-1) if score == "softmax" else logits_NE.sigmoid()
        k = _setting(block, top_k)
        if k is None:
            return scores_NE * _setting(block, route_scale)
        choice_NE = scores_NE if bias is None else scores_NE + attribute(block, bias).to(x_ND.dtype)
        index_NK = choice_NE.topk(int(k), dim=-1).indices
        weights_NK = scores_NE.gather(-1, index_NK)
        if _setting(block, renormalize):
            weights_NK = weights_NK / weights_NK.sum(-1, keepdim=True)
        return torch.zeros_like(scores_NE).scatter(-1, index_NK, weights_NK * _setting(block, route_scale))

    return gates


def first_tensor(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output

"""The adapters' side of the ``MoEView`` contract (docs/design.md): :class:`CallableView`, a view built from plain
callables. The contract itself (``MoEView``, ``ExpertPlacement``, ``TokenFn``) lives with the geometry that consumes
it, in :mod:`moe_lightning.geometry.view`.

Geometry code and callbacks see an MoE layer only through :class:`~moe_lightning.geometry.view.MoEView`. Adapters
implement it for each model family (ours, Hugging Face Mixtral / Qwen-MoE / OLMoE); a user with an unusual layer
either writes a small class with these members, or wraps plain callables in :class:`CallableView`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from moe_lightning.geometry.view import TokenFn

__all__ = ["CallableView"]


@dataclass
class CallableView:
    """An :class:`MoEView` built from plain callables, for a user's own MoE layer.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        >>> router = nn.Linear(4, 2)
        >>> view = CallableView(
        ...     name="my_moe", module=router, gates_fn=lambda x: router(x).softmax(-1), expert_fns=list(experts))
        >>> view.gates(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """

    name: str
    module: nn.Module
    gates_fn: TokenFn
    expert_fns: Sequence[TokenFn]
    hidden_fns: Sequence[TokenFn] | None = None
    jacobian_fns: Sequence[Callable[[Tensor], Tensor]] | None = None
    operator_fns: Sequence[Callable[[Tensor], Any]] | None = None
    num_experts: int = field(init=False)

    def __post_init__(self) -> None:
        if len(self.expert_fns) < 1:
            raise ValueError(f"CallableView {self.name!r}: expert_fns must hold at least one expert, got none")
        for label, fns in (
            ("hidden_fns", self.hidden_fns),
            ("jacobian_fns", self.jacobian_fns),
            ("operator_fns", self.operator_fns),
        ):
            if fns is not None and len(fns) != len(self.expert_fns):
                raise ValueError(
                    f"CallableView {self.name!r}: {label} has {len(fns)} entries, expected one per expert "
                    f"({len(self.expert_fns)})"
                )
        self.num_experts = len(self.expert_fns)

    def gates(self, x: Tensor) -> Tensor:
        return self.gates_fn(x)

    def expert(self, e: int) -> TokenFn:
        return self.expert_fns[e]

    def expert_hidden(self, e: int) -> TokenFn | None:
        return None if self.hidden_fns is None else self.hidden_fns[e]

    def expert_jacobian(self, e: int, x: Tensor) -> Tensor | None:
        return None if self.jacobian_fns is None else self.jacobian_fns[e](x)

    def expert_jacobian_operator(self, e: int, x: Tensor) -> Any:
        """Expert ``e``'s ``JacobianOperator`` at the tokens ``x`` (matrix-free spectra), or None if not given."""
        return None if self.operator_fns is None else self.operator_fns[e](x)

"""The adapters' side of the ``MoEView`` contract (docs/design.md): :class:`CallableView`, a view built from plain
callables. The contract itself (``MoEView``, ``ExpertPlacement``, ``TokenFn``) lives with the geometry that consumes
it, in :mod:`moe_lightning.geometry.view`.

Geometry code and callbacks see an MoE layer only through :class:`~moe_lightning.geometry.view.MoEView`. Adapters
implement it for each model family (ours, Hugging Face Mixtral / Qwen-MoE / OLMoE); a user with an unusual layer
either writes a small class with these members, or wraps plain callables in :class:`CallableView`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from moe_lightning.geometry.view import TokenFn

__all__ = ["SELECTION_BIAS_NAMES", "CallableView", "modules_held", "selection_bias"]


def modules_held(obj: Any, depth: int = 2) -> list[nn.Module]:
    """The modules a function holds: itself if it is one, a bound method's object, what a ``functools.partial``
    holds, the modules (or lists of them) in a closure, and the modules a function names as globals; ``depth``
    levels of functions deep."""
    if isinstance(obj, nn.Module):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [m for item in obj for m in modules_held(item, depth)]
    if depth <= 0:
        return []
    if isinstance(obj, functools.partial):
        return modules_held([obj.func, *obj.args, *obj.keywords.values()], depth - 1)
    if inspect.ismethod(obj):
        return modules_held([obj.__self__, obj.__func__], depth - 1)
    code = getattr(obj, "__code__", None)
    if code is None:
        return []
    held = [cell.cell_contents for cell in getattr(obj, "__closure__", None) or () if _filled(cell)]
    scope = getattr(obj, "__globals__", {})
    held += [scope[name] for name in code.co_names if name in scope]
    return modules_held([h for h in held if isinstance(h, (nn.Module, list, tuple)) or callable(h)], depth - 1)


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell
        return False
    return True


@dataclass
class CallableView:
    """An :class:`MoEView` built from plain callables, for a user's own MoE layer.

    ``module`` is the MoE block: hooks on it capture the layer's input, and the view is checked against its output
    (:func:`~moe_lightning.geometry.verify_view`). The probes run the functions on float64 copies of the weights they
    read: those of ``module``, and those of every module the functions hold (a module given as a function, a bound
    method's module, the modules a ``functools.partial`` or a closure holds, and the modules a function names as
    globals), found when the view is built and kept in ``weight_modules``. A function that reaches its weights
    another way needs its modules named in ``weight_modules``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> block = nn.ModuleDict({"router": nn.Linear(4, 2), "experts": nn.ModuleList(nn.Linear(4, 4) for _ in "ab")})
        >>> view = CallableView(
        ...     name="my_moe", module=block, gates_fn=lambda x: block.router(x).softmax(-1),
        ...     expert_fns=list(block.experts))
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
    weight_modules: Sequence[nn.Module] = ()
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
        found = list(self.weight_modules)
        for fns in ([self.gates_fn], self.expert_fns, self.hidden_fns, self.jacobian_fns, self.operator_fns):
            for fn in fns or ():
                for module in modules_held(fn):
                    if module is not self.module and not any(module is m for m in found):
                        found.append(module)
        self.weight_modules = tuple(found)

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


#: Where MoE code keeps an aux-loss-free selection bias (added to the scores to choose the experts, not to weight
#: them): this project's and torchtitan's ``expert_bias``, DeepSeek-V3-style ``e_score_correction_bias``.
SELECTION_BIAS_NAMES = ("expert_bias", "e_score_correction_bias", "score_correction_bias")


def selection_bias(view: Any) -> Tensor | None:
    """A layer's selection bias, ``(E,)``, wherever it keeps it, or None: the view's own ``selection_bias()`` if it
    gives one, else the first of :data:`SELECTION_BIAS_NAMES` on the block (torchtitan keeps ``expert_bias`` there) or
    on one of its children (this project's router, a Hugging Face gate), of length ``num_experts``."""
    own = getattr(view, "selection_bias", None)
    if callable(own) and (declared := own()) is not None:
        return declared
    module = view.module
    for holder in (module, *module.children()):
        for name in SELECTION_BIAS_NAMES:
            bias = getattr(holder, name, None)
            if isinstance(bias, Tensor) and bias.dim() == 1 and bias.shape[0] == view.num_experts:
                return bias
    return None

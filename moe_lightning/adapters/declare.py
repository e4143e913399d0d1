"""Declare an MoE layer instead of writing its view: :func:`register_moe` names where the layer keeps its router,
its experts and its routing rule, and :func:`find_moe_layers` then views every instance of it.

Shape legend: ``N`` tokens, ``E`` experts, ``K`` experts per token, ``C`` capacity slots, ``D`` model dim, ``H``
expert hidden width.

A declaration reads everything from the layer at call time (so the view follows training) and computes nothing the
layer already computes where it can: gates come from the layer's own router (its logits, its top-k weights and
indices, or its combine tensor), experts are the layer's own modules, or its stacked weight tensors with their
layout named. The built-in adapters of :mod:`moe_lightning.adapters.libraries` are declarations too.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from moe_lightning.adapters import find_moe_layers, register_moe
    >>> class TinyMoE(nn.Module):
    ...     def __init__(self, dim=4, num_experts=3):
    ...         super().__init__()
    ...         self.gate = nn.Linear(dim, num_experts, bias=False)
    ...         self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_experts))
    ...     def forward(self, x):
    ...         top, index = self.gate(x).softmax(-1).topk(2, dim=-1)
    ...         gates = torch.zeros(*x.shape[:-1], 3).scatter(-1, index, top)
    ...         return sum(gates[..., e : e + 1] * f(x) for e, f in enumerate(self.experts))
    >>> register_moe(TinyMoE, router="gate", experts="experts", top_k=2)
    >>> [(v.name, v.num_experts) for v in find_moe_layers(nn.Sequential(TinyMoE(), nn.ReLU(), TinyMoE()))]
    [('0', 3), ('2', 3)]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from moe_lightning.adapters.declaration import (
    Declaration,
    Gates,
    RouterOutput,
    StackedExperts,
    attribute,
    first_tensor,
    logit_gates,
)
from moe_lightning.adapters.registry import BlockNotViewable, register_adapter, registered_adapters
from moe_lightning.common import preserved_rng
from moe_lightning.geometry import (
    mlp_expert_jacobian,
    mlp_jacobian_operator,
    swiglu_expert_jacobian,
    swiglu_jacobian_operator,
)
from moe_lightning.geometry.activations import ACTIVATIONS
from moe_lightning.geometry.view import MoEView, TokenFn

__all__ = ["RouterOutput", "StackedExperts", "register_moe"]

ADAPTER_NAME = "declared"


# Declared layers, matched in order (a user's declaration goes before the built-in ones); one adapter serves them.
_DECLARED: list[tuple[type | str, Callable[[nn.Module], bool] | None, Declaration]] = []


class DeclaredView:
    """The :class:`~moe_lightning.geometry.MoEView` of a layer declared with :func:`register_moe`."""

    def __init__(self, name: str, module: nn.Module, spec: Declaration) -> None:
        self.name, self.module, self._spec = name, module, spec
        experts = spec.experts
        self.num_experts = (
            int(attribute(module, experts.w_in).shape[0])
            if isinstance(experts, StackedExperts)
            else len(attribute(module, experts))
        )

    def gates(self, x: Tensor) -> Tensor:
        # A router may draw random numbers (noise, random token selection), even in eval mode; reading it must
        # leave the random stream the layer's training draws from where it was (RouterMonitor reads every batch).
        with preserved_rng():
            return self._spec.gates(self.module, x, self.num_experts).to(x.dtype)

    def _stacked(self, e: int, dtype: torch.dtype):
        experts = self._spec.experts
        if not 0 <= e < self.num_experts:
            raise ValueError(f"{self.name}: expert index e={e} is out of range; allowed 0..{self.num_experts - 1}")
        return (
            (experts.weights(self.module, e, dtype), experts.act(self.module))
            if isinstance(experts, StackedExperts)
            else None
        )

    def expert_hidden(self, e: int) -> TokenFn | None:
        if not isinstance(self._spec.experts, StackedExperts):
            return None

        def hidden(x_ND: Tensor) -> Tensor:
            (w_in, _, w_gate, b_in, _), act = self._stacked(e, x_ND.dtype)
            act_fn = ACTIVATIONS[act][0] if isinstance(act, str) else act
            if w_gate is not None:
                return act_fn(x_ND @ w_gate) * (x_ND @ w_in)
            return act_fn(x_ND @ w_in if b_in is None else x_ND @ w_in + b_in)

        return hidden

    def expert(self, e: int) -> TokenFn:
        hidden = self.expert_hidden(e)
        if hidden is None:
            module = attribute(self.module, self._spec.experts)[e]
            return lambda x_ND: first_tensor(module(x_ND))

        def expert(x_ND: Tensor) -> Tensor:
            w_out, b_out = (self._stacked(e, x_ND.dtype)[0][i] for i in (1, 4))
            return hidden(x_ND) @ w_out if b_out is None else hidden(x_ND) @ w_out + b_out

        return expert

    def _closed_form(self, e: int, x_ND: Tensor, mlp_fn, swiglu_fn):
        stacked = self._stacked(e, x_ND.dtype)
        if stacked is None:
            return None
        (w_in, w_out, w_gate, b_in, _), act = stacked  # the output bias does not enter the Jacobian
        if w_gate is None:
            return mlp_fn(x_ND, w_in, b_in, w_out, act)
        silu = act == "silu" or isinstance(act, nn.SiLU)
        return swiglu_fn(x_ND, w_gate, w_in, w_out) if silu else None

    def expert_jacobian(self, e: int, x: Tensor) -> Tensor | None:
        return self._closed_form(e, x, mlp_expert_jacobian, swiglu_expert_jacobian)

    def expert_jacobian_operator(self, e: int, x: Tensor):
        return self._closed_form(e, x, mlp_jacobian_operator, swiglu_jacobian_operator)

    def expert_weights(self, e: int) -> dict[str, Tensor] | None:
        """Stacked experts' matrices in their declared dtype: ``w_gate``, ``w_up`` (the declared ``w_in``) and
        ``w_out`` of a gated expert, else ``w_in`` and ``w_out``; None for experts kept as a list of modules."""
        experts = self._spec.experts
        if not isinstance(experts, StackedExperts):
            return None
        dtype = attribute(self.module, experts.w_in).dtype
        w_in, w_out, w_gate, _, _ = self._stacked(e, dtype)[0]
        if w_gate is None:
            return {"w_in": w_in, "w_out": w_out}
        return {"w_gate": w_gate, "w_up": w_in, "w_out": w_out}

    def selection_bias(self) -> Tensor | None:
        return None if self._spec.selection_bias is None else attribute(self.module, self._spec.selection_bias)

    def __repr__(self) -> str:
        return f"DeclaredView(name={self.name!r}, num_experts={self.num_experts})"


class DeclaredSharedView:
    """The shared experts of a declared layer: one expert run on every token, gate 1, ``sigmoid(shared_gate(x))``
    or what a ``shared_gate`` function returns."""

    num_experts = 1

    def __init__(self, name: str, module: nn.Module, spec: Declaration) -> None:
        self.name, self.module, self._spec = name, module, spec

    def gates(self, x: Tensor) -> Tensor:
        shared_gate = self._spec.shared_gate
        if shared_gate is None:
            return torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        with preserved_rng():  # as DeclaredView.gates
            if callable(shared_gate):
                return shared_gate(self.module, x).to(x.dtype)
            return first_tensor(attribute(self.module, shared_gate)(x)).sigmoid().to(x.dtype)

    def expert(self, e: int) -> TokenFn:
        if e != 0:
            raise ValueError(f"{self.name}: expert index e={e} is out of range; allowed 0..0")
        shared = attribute(self.module, self._spec.shared_experts)
        return lambda x_ND: first_tensor(shared(x_ND))

    def expert_hidden(self, e: int) -> TokenFn | None:
        return None

    def expert_jacobian(self, e: int, x: Tensor) -> Tensor | None:
        return None

    def __repr__(self) -> str:
        return f"DeclaredSharedView(name={self.name!r})"


def _declared(module: nn.Module) -> Declaration | None:
    names = {cls.__name__ for cls in type(module).__mro__}
    for layer, structure, spec in _DECLARED:
        is_it = layer in names if isinstance(layer, str) else isinstance(module, layer)
        if is_it and (structure is None or structure(module)):
            return spec
    return None


def _views(name: str, module: nn.Module) -> list[MoEView]:
    spec = _declared(module)
    assert spec is not None, "the matcher only accepts declared layers"
    reason = spec.refuse(module) if spec.refuse is not None else None
    if reason:
        raise BlockNotViewable(reason)
    try:
        views: list[MoEView] = [DeclaredView(name, module, spec)]
        if spec.shared_experts is not None and attribute(module, spec.shared_experts) is not None:
            views.append(DeclaredSharedView(f"{name}.shared_experts" if name else "shared_experts", module, spec))
    except (AttributeError, IndexError, TypeError) as error:
        raise BlockNotViewable(f"its declaration does not fit it: {type(error).__name__}: {error}") from error
    return views


def register_moe(
    layer: type[nn.Module] | str,
    *,
    experts: str | StackedExperts,
    router: str | RouterOutput | None = None,
    gates: Gates | None = None,
    top_k: int | str | None = None,
    score: Literal["softmax", "sigmoid"] = "softmax",
    renormalize: bool | str = False,
    route_scale: float | str = 1.0,
    selection_bias: str | None = None,
    shared_experts: str | None = None,
    shared_gate: str | Gates | None = None,
    structure: Callable[[nn.Module], bool] | None = None,
    refuse: Callable[[nn.Module], str | None] | None = None,
    builtin: bool = False,
) -> None:
    """Make :func:`find_moe_layers` view every instance of an MoE layer from where it keeps its parts.

    Every path is an attribute path inside the layer; every setting given as a string is read from the layer.
    The view is checked against the layer's own output before any value of it is logged
    (:func:`~moe_lightning.geometry.verify_view`), so a declaration that does not fit is refused, not trusted.

    Args:
        layer: the layer's class, or its class name (matched without importing its library).
        experts: a module list of experts, each ``(N, D) -> (N, D)`` (a tuple output's first tensor is taken), or
            :class:`StackedExperts`.
        router: a router module returning logits ``(N, E)`` (then ``top_k``, ``score``, ``renormalize``,
            ``route_scale`` and ``selection_bias`` say how it routes), or a :class:`RouterOutput` for a router
            that returns its own gates.
        gates: instead of ``router``, ``gates(layer, x_ND) -> (N, E)``, 0 where a token is not routed.
        top_k: experts per token (an int or the attribute that holds it); None routes to every expert (soft).
        score: ``"softmax"`` over all experts, or ``"sigmoid"`` per expert.
        renormalize: renormalise the top-k weights to sum to 1 (a bool or the attribute that holds it).
        route_scale: a factor on the gates (DeepSeek-V3's ``routed_scaling_factor``).
        selection_bias: an ``(E,)`` tensor added to the scores to choose the experts but not to weight them
            (auxiliary-loss-free balancing); RouterMonitor logs it too.
        shared_experts: a module every token runs through (gate 1, or as ``shared_gate`` says), viewed as
            ``<layer>.shared_experts``.
        shared_gate: a module ``(N, D) -> (N, 1)`` whose sigmoid gates the shared experts, or a function
            ``shared_gate(layer, x_ND) -> (N, 1)`` that gives their gate (DeepSpeed's Residual MoE: a softmax share).
        structure: where a class name is not enough, ``structure(module)`` must be true too.
        refuse: ``refuse(module)`` returns why a layer cannot be viewed exactly (then it is skipped with that
            reason, see :func:`scan_moe_layers`), or None.
        builtin: match after the declarations users make (the built-in adapters use it).

    Raises:
        ValueError: neither or both of ``router`` and ``gates``, an unknown ``score``, or a bad ``top_k``.
    """
    if (router is None) == (gates is None):
        raise ValueError("register_moe: give router= (a module path or RouterOutput) or gates= (a function), one")
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f"register_moe: score={score!r} is not allowed; allowed 'softmax', 'sigmoid'")
    if isinstance(top_k, bool) or (isinstance(top_k, int) and top_k < 1):
        raise ValueError(f"register_moe: top_k={top_k!r} is not allowed; expected an int >= 1, a path or None")
    if not isinstance(layer, str) and not (isinstance(layer, type) and issubclass(layer, nn.Module)):
        raise ValueError(f"register_moe: layer={layer!r} is not allowed; expected an nn.Module class or a class name")
    if isinstance(router, RouterOutput):
        read: Callable[[nn.Module, Tensor, int], Tensor] = router.gates
    elif router is not None:
        read = logit_gates(router, top_k, score, renormalize, route_scale, selection_bias)
    else:
        read = lambda block, x_ND, num_experts: gates(block, x_ND)  # noqa: E731
    spec = Declaration(experts, read, selection_bias, shared_experts, shared_gate, refuse)
    _DECLARED[:] = [entry for entry in _DECLARED if entry[0] != layer or entry[1] is not structure]
    _DECLARED.insert(len(_DECLARED) if builtin else 0, (layer, structure, spec))
    if ADAPTER_NAME not in registered_adapters():
        register_adapter(ADAPTER_NAME, lambda module: _declared(module) is not None, _views, first=True)

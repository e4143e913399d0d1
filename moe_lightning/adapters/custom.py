"""Register a user's own MoE layer class with :func:`find_moe_layers` from a few attribute-level callables.

Shape legend: ``N`` tokens, ``E`` experts, ``D`` model dim, ``H`` expert hidden width.

For a one-off layer, build a :class:`CallableView` directly. For a layer class that appears many times in a model,
:func:`register_moe_class` teaches :func:`find_moe_layers` to find every instance:

Example:
    >>> import torch
    >>> from torch import nn
    >>> from moe_lightning.adapters import find_moe_layers
    >>> class SoftMoE(nn.Module):
    ...     def __init__(self, dim=4, num_experts=3):
    ...         super().__init__()
    ...         self.router = nn.Linear(dim, num_experts)
    ...         self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_experts))
    ...     def forward(self, x):
    ...         g = self.router(x).softmax(-1)
    ...         return sum(g[:, e : e + 1] * f(x) for e, f in enumerate(self.experts))
    >>> register_moe_class(
    ...     SoftMoE,
    ...     gates=lambda m, x: m.router(x).softmax(-1),
    ...     expert=lambda m, e, x: m.experts[e](x),
    ...     num_experts=lambda m: len(m.experts),
    ... )
    >>> [(v.name, v.num_experts) for v in find_moe_layers(nn.Sequential(SoftMoE(), nn.ReLU(), SoftMoE()))]
    [('0', 3), ('2', 3)]
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from moe_lightning.adapters.base import CallableView
from moe_lightning.adapters.registry import register_adapter, registered_adapters
from moe_lightning.geometry import MoEView

GatesFn = Callable[[nn.Module, Tensor], Tensor]  # (module, x (N, D)) -> (N, E)
ExpertFn = Callable[[nn.Module, int, Tensor], Tensor]  # (module, e, x (N, D)) -> (N, D), (N, H) or (N, D, D)

ADAPTER_NAME = "custom"


@dataclass(frozen=True)
class _ClassSpec:
    gates: GatesFn
    expert: ExpertFn
    num_experts: int | Callable[[nn.Module], int]
    expert_hidden: ExpertFn | None
    expert_jacobian: ExpertFn | None
    expert_jacobian_operator: ExpertFn | None = None


# Registered classes; one adapter ("custom") serves them all and reads this table at match time, so registering a
# class again replaces its callables instead of stacking a second adapter.
_SPECS: dict[type[nn.Module], _ClassSpec] = {}


def _spec_for(module: nn.Module) -> _ClassSpec | None:
    """The spec of the nearest registered class in ``module``'s MRO, so subclasses inherit a registration."""
    for cls in type(module).__mro__:
        if cls in _SPECS:
            return _SPECS[cls]
    return None


def _build_views(path: str, module: nn.Module) -> list[MoEView]:
    spec = _spec_for(module)
    assert spec is not None, "the matcher only accepts registered classes"
    num_experts = spec.num_experts(module) if callable(spec.num_experts) else spec.num_experts
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"{path}: num_experts={num_experts!r} for {type(module).__name__}; allowed an int >= 1")

    def per_expert(fn: ExpertFn | None) -> list[Callable[[Tensor], Tensor]] | None:
        return None if fn is None else [functools.partial(fn, module, e) for e in range(num_experts)]

    return [
        CallableView(
            name=path,
            module=module,
            gates_fn=functools.partial(spec.gates, module),
            expert_fns=per_expert(spec.expert),
            hidden_fns=per_expert(spec.expert_hidden),
            jacobian_fns=per_expert(spec.expert_jacobian),
            operator_fns=per_expert(spec.expert_jacobian_operator),
        )
    ]


def register_moe_class(
    cls: type[nn.Module],
    *,
    gates: GatesFn,
    expert: ExpertFn,
    num_experts: int | Callable[[nn.Module], int],
    expert_hidden: ExpertFn | None = None,
    expert_jacobian: ExpertFn | None = None,
    expert_jacobian_operator: ExpertFn | None = None,
) -> None:
    """Make :func:`find_moe_layers` report every instance of ``cls`` (and of its subclasses) as an MoE layer.

    The callables receive the layer instance, so one registration serves every layer of the model. They must
    be pure functions of ``x`` (no in-place ops on it, no ``.item()``, no data-dependent Python branches) if the
    geometry probes are to differentiate through them with ``torch.func``. Registered classes are matched before
    the built-in adapters, so a registration also overrides them. Registering ``cls`` again replaces its callables.

    Args:
        cls: the user's MoE layer class (an ``nn.Module`` subclass).
        gates: ``gates(module, x_ND) -> (N, E)`` gate weights, 0 where a token is not routed.
        expert: ``expert(module, e, x_ND) -> (N, D)``, expert ``e`` without its gate weight.
        num_experts: ``E``, or ``num_experts(module) -> E`` when it differs between instances.
        expert_hidden: optional ``expert_hidden(module, e, x_ND) -> (N, H)``, the activation after the
            nonlinearity.
        expert_jacobian: optional ``expert_jacobian(module, e, x_ND) -> (N, D, D)``, a closed-form Jacobian.
        expert_jacobian_operator: optional ``expert_jacobian_operator(module, e, x_ND) -> JacobianOperator``, the
            closed-form products ``J V`` / ``Jᵀ U`` used by the matrix-free spectra of wide layers (e.g.
            ``moe_lightning.geometry.swiglu_jacobian_operator`` on the expert's weights).

    Raises:
        ValueError: ``cls`` is not an ``nn.Module`` subclass, a callable is not callable, or ``num_experts`` is
            not a positive int or a callable.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"register_moe_class: cls={cls!r} is not allowed; expected an nn.Module subclass")
    for label, fn, optional in (
        ("gates", gates, False),
        ("expert", expert, False),
        ("expert_hidden", expert_hidden, True),
        ("expert_jacobian", expert_jacobian, True),
        ("expert_jacobian_operator", expert_jacobian_operator, True),
    ):
        if not (callable(fn) or (optional and fn is None)):
            raise ValueError(
                f"register_moe_class: {label}={fn!r} is not allowed; expected a callable"
                + (" or None" if optional else "")
            )
    if not callable(num_experts) and not (
        isinstance(num_experts, int) and not isinstance(num_experts, bool) and num_experts >= 1
    ):
        raise ValueError(
            f"register_moe_class: num_experts={num_experts!r} is not allowed; expected an int >= 1 or a callable"
        )
    _SPECS[cls] = _ClassSpec(gates, expert, num_experts, expert_hidden, expert_jacobian, expert_jacobian_operator)
    if ADAPTER_NAME not in registered_adapters():
        register_adapter(ADAPTER_NAME, lambda module: _spec_for(module) is not None, _build_views, first=True)

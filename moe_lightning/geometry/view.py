"""The ``MoEView`` protocol: the one way geometry code sees an MoE layer (docs/design.md; the quantities it feeds
are defined in docs/geometry.md §1–5).

Shape legend: ``N`` tokens, ``E`` experts, ``D`` model dim, ``H`` expert hidden width.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from moe_lightning.geometry.operators import JacobianOperator

__all__ = [
    "VIEW_MEMBERS",
    "CastsOnRead",
    "ExpertPlacement",
    "HasExpertWeights",
    "HasJacobianOperator",
    "HasPlacement",
    "MoEView",
    "TokenFn",
    "check_view",
]

#: A row-wise function of tokens, ``(N, D_in) -> (N, D_out)``.
TokenFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ExpertPlacement:
    """Where a layer's experts live when expert parallelism splits them over ranks: what a view's optional
    ``placement()`` returns (None for a layer whose experts every rank holds).

    Attributes:
        group: the process group whose ranks hold the experts between them.
        local_experts: the experts (global indices) this rank holds.
        gather_all: a context manager factory; while its context lasts every expert's weights are on this rank (a
            collective every rank of ``group`` enters), for quantities that need the whole layer on one rank.
    """

    group: Any
    local_experts: range
    gather_all: Callable[[], AbstractContextManager[None]]


@runtime_checkable
class MoEView(Protocol):
    """What the geometry probes need to know about one MoE layer.

    Attributes:
        name: module path in the model, e.g. ``"blocks.0.ffn"``.
        module: the MoE block itself; forward hooks on it capture its input.
        num_experts: number of experts ``E``; 1 for a dense FFN baseline.

    Every member is required (:func:`check_view` names the missing ones); ``expert_hidden`` and
    ``expert_jacobian`` return None where the view does not know them. Four members are optional, each a
    protocol of its own, checked with ``isinstance``:

    - :class:`HasJacobianOperator`, ``expert_jacobian_operator(e, x)``: closed-form Jacobian products for the
      matrix-free spectra;
    - :class:`HasExpertWeights`, ``expert_weights(e)``: the expert's weight matrices, for the data-free weight
      spectra;
    - :class:`HasPlacement`, ``placement()``: where the experts live under expert parallelism;
    - :class:`CastsOnRead`, ``casts_weights_on_read()``: the functions cast what they read to their input's dtype,
      so a probe lends no cast copy of the layer.
    """

    name: str
    module: nn.Module
    num_experts: int

    def gates(self, x: Tensor) -> Tensor:
        """(N, D) -> (N, E) gate weights, 0 where a token is not routed to an expert."""
        ...

    def expert(self, e: int) -> TokenFn:
        """Expert ``e`` as a function (N, D) -> (N, D)."""
        ...

    def expert_hidden(self, e: int) -> TokenFn | None:
        """Expert ``e``'s inner activation (N, D) -> (N, H) after the nonlinearity, or None if unknown."""
        ...

    def expert_jacobian(self, e: int, x: Tensor) -> Tensor | None:
        """Closed-form Jacobian of expert ``e`` at each token, (N, D) -> (N, D, D), or None if unknown."""
        ...


@runtime_checkable
class HasJacobianOperator(Protocol):
    """An :class:`MoEView` that offers its experts' closed-form Jacobian products.

    The probe's matrix-free spectra (``D > ProbeConfig.matrix_free_threshold``) use them when offered, else
    ``torch.func``. Our layers and the Hugging Face adapters offer them.
    """

    def expert_jacobian_operator(self, e: int, x: Tensor) -> JacobianOperator | None:
        """The products ``J V`` / ``Jᵀ U`` of expert ``e`` at each token of ``x`` (N, D) without forming ``J``
        (``moe_lightning.geometry.swiglu_jacobian_operator``, ``mlp_jacobian_operator``), or None if unknown."""
        ...


@runtime_checkable
class HasExpertWeights(Protocol):
    """An :class:`MoEView` that offers its experts' weight matrices, for the data-free weight spectra
    (:func:`moe_lightning.geometry.weight_spectra.layer_weight_spectra`, docs/geometry.md §8).

    Our layers, the Hugging Face adapters and declared layers with stacked experts offer them.
    """

    def expert_weights(self, e: int) -> dict[str, Tensor] | None:
        """Expert ``e``'s 2-D weight matrices by role: ``w_gate``, ``w_up`` and ``w_out`` for a gated (GLU) expert,
        ``w_in`` and ``w_out`` for a plain MLP (``w_gate_up`` where a fused gate's halves are not known), as the
        module holds them (views, not copies, in any layout: callers must not write them); None if unknown. Under
        expert parallelism ``e`` must be one of this rank's experts."""
        ...


def stored_weights_dtype(view: object, e: int) -> torch.dtype | None:
    """The floating dtype expert ``e``'s weights are stored in, where the view offers them
    (:class:`HasExpertWeights`) all in one such dtype; None otherwise."""
    weights = view.expert_weights(e) if isinstance(view, HasExpertWeights) else None
    dtypes = {w.dtype for w in weights.values()} if weights else set()
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)).is_floating_point else None


@runtime_checkable
class CastsOnRead(Protocol):
    """An :class:`MoEView` whose functions read each weight they use cast to the dtype of their input, one expert's
    weights per call (a copy that lives for the call), so that a probe in float64 on a float32 model needs no
    cast copy of the whole layer (``ProbeConfig.cast_module``,
    :func:`~moe_lightning.geometry.lending.with_cast_copies`).

    Our layers' views and the Hugging Face adapters' views read their weights so.
    """

    def casts_weights_on_read(self) -> bool:
        """Whether every function of the view (``gates``, ``expert``, ``expert_hidden``, ``expert_jacobian`` and
        ``expert_jacobian_operator``) casts what it reads of the module to its input's dtype."""
        ...


@runtime_checkable
class HasPlacement(Protocol):
    """An :class:`MoEView` that says where its experts live under expert parallelism.

    A view without ``placement()``, or whose ``placement()`` is None, shows experts that every rank holds; the
    monitors probe it as under DDP.
    """

    def placement(self) -> ExpertPlacement | None:
        """The expert group, this rank's experts and a context that gathers them all; None if every rank holds
        every expert."""
        ...


# MoEView's members, for the error message: runtime_checkable protocols name only whether an object conforms, and
# Python 3.11 has no public list of a protocol's members (tests check this one against the protocol).
VIEW_MEMBERS = ("name", "module", "num_experts", "gates", "expert", "expert_hidden", "expert_jacobian")


def check_view(view: object, caller: str) -> MoEView:
    """``view``, checked to have every :class:`MoEView` member.

    Args:
        view: the object given as a view.
        caller: the function that received it, named in the error.

    Returns:
        ``view``.

    Raises:
        ValueError: naming the members ``view`` lacks.
    """
    if isinstance(view, MoEView):
        return view
    missing = [member for member in VIEW_MEMBERS if not hasattr(view, member)]
    raise ValueError(
        f"{caller}: view {type(view).__name__} lacks the MoEView member(s) {', '.join(missing)}; an MoEView has "
        f"{', '.join(VIEW_MEMBERS)} (expert_hidden and expert_jacobian may return None)"
    )

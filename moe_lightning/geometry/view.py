"""The ``MoEView`` protocol: the one way geometry code sees an MoE layer (docs/design.md; the quantities it feeds
are defined in docs/geometry.md §1–5).

Shape legend: ``N`` tokens, ``E`` experts, ``D`` model dim, ``H`` expert hidden width.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["ExpertPlacement", "MoEView", "TokenFn"]

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

    Optional, outside the protocol (checked with ``hasattr``):

    - ``expert_jacobian_operator(e, x) -> JacobianOperator | None``, the closed-form products ``J V`` / ``Jᵀ U`` of
      expert ``e`` without forming ``J`` (``moe_lightning.geometry.swiglu_jacobian_operator``,
      ``mlp_jacobian_operator``). The probe's matrix-free spectra (``D > ProbeConfig.matrix_free_threshold``) use it
      when offered, else ``torch.func``. Our layers and the Hugging Face adapters offer it.
    - ``placement() -> ExpertPlacement | None``: where the experts live under expert parallelism. Without it (or
      with None) every rank holds every expert the view shows, and the monitors probe it as under DDP.
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

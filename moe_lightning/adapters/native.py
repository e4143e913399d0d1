"""The MoEViews of moe-lightning's native layers, :class:`MoELayer` (its routed experts, and its shared experts as a
view of their own) and the :class:`DenseFFN` baseline, with the closed-form MLP and SwiGLU expert Jacobians."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from moe_lightning.distributed.expert_parallel import gather_experts
from moe_lightning.geometry import (
    mlp_expert_jacobian,
    mlp_jacobian_operator,
    swiglu_expert_jacobian,
    swiglu_jacobian_operator,
)
from moe_lightning.geometry.view import ExpertPlacement, TokenFn
from moe_lightning.nn.layer import DenseFFN, MoELayer


class NativeMoEView:
    """View of a :class:`MoELayer` or a :class:`DenseFFN` (one expert, gate 1 for every token)."""

    def __init__(self, name: str, module: MoELayer | DenseFFN) -> None:
        self.name, self.module = name, module
        self.ffn: MoELayer | DenseFFN = module  # whose experts and weights this view shows
        self.num_experts = module.num_experts

    def gates(self, x: Tensor) -> Tensor:
        if isinstance(self.ffn, DenseFFN):
            return torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
        return self.module.router.gates(x).to(x.dtype)

    def expert(self, e: int) -> TokenFn:
        return partial(self.ffn.expert_fn, e)

    def expert_hidden(self, e: int) -> TokenFn | None:
        return partial(self.ffn.expert_hidden_fn, e)

    def _closed_form(self, e: int, x: Tensor, swiglu_fn, mlp_fn):
        """``swiglu_fn(x, w_gate, w_up, w_out)`` or ``mlp_fn(x, w_in, None, w_out, activation)`` on expert ``e``'s
        weights cast to ``x``'s dtype (the probe may run in float64 on a float32 model)."""
        ffn, activation = self.ffn, self.ffn.activation
        # this rank's experts (all of them but under expert parallelism)
        (w_in, w_out), e = ffn.local_weights(), ffn.local_index(e)
        w_in, w_out = w_in[e].to(x.dtype), w_out[e].to(x.dtype)
        if activation == "swiglu":
            w_gate, w_up = w_in.chunk(2, dim=-1)
            return swiglu_fn(x, w_gate, w_up, w_out)
        return mlp_fn(x, w_in, None, w_out, activation)

    def expert_jacobian(self, e: int, x: Tensor) -> Tensor | None:
        return self._closed_form(e, x, swiglu_expert_jacobian, mlp_expert_jacobian)

    def expert_jacobian_operator(self, e: int, x: Tensor):
        """Closed-form products ``J V`` / ``Jᵀ U`` of expert ``e`` at each token, for the matrix-free spectra."""
        return self._closed_form(e, x, swiglu_jacobian_operator, mlp_jacobian_operator)

    def expert_weights(self, e: int) -> dict[str, Tensor]:
        """Expert ``e``'s matrices (views of the parameters, not copies): ``w_gate`` ``(D, H)``, ``w_up`` ``(D, H)``
        and ``w_out`` ``(H, D)`` for SwiGLU, else ``w_in`` ``(D, H)`` and ``w_out``; ``e`` one of this rank's
        experts."""
        ffn = self.ffn
        (w_in, w_out), e = ffn.local_weights(), ffn.local_index(e)
        if ffn.activation == "swiglu":
            w_gate, w_up = w_in[e].chunk(2, dim=-1)
            return {"w_gate": w_gate, "w_up": w_up, "w_out": w_out[e]}
        return {"w_in": w_in[e], "w_out": w_out[e]}

    def casts_weights_on_read(self) -> bool:
        """True: the router (``router.gates``) and the experts (``expert_fn``, ``expert_hidden_fn`` and the closed
        forms) cast what they read to the input's dtype, one expert's slice per call."""
        return True

    def placement(self) -> ExpertPlacement | None:
        """Where this view's experts live: the layer's expert group under expert parallelism, else None. A view of
        the shared experts (every rank holds them whole) has none, though its module is the layer too."""
        layer = self.module
        if not isinstance(layer, MoELayer) or layer.expert_parallel_size == 1 or self.ffn is not layer:
            return None
        return ExpertPlacement(layer.expert_group, layer.local_experts, partial(gather_experts, layer))

    def __repr__(self) -> str:
        return f"NativeMoEView(name={self.name!r}, num_experts={self.num_experts})"


class NativeSharedExpertView(NativeMoEView):
    """View of an :class:`MoELayer`'s always-on shared experts: one expert (their concatenated FFN), gate 1.

    ``module`` is the whole block, so the probes capture the input the shared and routed experts both read; the
    routed view and this one sum to the block's output.
    """

    def __init__(self, name: str, module: MoELayer) -> None:
        super().__init__(name, module)
        self.ffn, self.num_experts = module.shared_experts, 1

    def __repr__(self) -> str:
        return f"NativeSharedExpertView(name={self.name!r})"


def is_native(module: nn.Module) -> bool:
    """Whether ``module`` is one of moe-lightning's own MoE blocks."""
    return isinstance(module, (MoELayer, DenseFFN))


def native_views(name: str, module: nn.Module) -> list[NativeMoEView]:
    """The view of a native block, and ``<name>.shared_experts`` when it has shared experts (as for Qwen2-MoE)."""
    views = [NativeMoEView(name, module)]
    if isinstance(module, MoELayer) and module.shared_experts is not None:
        views.append(NativeSharedExpertView(f"{name}.shared_experts" if name else "shared_experts", module))
    return views

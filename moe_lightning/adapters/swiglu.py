"""What the Hugging Face adapters share (:mod:`~moe_lightning.adapters.hf` and
:mod:`~moe_lightning.adapters.hf_experts`): telling a SiLU, an expert index check, the SwiGLU inner activation, and
the closed-form Jacobians of a view whose experts are plain SwiGLUs (docs/geometry.md §1).

Shape legend: ``N`` tokens, ``D`` model dim, ``H`` expert hidden.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from moe_lightning.geometry import JacobianOperator, swiglu_expert_jacobian, swiglu_jacobian_operator
from moe_lightning.geometry.lending import with_cast_copies

__all__ = ["SwigluClosedForms", "check_expert_index", "is_silu", "swiglu_hidden"]


def is_silu(act: object) -> bool:
    """True for the activations ``transformers`` maps ``"silu"``/``"swish"`` to (``ACT2FN``)."""
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" or act is F.silu


def check_expert_index(name: str, e: int, num_experts: int) -> None:
    """``e`` must address one of the view's ``num_experts`` experts (``ValueError`` naming the view otherwise)."""
    if not 0 <= e < num_experts:
        raise ValueError(f"{name}: expert index e={e} is out of range; allowed 0..{num_experts - 1}")


def swiglu_hidden(x_ND: Tensor, w_gate_HD: Tensor, w_up_HD: Tensor, act: Callable[[Tensor], Tensor]) -> Tensor:
    """``act(x W_gate^T) * (x W_up^T)`` on ``nn.Linear``-layout weights, (N, D) -> (N, H): the input of the down
    projection. The weights are cast to the dtype of the tokens, and an activation module with floating tensors of
    its own (a learned activation) reads them cast too, lent for the call: the probe may run in float64 on a float32
    model without a cast copy of the layer."""
    gate_NH = F.linear(x_ND, w_gate_HD.to(x_ND.dtype))
    if isinstance(act, nn.Module):
        activated_NH = with_cast_copies(act, x_ND.dtype, lambda: act(gate_NH))
    else:
        activated_NH = act(gate_NH)
    return activated_NH * F.linear(x_ND, w_up_HD.to(x_ND.dtype))


class SwigluClosedForms:
    """Closed forms of a view whose experts are plain SwiGLUs, from ``_swiglu_weights(e)``:
    ``(w_gate (D, H), w_up (D, H), w_down (H, D))`` in the right-multiplied layout of docs/geometry.md §1, or None
    where expert ``e`` is not one. Weights are cast to the dtype of the tokens (the probe may run in float64 on a
    float32 model)."""

    def _swiglu_weights(self, e: int) -> tuple[Tensor, Tensor, Tensor] | None:
        raise NotImplementedError

    def _closed_form(self, e: int, x_ND: Tensor, make):
        weights = self._swiglu_weights(e)
        if weights is None:
            return None
        return make(x_ND, *(w.to(x_ND.dtype) for w in weights))

    def expert_jacobian(self, e: int, x_ND: Tensor) -> Tensor | None:
        """Closed-form Jacobian of expert ``e`` at each token (N, D, D) for a plain SwiGLU; None otherwise, so that
        the probe uses ``torch.func``."""
        return self._closed_form(e, x_ND, swiglu_expert_jacobian)

    def expert_jacobian_operator(self, e: int, x_ND: Tensor) -> JacobianOperator | None:
        """Closed-form products ``J V`` / ``Jᵀ U`` of expert ``e`` for a plain SwiGLU (matrix-free spectra); None
        otherwise."""
        return self._closed_form(e, x_ND, swiglu_jacobian_operator)

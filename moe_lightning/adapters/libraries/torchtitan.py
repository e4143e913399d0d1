"""torchtitan's MoE layer (PyPI ``torchtitan``, ``torchtitan.models.moe.MoE``, the layer of its DeepSeek-V3, Llama 4
and Qwen3 models): a ``TokenChoiceTopKRouter`` that returns its own top-k scores and expert indices, ``GroupedExperts``
that keep stacked SwiGLU weights ``w1`` (gate) and ``w3`` (up) ``(E, H, D)`` and ``w2`` (down) ``(E, D, H)``, an
optional ``FeedForward`` of shared experts, and an ``expert_bias`` buffer for auxiliary-loss-free balancing.

The gates are what the router returns when the layer calls it, ``router(x, expert_bias)``, so the score function,
the selection bias, node-limited routing, ``route_norm`` and ``route_scale`` are the layer's own. Its default
``score_before_experts=True`` runs each expert on ``score * x``, which no gated sum of experts equals; the layer is
viewable with ``score_before_experts=False``, which weights the experts' outputs instead.
"""

from __future__ import annotations

from torch import Tensor, nn

from moe_lightning.adapters.declare import RouterOutput, StackedExperts, register_moe


def _is_token_choice_moe(module: nn.Module) -> bool:
    router, experts = getattr(module, "router", None), getattr(module, "experts", None)
    w1 = getattr(experts, "w1", None)
    return (
        type(router).__name__ == "TokenChoiceTopKRouter"
        # gpt-oss keeps biased, clamped experts of another class (GptOssGroupedExperts)
        and type(experts).__name__ == "GroupedExperts"
        # DeepEPMoE drops the reorderer and combines in its expert-parallel hooks, not in forward
        and type(getattr(module, "reorderer", None)).__name__ == "TokenReorderer"
        and isinstance(w1, Tensor)
        and w1.dim() == 3
    )


def _unviewable_setting(module: nn.Module) -> str | None:
    if module.score_before_experts:
        return (
            "score_before_experts=True runs each expert on score * x, so the layer's output is no gated sum of its "
            "experts; build it with MoEArgs(score_before_experts=False), which weights the experts' outputs"
        )
    if getattr(module.router, "_debug_force_load_balance", False):
        return (
            "_debug_force_load_balance=True routes tokens round-robin by their position in the batch, not by the "
            "router; build it with MoEArgs(_debug_force_load_balance=False)"
        )
    return None


register_moe(
    "MoE",
    structure=_is_token_choice_moe,
    router=RouterOutput("router", weights=0, indices=1, args=("expert_bias",)),
    experts=StackedExperts(w_in="experts.w3", w_out="experts.w2", w_gate="experts.w1", layout="out_in"),
    selection_bias="expert_bias",
    shared_experts="shared_experts",
    refuse=_unviewable_setting,
    builtin=True,
)

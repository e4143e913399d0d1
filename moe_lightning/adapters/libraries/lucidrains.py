"""lucidrains' ``mixture-of-experts`` (PyPI ``mixture-of-experts``, ``mixture_of_experts.MoE``): a GShard-style
top-2 layer whose ``Top2Gating`` returns a combine tensor ``(B, N, E, C)`` and whose ``Experts`` keep stacked
weights ``w1 (E, D, H)``, ``w2 (E, H, D)`` with one activation module ``act``.

The gates are the router's own combine tensor summed over its capacity slots, so capacity drops and the second-expert
policy are the layer's. Its default ``second_policy_eval="random"`` draws the second expert at random, which the view
check refuses (determinism); ``"all"``, ``"none"`` or ``"threshold"`` are deterministic.
"""

from __future__ import annotations

from torch import nn

from moe_lightning.adapters.declare import RouterOutput, StackedExperts, register_moe


def _is_gshard_top2(module: nn.Module) -> bool:
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    w1 = getattr(experts, "w1", None)
    return (
        type(gate).__name__ == "Top2Gating"
        and type(experts).__name__ == "Experts"
        and isinstance(w1, nn.Parameter)
        and w1.dim() == 3  # one expert axis; the hierarchical HeirarchicalMoE keeps two
    )


def _random_second_expert(module: nn.Module) -> str | None:
    if module.gate.second_policy_eval == "random":
        return (
            "second_policy_eval='random' draws each token's second expert at random, so no view can reconstruct "
            "the layer; build it with second_policy_eval='all', 'none' or 'threshold'"
        )
    return None


register_moe(
    "MoE",
    structure=_is_gshard_top2,
    router=RouterOutput("gate", combine=1, batched=True),
    experts=StackedExperts(w_in="experts.w1", w_out="experts.w2", layout="in_out", activation="experts.act"),
    refuse=_random_second_expert,
    builtin=True,
)

"""lucidrains' ``st-moe-pytorch`` (PyPI ``st-moe-pytorch``, ``st_moe_pytorch.MoE``): an ST-MoE top-n layer whose
``TopNGating`` returns a combine tensor ``(B, N, E, C)`` and whose ``Experts`` hold a module list of GEGLU ``Expert``
modules.

The gates are the router's own combine tensor summed over its capacity slots, so the top-n normalisation, the
threshold policy and capacity drops are the layer's own; the experts are the layer's own modules. ``SparseMoEBlock``
(norm, MoE, residual, optional feedforwards) is not an MoE layer itself: its inner ``moe`` is the layer matched.

The gate routes a token to its second to n-th expert with probability ``min(1, gate / threshold)``, a uniform draw
made in eval mode too: only ``threshold_eval`` 0 (every top-n expert; a gate under the gate's ``eps``, 1e-9, is still
drawn) or ``inf`` (the first expert only) is deterministic. Capacity drops couple the tokens of a sequence; the view
check refuses them at run time, and ``capacity_factor_eval >= num_experts`` keeps every token. ``noise_gates``, a
forward argument, is not seen: the view is the layer called without it. With ``straight_through_dispatch_tensor``
(its default) the layer's backward passes the combine weights' gradient through the dispatch weights, so autograd of
the layer is not the Jacobian of its output; the views measure the Jacobian of the output.
"""

from __future__ import annotations

import math

from torch import nn

from moe_lightning.adapters.declare import RouterOutput, register_moe


def _is_st_moe(module: nn.Module) -> bool:
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    return (
        type(gate).__name__ == "TopNGating"
        and type(experts).__name__ == "Experts"
        and isinstance(getattr(experts, "experts", None), nn.ModuleList)
    )


def _not_viewable(module: nn.Module) -> str | None:
    gate = module.gate
    thresholds = gate.threshold_eval[1:].tolist()  # the first expert's entry is eps: always routed
    if any(gate.eps < t < math.inf for t in thresholds):
        shown = ", ".join(f"{t:g}" for t in thresholds)
        shown = shown if len(thresholds) == 1 else f"({shown})"
        return (
            f"threshold_eval={shown} routes a token to its second to n-th expert at random in eval mode "
            "(probability gate / threshold); build it with threshold_eval=0. (every top-n expert) or float('inf')"
        )
    if module.experts.is_distributed:
        return (
            "its Experts are distributed (is_distributed=True, the default under torch.distributed): their forward "
            "all-gathers every rank's tokens and keeps other ranks' experts on the CPU; build it with "
            "is_distributed=False"
        )
    return None


register_moe(
    "MoE",
    structure=_is_st_moe,
    router=RouterOutput("gate", combine=1, batched=True),
    experts="experts.experts",
    refuse=_not_viewable,
    builtin=True,
)

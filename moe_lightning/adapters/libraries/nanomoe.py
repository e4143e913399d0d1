"""Cameron Wolfe's nanoMoE (github.com/wolfecameron/nanoMoE, ``model.py``; not on PyPI): a ``MOELayer`` whose
``Router`` (``w_g``, top-k softmax, capacity) returns a combine tensor ``cb_weight (B*T, E, C)`` and whose
``MLPExperts`` keep stacked GELU experts ``c_fc (E, D, 4D)``, ``c_proj (E, 4D, D)`` with optional biases
``fc_bias``, ``proj_bias``.

The gates are the router's own combine tensor summed over its capacity slots (the softmax over each token's top-k
logits, capacity drops included); the experts are the layer's stacked weights and its own ``gelu`` module.
The capacity counts all the batch's tokens, so drops couple them; the view check refuses them at run time, and
``eval_capacity >= n_exp / top_k`` keeps every token.

Refused: ``use_noisy_top_k=True``, which adds ``softplus(w_noise(x))`` times a normal draw to the logits in eval mode
too; and ``use_aux_loss`` or ``use_router_z_loss``, with which every router call appends a loss to nanoMoE's global
``MANAGER`` that the next training loss sums: the monitors' router calls would add to it (and a call under
``torch.func``, as the gate Jacobians are taken, leaves a tensor there that fails the next step).
"""

from __future__ import annotations

from torch import nn

from moe_lightning.adapters.declare import RouterOutput, StackedExperts, register_moe


def _is_nanomoe(module: nn.Module) -> bool:
    router, experts = getattr(module, "router", None), getattr(module, "experts", None)
    c_fc = getattr(experts, "c_fc", None)
    return (
        type(router).__name__ == "Router"
        and isinstance(getattr(router, "w_g", None), nn.Linear)
        and type(experts).__name__ == "MLPExperts"
        and isinstance(c_fc, nn.Parameter)
        and c_fc.dim() == 3
    )


def _not_viewable(module: nn.Module) -> str | None:
    router = module.router
    if router.use_noisy_top_k:
        return (
            "use_noisy_top_k=True adds softplus(w_noise(x)) times a normal draw to the router's logits in eval mode "
            "too, so no view can reconstruct the layer; build it with use_noisy_top_k=False"
        )
    if router.use_aux_loss or router.use_router_z_loss:
        return (
            f"use_aux_loss={router.use_aux_loss}, use_router_z_loss={router.use_router_z_loss}: every router call "
            "appends its losses to nanoMoE's global MANAGER, which the next training loss sums, so the monitors' "
            "router calls would change training; build it with both False (add the losses outside the router)"
        )
    return None


register_moe(
    "MOELayer",
    structure=_is_nanomoe,
    router=RouterOutput("router", combine=1, batched=True),
    experts=StackedExperts(
        w_in="experts.c_fc",
        w_out="experts.c_proj",
        b_in="experts.fc_bias",
        b_out="experts.proj_bias",
        layout="in_out",
        activation="experts.gelu",
    ),
    refuse=_not_viewable,
    builtin=True,
)

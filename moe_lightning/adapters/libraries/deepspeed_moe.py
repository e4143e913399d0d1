"""DeepSpeed's MoE layer (``deepspeed.moe.layer.MoE``): a GShard/Switch layer whose ``deepspeed_moe`` (a ``MOELayer``)
keeps a ``TopKGate`` (``wg``; top-1, top-2 or top-k over a softmax) and ``Experts``, the module list
``deepspeed_experts`` of copies of the user's expert module (an expert may return a tuple; its first tensor counts).

Shape legend: ``N`` tokens, ``E`` experts, ``C`` capacity slots.

The gates are the gate's own combine tensor ``(N, E, C)`` summed over its capacity slots, so the top-k, the
renormalisation (top-2 and top-k; top-1 keeps the softmax probability) and any capacity drop are the layer's. The
outer ``MoE`` is matched, so the walk never reaches the inner ``MOELayer`` on its own. A Residual MoE
(``use_residual=True``, arXiv:2201.05596: ``moe(x) c_0 + mlp(x) c_1`` with ``c = softmax(coefficient(x))``) is that sum
exactly: routed experts gated ``c_0 g_e`` and the ``mlp`` as a shared expert gated ``c_1``.

Noise the gate adds in training only (``noisy_gate_policy`` ``'Jitter'``, ``'RSample'``) leaves the eval map the
probes measure alone. Random token selection (``use_rts``, on by default) draws in eval too, but only picks which
tokens an over-full expert drops, and the settings accepted here drop none.
"""

from __future__ import annotations

from torch import Tensor, nn

from moe_lightning.adapters.declare import RouterOutput, register_moe

# TopKGate(x_ND) returns (l_aux, combine_weights (N, E, C), dispatch_mask, exp_counts).
_GATE = RouterOutput("deepspeed_moe.gate", combine=1)
_EXPERTS = "deepspeed_moe.experts.deepspeed_experts"


def _is_deepspeed_moe(module: nn.Module) -> bool:
    inner = getattr(module, "deepspeed_moe", None)
    return (
        type(inner).__name__ == "MOELayer"
        and type(getattr(inner, "gate", None)).__name__ == "TopKGate"
        and isinstance(getattr(getattr(inner, "experts", None), "deepspeed_experts", None), nn.ModuleList)
    )


def _is_residual_moe(module: nn.Module) -> bool:
    return _is_deepspeed_moe(module) and bool(getattr(module, "use_residual", False))


def _residual_routed_gates(module: nn.Module, x_ND: Tensor) -> Tensor:
    """The gate's combine weights times the share ``c_0`` the Residual MoE gives its routed experts, ``(N, E)``."""
    return _GATE.gates(module, x_ND, module.num_experts) * module.coefficient(x_ND).softmax(-1)[:, :1]


def _residual_mlp_gate(module: nn.Module, x_ND: Tensor) -> Tensor:
    """The share ``c_1`` the Residual MoE gives its dense ``mlp``, ``(N, 1)``."""
    return module.coefficient(x_ND).softmax(-1)[:, 1:]


def _not_exact(module: nn.Module) -> str | None:
    """Why the layer has no exact per-token view (its eval map is random or couples tokens), or None."""
    gate, num_experts = module.deepspeed_moe.gate, module.num_experts
    if module.ep_size != 1:
        return (
            f"ep_size={module.ep_size} keeps num_experts/ep_size experts on each rank (expert parallelism), which "
            "this view does not gather; build it with ep_size=1"
        )
    if gate.k == 2 and gate.top2_2nd_expert_sampling:
        return (
            "top2_2nd_expert_sampling=True draws each token's second expert with Gumbel noise, in eval too, so no "
            "view can reconstruct the layer; build it with top2_2nd_expert_sampling=False"
        )
    if gate.k == 1 and gate.min_capacity > 1:
        return (
            f"k=1 with min_capacity={gate.min_capacity}: its top-1 gate rejects a call with fewer tokens than "
            "min_capacity, and the per-token probes route one token at a time; build it with min_capacity=0 or 1"
        )
    # Capacity ceil(N k cf / E) holds every token an expert can get (N) exactly when cf k >= E.
    if gate.drop_tokens and gate.eval_capacity_factor * gate.k < num_experts:
        return (
            f"drop_tokens=True with eval_capacity_factor={gate.eval_capacity_factor} (k={gate.k}, {num_experts} "
            "experts) drops the tokens over an expert's capacity, so a token's routing depends on the other tokens; "
            "build it with drop_tokens=False (or eval_capacity_factor >= num_experts / k)"
        )
    return None


# The Residual MoE first: the plain declaration's structure matches it too.
register_moe(
    "MoE",
    structure=_is_residual_moe,
    gates=_residual_routed_gates,
    experts=_EXPERTS,
    shared_experts="mlp",
    shared_gate=_residual_mlp_gate,
    refuse=_not_exact,
    builtin=True,
)
register_moe("MoE", structure=_is_deepspeed_moe, router=_GATE, experts=_EXPERTS, refuse=_not_exact, builtin=True)

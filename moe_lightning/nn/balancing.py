"""The router's auxiliary losses and load balancing, in pure torch: the Switch and DeepSeek-V3 sequence-level
balance losses, the ST-MoE z-loss, and the aux-free expert bias (its rule and its once-per-optimiser-step update).

Shape legend: ``N`` tokens, ``E`` experts, ``K`` experts per token, ``S`` sequences, ``T = N / S`` tokens each.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "bias_update",
    "load_balance_loss",
    "router_z_loss",
    "sequence_load_balance_loss",
    "update_expert_biases",
]


def load_balance_loss(probs_NE: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4-6): ``E * sum_i f_i * P_i``.

    ``f_i`` is the fraction of routed assignments that go to expert i (``tokens_per_expert_E`` may also hold
    fractional loads, e.g. gate mass for soft routing), ``P_i`` the mean router probability of expert i. With
    perfect balance (``f_i = P_i = 1/E``) the loss is exactly 1.0.
    """
    num_experts = probs_NE.shape[-1]
    fraction_E = tokens_per_expert_E.to(probs_NE.dtype) / tokens_per_expert_E.sum().clamp_min(1)
    return num_experts * (fraction_E * probs_NE.mean(dim=0)).sum()


def router_z_loss(logits_NE: Tensor) -> Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of ``logsumexp(logits)^2``."""
    return torch.logsumexp(logits_NE.float(), dim=-1).square().mean()


def sequence_load_balance_loss(probs_NE: Tensor, index_NK: Tensor, num_sequences: int) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss (Liu et al. 2024, eq. 17-20), averaged over sequences.

    Per sequence of T tokens, ``f_i = E / (K T) * #{t: token t routed to i}`` and ``P_i = mean_t p_{t,i}``, with
    ``p`` the router's normalised scores; the loss is ``sum_i f_i P_i``, 1.0 at perfect balance, like the Switch
    loss. The tokens of a sequence are contiguous rows of ``probs_NE``.
    """
    N, E = probs_NE.shape
    K = index_NK.shape[1]
    if num_sequences < 1 or N % num_sequences:
        raise ValueError(f"num_sequences must be >= 1 and divide the {N} tokens, got {num_sequences!r}")
    T = N // num_sequences
    index_SA = index_NK.reshape(num_sequences, T * K)
    counts_SE = torch.zeros(num_sequences, E, dtype=probs_NE.dtype, device=probs_NE.device)
    counts_SE = counts_SE.scatter_add(1, index_SA, torch.ones_like(index_SA, dtype=probs_NE.dtype))
    f_SE = counts_SE * (E / (K * T))
    P_SE = probs_NE.reshape(num_sequences, T, E).mean(dim=1)
    return (f_SE * P_SE).sum(dim=-1).mean()


def bias_update(load_E: Tensor, rate: float) -> Tensor:
    """The aux-free bias step for one optimiser step's per-expert loads (DeepSeek-V3 §2.1.2, Megatron-core):
    ``rate * sign(mean(load) - load_i)``: up for an underloaded expert, down for an overloaded one, 0 at the mean."""
    load = load_E.double()
    return (rate * torch.sign(load.mean() - load)).float()


def update_expert_biases(model: nn.Module, reduce: Callable[[Tensor], Tensor] | None = None) -> int:
    """Apply one aux-free bias step to every router of ``model`` that has an ``expert_bias``, from the loads it
    recorded since the last call, then clear them. Returns the number of routers updated.

    ``reduce`` sums a tensor across data-parallel ranks (one collective for all routers together), so every rank
    applies the same step from the global loads; None is one process.
    """
    routers = [m for m in model.modules() if getattr(m, "expert_bias", None) is not None and hasattr(m, "pending_load")]
    if not routers:
        return 0
    bias = routers[0].expert_bias
    loads = [
        r.pending_load if r.pending_load is not None else torch.zeros(r.num_experts, dtype=torch.long) for r in routers
    ]
    flat = torch.cat([load.to(device=bias.device, dtype=torch.long) for load in loads])
    if reduce is not None:
        flat = reduce(flat)
    for router, load in zip(routers, flat.split([r.num_experts for r in routers]), strict=True):
        router.expert_bias.add_(bias_update(load, router.bias_update_rate).to(router.expert_bias))
        router.pending_load = None
    return len(routers)

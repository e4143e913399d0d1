"""The router's auxiliary losses and load balancing, in pure torch: the Switch and DeepSeek-V3 sequence-level
balance losses, the ST-MoE z-loss, and the aux-free expert bias (its rule and its once-per-optimiser-step update).

Shape legend: ``N`` tokens, ``E`` experts, ``K`` experts per token, ``S`` sequences, ``T = N / S`` tokens each.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "bias_update",
    "global_load_balance_loss",
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


def global_load_balance_loss(probs_NE: Tensor, tokens_per_expert_E: Tensor, group: object = None) -> Tensor:
    """The Switch loss of the global batch (Qiu et al. 2025, arXiv 2501.11873): ``E * sum_i f_i P_i`` with the
    loads of every data-parallel rank of ``group`` (None: the default group), one ``all_reduce`` of ``2E + 1``
    numbers; :func:`load_balance_loss` on one process.

    With ``c_i^r`` rank r's assignments to expert i, ``N_r`` its tokens, ``N = sum_r N_r`` and ``W`` ranks:
    ``f_i = sum_r c_i^r / sum_r sum_j c_j^r`` (no gradient, as in the Switch loss) and
    ``P_i = sum_r sum_{x in r} p_i(x) / N``. Every rank returns the global value ``E sum_i f_i P_i``, but lets the
    gradient through its own tokens only, scaled by W: ``E sum_i f_i (P_i + Q_i - sg(Q_i))`` with
    ``Q_i = W sum_{x in r} p_i(x) / N``. The data-parallel average of the ranks' gradients,
    ``(1/W) sum_r E sum_i f_i W sum_{x in r} dp_i(x) / N``, is then the gradient of the loss on the union batch,
    also for ranks of unequal batch sizes. It assumes that the trainer averages gradients over the ranks (DDP,
    FSDP) and that every rank runs the forward (the all_reduce is a collective).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return load_balance_loss(probs_NE, tokens_per_expert_E)
    num_tokens, num_experts = probs_NE.shape
    prob_sum_E = probs_NE.sum(dim=0)
    counts = torch.cat([tokens_per_expert_E.detach().to(prob_sum_E.dtype), prob_sum_E.detach()])
    counts = torch.cat([counts, counts.new_tensor([float(num_tokens)])])
    dist.all_reduce(counts, group=group)
    load_E, global_prob_sum_E, total_tokens = counts[:num_experts], counts[num_experts:-1], counts[-1]
    fraction_E = load_E / load_E.sum().clamp_min(1)
    local_E = prob_sum_E * (dist.get_world_size(group) / total_tokens.clamp_min(1))
    P_E = global_prob_sum_E / total_tokens.clamp_min(1) + local_E - local_E.detach()
    return num_experts * (fraction_E * P_E).sum()


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

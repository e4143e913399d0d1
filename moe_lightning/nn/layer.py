"""Mixture-of-Experts feed-forward layers in pure PyTorch: :class:`MoELayer` (a router in front of grouped experts,
with optional shared experts and the balance losses) and the :class:`DenseFFN` baseline.

Shape legend: ``N`` tokens, ``E`` experts, ``K`` experts per token (top-k), ``D`` model dim, ``A = N * K``
token-expert assignments.

The parts live one job to a module: the configuration in :mod:`moe_lightning.nn.config`, the router and the records
of a forward pass in :mod:`moe_lightning.nn.router`, the experts' weights and dispatch paths in
:mod:`moe_lightning.nn.experts`, the losses in :mod:`moe_lightning.nn.balancing`, and expert parallelism (the
sharding of the experts and the token exchange) in :mod:`moe_lightning.distributed.expert_parallel`. This module
puts them together, and also offers their names, which ``moe_lightning.moe`` (0.1) offered.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from moe_lightning.distributed.expert_parallel import summed_over
from moe_lightning.distributed.fsdp import fsdp_output
from moe_lightning.nn.balancing import (
    global_load_balance_loss,
    load_balance_loss,
    router_z_loss,
    sequence_load_balance_loss,
)
from moe_lightning.nn.config import ACTIVATIONS, CAPACITY_MATCHES, DISPATCHES, LOAD_BALANCINGS, SCORINGS, MoEConfig
from moe_lightning.nn.experts import GroupedExperts, auto_sparse_dispatch
from moe_lightning.nn.router import MoEAux, Router, RouterOutput, topk_gates

__all__ = [
    "ACTIVATIONS",
    "CAPACITY_MATCHES",
    "DISPATCHES",
    "LOAD_BALANCINGS",
    "SCORINGS",
    "DenseFFN",
    "MoEAux",
    "MoEConfig",
    "MoELayer",
    "Router",
    "RouterOutput",
    "auto_sparse_dispatch",
    "build_ffn",
    "load_balance_loss",
    "reorder_tokens",
    "router_z_loss",
    "sequence_load_balance_loss",
    "topk_gates",
]


def reorder_tokens(
    route: RouterOutput, num_experts: int, capacity_factor: float | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The router's (token, expert) assignments flattened and sorted by expert, under the capacity limit.

    Returns:
        ``(token_A, weight_A, counts_E, dropped)``: each assignment's token and gate weight, grouped by expert and in
        token order within each expert (a stable sort, so the result is deterministic); the assignments each expert
        keeps; and how many the capacity limit ``ceil(capacity_factor * N * K / E)`` dropped (None: dropless).
    """
    (num_tokens, K), E = route.expert_index.shape, num_experts
    expert_A = route.expert_index.reshape(-1)
    order_A = torch.argsort(expert_A, stable=True)
    expert_A = expert_A[order_A]
    token_A = order_A.div(K, rounding_mode="floor")
    weight_A = route.expert_weight.reshape(-1)[order_A]
    counts_E = torch.bincount(expert_A, minlength=E)
    dropped = torch.zeros((), dtype=torch.long, device=expert_A.device)
    if capacity_factor is not None:
        # GShard/Switch capacity: each expert takes at most C assignments, first come (in token order).
        capacity = math.ceil(capacity_factor * num_tokens * K / E)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_A = torch.arange(expert_A.numel(), device=expert_A.device) - starts_E[expert_A]
        keep_A = rank_A < capacity
        dropped = (~keep_A).sum()
        token_A, weight_A, expert_A = token_A[keep_A], weight_A[keep_A], expert_A[keep_A]
        counts_E = counts_E.clamp(max=capacity)
    return token_A, weight_A, counts_E, dropped


class MoELayer(GroupedExperts):
    """A bank of E expert MLPs (its :class:`GroupedExperts` weights) behind a top-k or soft router.

    ``forward`` takes ``(..., D)`` and returns ``(output (..., D), MoEAux)``. Under expert parallelism
    (:func:`~moe_lightning.distributed.expert_parallel.shard_experts`) this rank holds ``E / P`` of the experts, and
    ``load_group`` is where the routed loads of the balance loss are summed.

    Example:
        >>> layer = MoELayer(MoEConfig(dim=16, expert_hidden=32, num_experts=4, top_k=2))
        >>> y, aux = layer(torch.randn(2, 5, 16))
        >>> y.shape, aux.tokens_per_expert.sum().item()
        (torch.Size([2, 5, 16]), 20)
    """

    def __init__(self, config: MoEConfig) -> None:
        if config.routing == "dense":
            raise ValueError("MoELayer needs routing='topk' or 'soft'; use DenseFFN (or build_ffn) for 'dense'")
        router = Router(config)  # drawn before the experts, so that a seed gives the weights it always gave
        super().__init__(config.num_experts, config.dim, config.expert_hidden, config.activation)
        self.config = config
        self.router = router
        # Built after the routed experts, so a config without shared experts draws the same initial weights.
        self.shared_experts = DenseFFN(config, hidden=config.shared_hidden) if config.num_shared_experts else None
        self.load_group: dist.ProcessGroup | None = None

    def forward(self, x: Tensor) -> tuple[Tensor, MoEAux]:
        if x.shape[-1] != self.config.dim:
            raise ValueError(f"MoELayer expects inputs with last dim {self.config.dim}, got shape {tuple(x.shape)}")
        x_ND = x.reshape(-1, x.shape[-1])
        route = self.router(x_ND)
        dispatch = self.config.dispatch
        if dispatch == "auto":
            soft_bmm = self.config.routing == "soft" and self.expert_group is None
            dispatch = "bmm" if soft_bmm else auto_sparse_dispatch(x.device)
        if dispatch == "bmm":
            y_ND = self.run_every_expert(x_ND, route.gates)
            tokens_E = torch.full((self.num_experts,), x_ND.shape[0], device=x.device)
            dropped = torch.zeros((), dtype=torch.long, device=x.device)
        else:
            y_ND, tokens_E, dropped = self._forward_sparse(x_ND, route, dispatch)
        if self.shared_experts is not None:
            # Through its forward, so that FSDP2's hooks gather its weights when it is sharded on its own.
            y_ND = y_ND + self.shared_experts(x_ND)[0].to(y_ND.dtype)
        return fsdp_output(self, y_ND.reshape(x.shape)), self._aux(route, tokens_E, dropped, x)

    def _forward_sparse(self, x_ND: Tensor, route: RouterOutput, dispatch: str) -> tuple[Tensor, Tensor, Tensor]:
        """The routed output ``(N, D)``, the assignments each expert took and those dropped, for a sparse dispatch."""
        token_A, weight_A, counts_E, dropped = reorder_tokens(route, self.num_experts, self.config.capacity_factor)
        y_AD = self.run_experts(dispatch, x_ND[token_A], counts_E)
        y_AD = y_AD * weight_A.to(y_AD.dtype).unsqueeze(-1)
        y_ND = torch.zeros(x_ND.shape[0], x_ND.shape[1], dtype=y_AD.dtype, device=x_ND.device)
        y_ND = y_ND.index_add(0, token_A, y_AD)
        return y_ND, counts_E, dropped

    def _aux(self, route: RouterOutput, tokens_E: Tensor, dropped: Tensor, x: Tensor) -> MoEAux:
        """The record of this pass: the balance and z losses, the loads and the router's decisions."""
        if self.config.routing == "soft":
            # Every expert sees every token, so the load of expert i is its gate mass: f_i = sg(P_i), and the
            # loss E * sum_i P_i^2 is 1 exactly when the mean gates are uniform.
            routed_E = route.probs.detach().sum(dim=0)
        else:  # f_i counts the router's decisions, before any capacity dropping
            routed_E = torch.bincount(route.expert_index.reshape(-1), minlength=self.num_experts)
        if self.config.load_balancing == "global_aux_loss" and self.training:
            # Summed over every data-parallel rank (which includes the expert-parallel group), not load_group.
            load_balance = global_load_balance_loss(route.probs, routed_E)
        else:
            load_balance = self._balance_loss(route, summed_over(routed_E, self.load_group), x)
        return MoEAux(
            load_balance=load_balance,
            z_loss=router_z_loss(route.logits),
            tokens_per_expert=tokens_E.detach(),
            dropped=dropped,
            router=route,
            routed_per_expert=routed_E.detach() if self.config.routing == "topk" else None,
            source=self.router if self.router.expert_bias is not None else None,
        )

    def _balance_loss(self, route: RouterOutput, routed_E: Tensor, x: Tensor) -> Tensor:
        """The auxiliary balance loss ``config.load_balancing`` asks for; a constant 0 for aux-free and none."""
        mode = self.config.load_balancing
        if mode in ("aux_loss", "global_aux_loss"):  # the latter outside training: this rank's loads
            return load_balance_loss(route.probs, routed_E)
        if mode == "sequence_aux_loss":
            # (..., T, D) inputs hold sequences of T tokens; a flat (N, D) batch is one sequence.
            num_sequences = route.probs.shape[0] // x.shape[-2] if x.dim() >= 3 else 1
            return sequence_load_balance_loss(route.probs, route.expert_index, num_sequences)
        return route.probs.new_zeros(())


class DenseFFN(GroupedExperts):
    """The dense baseline: one FFN with hidden width ``config.dense_hidden`` and no router, stored as one expert:
    ``w_in`` ``(1, D, H)``, ``w_out`` ``(1, H, D)``.

    ``forward`` returns ``(output, None)`` so that it is interchangeable with :class:`MoELayer`.
    """

    def __init__(self, config: MoEConfig, hidden: int | None = None) -> None:
        hidden = config.dense_hidden if hidden is None else hidden
        super().__init__(1, config.dim, hidden, config.activation)
        self.config, self.hidden = config, hidden

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        if x.shape[-1] != self.config.dim:
            raise ValueError(f"DenseFFN expects inputs with last dim {self.config.dim}, got shape {tuple(x.shape)}")
        return self.expert_fn(0, x), None


def build_ffn(config: MoEConfig) -> MoELayer | DenseFFN:
    """The feed-forward block for ``config.routing``: :class:`DenseFFN` for ``"dense"``, else :class:`MoELayer`."""
    return DenseFFN(config) if config.routing == "dense" else MoELayer(config)

"""The router of an MoE layer: scores, top-k or soft gates, and the records of a forward pass.

Shape legend: ``N`` tokens, ``E`` experts, ``K`` experts per token (top-k), ``D`` model dim.

Scores are a softmax over the E logits, or per-expert sigmoids normalised to sum 1 (DeepSeek-V3); top-k routing
keeps the k largest, optionally renormalised over those k (Mixtral); soft routing weights every expert. With
aux-free load balancing a per-expert bias shifts which experts are selected, never their weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lightning.common import check_choice
from moe_lightning.nn.config import MoEConfig

__all__ = ["MoEAux", "Router", "RouterOutput", "topk_gates"]


@dataclass
class RouterOutput:
    """What the router decided for a batch of tokens."""

    logits: Tensor  # (N, E) raw router logits
    probs: Tensor  # (N, E) softmax over all experts; for sigmoid scoring the sigmoids normalised to sum 1
    gates: Tensor  # (N, E) gate weights, 0 where a token is not routed
    expert_index: Tensor  # (N, K) chosen experts (all E for soft routing)
    expert_weight: Tensor  # (N, K) their gate weights


@dataclass
class MoEAux:
    """Auxiliary losses and router statistics of one MoE layer's forward pass."""

    load_balance: Tensor  # scalar, 1.0 at perfect balance (Switch or DeepSeek-V3 sequence loss; 0 without one)
    z_loss: Tensor  # scalar (ST-MoE eq. 5)
    tokens_per_expert: Tensor  # (E,) routed assignments per expert, after capacity dropping, detached
    dropped: Tensor  # scalar int, assignments dropped by the capacity limit
    router: RouterOutput
    routed_per_expert: Tensor | None = None  # (E,) the router's decisions before dropping (top-k), detached
    source: Router | None = None  # the router, where it keeps an aux-free bias to update from these loads

    def record_load(self) -> None:
        """Add this pass's loads to the aux-free router's pending loads (a training step calls this)."""
        if self.source is not None and self.routed_per_expert is not None:
            self.source.record_load(self.routed_per_expert)


def _softmax(logits: Tensor) -> Tensor:
    # Routing probabilities in at least float32, also under bf16 autocast (ST-MoE, "selective precision").
    return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))


def _scores(logits_NE: Tensor, scoring: str) -> tuple[Tensor, Tensor]:
    """``(scores, probs)``: the gate values before top-k, and the distribution over experts the losses use."""
    if scoring == "softmax":
        probs_NE = _softmax(logits_NE)
        return probs_NE, probs_NE
    scores_NE = torch.sigmoid(logits_NE.to(torch.promote_types(logits_NE.dtype, torch.float32)))
    return scores_NE, scores_NE / scores_NE.sum(dim=-1, keepdim=True)


def topk_gates(
    probs_NE: Tensor, top_k: int, normalize: bool = True, bias_E: Tensor | None = None, scale: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k gating: keep the k largest scores, optionally renormalised over those k, times ``scale``.

    With ``bias_E`` (aux-free balancing) the k experts are those with the largest ``score + bias``, and their
    weights are still the scores: the bias changes which experts are selected, never their weights.

    Returns:
        ``(gates_NE, index_NK, weight_NK)``; ``gates_NE`` is zero outside the chosen experts. Pure and
        vmap-friendly, so geometry code can differentiate through it.
    """
    if bias_E is None:
        weight_NK, index_NK = probs_NE.topk(top_k, dim=-1)
    else:
        index_NK = (probs_NE.detach() + bias_E.to(probs_NE.dtype)).topk(top_k, dim=-1).indices
        weight_NK = probs_NE.gather(-1, index_NK)
    if normalize:
        weight_NK = weight_NK / weight_NK.sum(dim=-1, keepdim=True)
    if scale != 1.0:
        weight_NK = weight_NK * scale
    gates_NE = torch.zeros_like(probs_NE).scatter(-1, index_NK, weight_NK)
    return gates_NE, index_NK, weight_NK


class Router(nn.Module):
    """Linear router ``logits = x W_r`` with softmax or sigmoid scores and top-k or soft gating.

    With ``load_balancing="aux_free"`` it keeps a per-expert selection bias, a buffer (saved in
    checkpoints, no gradient), and the loads of the training passes since the last bias step in ``pending_load``
    (a plain attribute, so DDP's buffer broadcast cannot overwrite a rank's own loads).
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        check_choice("routing", config.routing, ("topk", "soft"))
        self.num_experts, self.top_k, self.routing = config.num_experts, config.top_k, config.routing
        self.normalize_topk, self.jitter_noise = config.normalize_topk, config.jitter_noise
        self.scoring, self.routed_scaling = config.scoring, config.routed_scaling
        self.bias_update_rate = config.bias_update_rate
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.dim))  # (E, D)
        nn.init.normal_(self.weight, std=config.dim**-0.5)
        aux_free = config.load_balancing == "aux_free"
        self.register_buffer("expert_bias", torch.zeros(config.num_experts) if aux_free else None)  # (E,) float32
        self.pending_load: Tensor | None = None  # (E,) int64

    def record_load(self, load_E: Tensor) -> None:
        """Add one training pass's per-expert assignment counts to the loads of the current optimiser step."""
        load_E = load_E.detach().long()
        self.pending_load = load_E.clone() if self.pending_load is None else self.pending_load + load_E

    def _gate(self, logits_NE: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(probs, gates, index, weight)`` of the logits."""
        scores_NE, probs_NE = _scores(logits_NE, self.scoring)
        if self.routing == "soft":
            gates_NE = scores_NE * self.routed_scaling if self.routed_scaling != 1.0 else scores_NE
            index_NK = torch.arange(self.num_experts, device=logits_NE.device).expand(logits_NE.shape[0], -1)
            return probs_NE, gates_NE, index_NK, gates_NE
        gates_NE, index_NK, weight_NK = topk_gates(
            scores_NE, self.top_k, self.normalize_topk, self.expert_bias, self.routed_scaling
        )
        return probs_NE, gates_NE, index_NK, weight_NK

    def forward(self, x_ND: Tensor) -> RouterOutput:
        if self.training and self.jitter_noise > 0:
            # Switch Transformer: multiplicative jitter on the router input only.
            eps = self.jitter_noise
            x_ND = x_ND * torch.empty_like(x_ND).uniform_(1.0 - eps, 1.0 + eps)
        logits_NE = F.linear(x_ND, self.weight)
        return RouterOutput(logits_NE, *self._gate(logits_NE))

    def gates(self, x_ND: Tensor) -> Tensor:
        """Deterministic (no jitter) gate weights (N, E): a pure function of x, for the geometry probes."""
        return self._gate(F.linear(x_ND, self.weight.to(x_ND.dtype)))[1]

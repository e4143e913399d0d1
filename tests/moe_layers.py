"""Small MoE layers that stand for other libraries' layers in the tests: each follows its library's forward math and
attribute names, with the source file it copies named, so that the adapters and the view check are tested on the
structure users bring without those libraries installed."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class RandomSecondExpertMoE(nn.Module):
    """fairscale's ``MOELayer`` with ``Top2Gate`` (fairscale/nn/moe/top2gate.py, ``top2gating``): the second expert
    is the argmax of the logits plus Gumbel noise, drawn in eval mode too, so two forwards route differently."""

    def __init__(self, dim: int = 8, num_experts: int = 4) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_experts))

    def forward(self, x):
        x_ND = x.reshape(-1, x.shape[-1])
        logits = self.gate(x_ND)
        probs = logits.softmax(-1)
        first = logits.argmax(-1, keepdim=True)
        gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_min(1e-20)))
        second = (logits + gumbel).scatter(-1, first, float("-inf")).argmax(-1, keepdim=True)
        g1, g2 = probs.gather(-1, first), probs.gather(-1, second)
        g1, g2 = g1 / (g1 + g2), g2 / (g1 + g2)
        gates = torch.zeros_like(probs).scatter(-1, first, g1).scatter(-1, second, g2)
        out = sum(gates[:, e : e + 1] * expert(x_ND) for e, expert in enumerate(self.experts))
        return out.reshape(x.shape)

    def view_gates(self, x_ND):
        """The deterministic top-2 a user would write for it (the glue that was tried)."""
        probs = self.gate(x_ND).softmax(-1)
        top, index = probs.topk(2, dim=-1)
        return torch.zeros_like(probs).scatter(-1, index, top / top.sum(-1, keepdim=True))


class SlotMoE(nn.Module):
    """lucidrains' ``SoftMoE`` (soft_moe_pytorch/soft_moe.py): each expert's slots are softmax-over-tokens mixtures
    of all the tokens, and each token's output a softmax-over-slots mixture of the slots' outputs; tokens are
    coupled through the slots."""

    def __init__(self, dim: int = 8, num_experts: int = 4, num_slots: int = 1) -> None:
        super().__init__()
        self.slot_embeds = nn.Parameter(torch.randn(num_experts, num_slots, dim))
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.GELU()) for _ in range(num_experts))

    def forward(self, x):
        x_BND = x if x.dim() == 3 else x.unsqueeze(0)
        logits = torch.einsum("bnd,esd->bnes", x_BND, self.slot_embeds)
        dispatch = logits.softmax(dim=1)
        combine = logits.flatten(2).softmax(-1)
        slots = torch.einsum("bnd,bnes->besd", x_BND, dispatch)
        out = torch.stack([expert(slots[:, e]) for e, expert in enumerate(self.experts)], dim=1)
        out = torch.einsum("bsd,bns->bnd", out.flatten(1, 2), combine)
        return out.reshape(x.shape)

    def view_gates(self, x_ND):
        """The best per-token view: each token's combine weight summed over an expert's slots."""
        logits = torch.einsum("nd,esd->nes", x_ND, self.slot_embeds)
        return logits.flatten(1).softmax(-1).reshape(logits.shape).sum(-1)


# nanoMoE (github.com/wolfecameron/nanoMoE, model.py and manager.py; MIT license): its Router, MLPExperts and
# MOELayer, written again here with the same class and attribute names, settings and forward math (nanoMoE is not on
# PyPI); on the same weights they give nanoMoE's outputs, gradients and losses bit for bit.


@dataclass
class NanoMoEConfig:
    """The fields of nanoMoE's ``GPTConfig`` that its MoE layer reads: its defaults, but a small ``n_embd`` and
    ``n_exp``."""

    n_embd: int = 8
    n_exp: int = 4
    top_k: int = 2
    bias: bool = True
    dropout: float = 0.0
    use_aux_loss: bool = False
    use_router_z_loss: bool = False
    use_noisy_top_k: bool = False
    train_capacity: float = 1.25
    eval_capacity: float = 2.0
    min_capacity: int = 4
    router_use_full_prec: bool = False


class MOEManager:
    """nanoMoE's ``MOEManager`` (manager.py): a global list of each router call's auxiliary losses, which the model's
    loss sums and resets."""

    def __init__(self) -> None:
        self.aux_loss: list = []
        self.router_z_loss: list = []

    def add_aux_loss(self, loss) -> None:
        self.aux_loss.append(loss)

    def add_router_z_loss(self, loss) -> None:
        self.router_z_loss.append(loss)


MANAGER = MOEManager()


class Router(nn.Module):
    """nanoMoE's ``Router`` (model.py): softmax over the top-k logits (noised by ``softplus(w_noise(x))`` times a
    normal draw when ``use_noisy_top_k``, in eval mode too), capacity ``top_k * capacity * N / n_exp`` over all the
    batch's tokens, rounded up to even and at least ``min_capacity``, filled top-1 choices first.

    Returns ``(used_capacity (E,), cb_weight (B*T, E, C), sec_mask (B*T, E, C))``."""

    def __init__(self, config: NanoMoEConfig) -> None:
        super().__init__()
        self.top_k, self.n_exp = config.top_k, config.n_exp
        self.use_noisy_top_k = config.use_noisy_top_k
        self.train_capacity, self.eval_capacity = config.train_capacity, config.eval_capacity
        self.min_capacity = config.min_capacity
        self.router_use_full_prec = config.router_use_full_prec
        self.use_aux_loss, self.use_router_z_loss = config.use_aux_loss, config.use_router_z_loss
        self.w_g = nn.Linear(config.n_embd, config.n_exp, bias=False)
        self.w_noise = nn.Linear(config.n_embd, config.n_exp, bias=False) if self.use_noisy_top_k else None

    def forward(self, x):
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        full = torch.amp.autocast(device_type=device_type, enabled=False)
        with full if self.router_use_full_prec else nullcontext():
            batch, seq, _ = x.size()
            num_tokens = batch * seq
            logits = self.w_g(x)  # (B, T, E)
            if self.use_noisy_top_k:
                noise = F.softplus(self.w_noise(x))
                noise *= torch.randn_like(noise)
                logits += noise
            if self.use_router_z_loss:
                MANAGER.add_router_z_loss(torch.mean(torch.logsumexp(logits, dim=-1) ** 2.0))
            top_k_logits, top_k_indices = logits.topk(self.top_k, dim=-1)  # (B, T, K)
            router_probs = torch.full_like(logits, float("-inf"))
            router_probs.scatter_(-1, top_k_indices, top_k_logits)
            router_probs = F.softmax(router_probs, dim=-1)  # (B, T, E), zero off the top-k
            if self.use_aux_loss:
                MANAGER.add_aux_loss(self.compute_aux_loss(router_probs, top_k_indices))
            exp_capacity = self.get_capacity(num_tokens)
            exp_mask = F.one_hot(top_k_indices, num_classes=self.n_exp)  # (B, T, K, E)
            exp_mask = exp_mask.view(num_tokens, self.top_k, self.n_exp).permute(1, 0, 2)  # (K, B*T, E)
            # Each token's place in its expert's batch, counting every token's first choice before any second one.
            exp_rank = exp_mask.reshape(self.top_k * num_tokens, self.n_exp)
            exp_rank = (torch.cumsum(exp_rank, dim=0) - 1).reshape(self.top_k, num_tokens, self.n_exp)
            exp_mask *= torch.lt(exp_rank, exp_capacity)  # (K, B*T, E), choices past the capacity dropped
            used_capacity = torch.sum(exp_mask, dim=(0, 1))  # (E,)
            exp_rank = torch.sum(exp_mask * exp_rank, dim=-1)  # (K, B*T)
            router_probs = router_probs.view(num_tokens, self.n_exp)[None, :]  # (1, B*T, E)
            exp_weights = exp_mask * router_probs  # (K, B*T, E)
            exp_rank_sc = F.one_hot(exp_rank, num_classes=exp_capacity)  # (K, B*T, C)
            cb_weight = torch.sum(exp_weights.unsqueeze(3) * exp_rank_sc.unsqueeze(2), dim=0)  # (B*T, E, C)
            sec_mask = cb_weight.bool()
            return used_capacity, cb_weight, sec_mask

    def compute_aux_loss(self, expert_probs, indices):
        """Switch Transformer's load-balancing loss (arXiv:2101.03961 eq. 4-6)."""
        with torch.no_grad():
            tokens_per_expert = F.one_hot(indices, num_classes=self.n_exp).float().sum(dim=2).mean(dim=(0, 1))
        prob_per_expert = torch.mean(expert_probs.float(), dim=(0, 1))
        return self.n_exp * torch.sum(prob_per_expert * tokens_per_expert)

    def get_capacity(self, tokens_per_batch: int) -> int:
        capacity_factor = self.train_capacity if self.training else self.eval_capacity
        capacity = math.floor(self.top_k * capacity_factor * tokens_per_batch / self.n_exp)
        capacity += capacity % 2
        return int(max(capacity, self.min_capacity))


class MLPExperts(nn.Module):
    """nanoMoE's ``MLPExperts`` (model.py): stacked GELU experts ``gelu(x c_fc + fc_bias) c_proj + proj_bias``, run on
    the ``(E, C, D)`` expert batches with ``bmm``; the biases are None with ``bias=False``. nanoMoE's model initialises
    the weights (normal, std 0.02; biases zero); here they are drawn larger, and the biases nonzero, so that a lone
    layer's experts differ and the bias terms count."""

    def __init__(self, config: NanoMoEConfig) -> None:
        super().__init__()
        self.bias = config.bias
        hidden = 4 * config.n_embd
        self.c_fc = nn.Parameter(0.3 * torch.randn(config.n_exp, config.n_embd, hidden))
        self.c_proj = nn.Parameter(0.3 * torch.randn(config.n_exp, hidden, config.n_embd))
        self.fc_bias = nn.Parameter(0.1 * torch.randn(config.n_exp, 1, hidden)) if self.bias else None
        self.proj_bias = nn.Parameter(0.1 * torch.randn(config.n_exp, 1, config.n_embd)) if self.bias else None
        self.gelu = nn.GELU()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = torch.bmm(x, self.c_fc)
        if self.bias:
            x += self.fc_bias
        x = self.gelu(x)
        x = torch.bmm(x, self.c_proj)
        if self.bias:
            x += self.proj_bias
        return self.dropout(x)


class MOELayer(nn.Module):
    """nanoMoE's ``MOELayer`` (github.com/wolfecameron/nanoMoE, model.py, MIT license): dispatch by the router's
    mask, the experts on ``(E, C, D)`` batches, and the outputs combined by the router's ``cb_weight``."""

    def __init__(self, config: NanoMoEConfig) -> None:
        super().__init__()
        self.router = Router(config)
        self.experts = MLPExperts(config)

    def forward(self, x):
        batch, seq, n_embd = x.size()
        num_tokens = batch * seq
        used_capacity, exp_weight, exp_mask = self.router(x)
        x = x.view(num_tokens, n_embd)
        exp_batches = exp_mask.permute(1, 2, 0).type_as(x) @ x  # (E, C, D)
        exp_out = self.experts(exp_batches)  # (E, C, D)
        exp_weight = exp_weight.view(num_tokens, -1)  # (B*T, E*C)
        output = exp_weight @ exp_out.view(-1, n_embd)  # (B*T, D)
        return output.view(batch, seq, n_embd)

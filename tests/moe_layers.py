"""Small MoE layers that stand for other libraries' layers in the tests: each follows its library's forward math and
attribute names, with the source file it copies named, so that the adapters and the view check are tested on the
structure users bring without those libraries installed."""

from __future__ import annotations

import torch
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

"""Router statistics of one batch (docs/geometry.md §6): expert load, its spread, routing entropy and margin."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["router_statistics"]


def router_statistics(gates_NE: Tensor, probs_NE: Tensor | None = None) -> dict[str, Any]:
    """Router statistics of one batch (docs/geometry.md §6), from gates (0 where not routed) and, if known, the full
    softmax probabilities.

    - ``load``: per-expert share of the routed assignments (``g > 0``); for soft routing, where every gate is
      positive, the share of the gate mass instead.
    - ``load_cv``: coefficient of variation (population std / mean) of the per-expert loads.
    - ``load_max_over_mean``: the busiest expert's load over the mean load.
    - ``entropy``: mean over tokens of ``H(p)`` in nats, ``p`` the softmax probabilities (the normalised gates
      when the probabilities are unknown).
    - ``margin``: mean over tokens of ``p_(1) - p_(2)``, the gap between the two most probable experts.
    """
    gates = gates_NE.detach().double()
    probs = (probs_NE if probs_NE is not None else gates_NE).detach().double()
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    routed = gates > 0
    load = gates.sum(0) if bool(routed.all()) else routed.sum(0).double()
    share = load / load.sum().clamp_min(torch.finfo(load.dtype).tiny)
    mean = share.mean()
    entropy = -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(-1).mean()
    top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).mean() if top2.shape[-1] > 1 else top2[:, 0].mean()
    return {
        "load": share,
        "load_cv": float(share.std(unbiased=False) / mean),
        "load_max_over_mean": float(share.max() / mean),
        "entropy": float(entropy),
        "margin": float(margin),
    }

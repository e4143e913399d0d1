"""Router statistics (docs/geometry.md §6): expert load, its spread, routing entropy and margin, and router health
(utilisation over the ideal load, dead experts, diversity), from one batch or from sums over a logging window."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["router_health", "router_statistics", "routing_sums", "window_statistics"]


def routing_sums(gates_NE: Tensor, probs_NE: Tensor | None = None) -> Tensor:
    """The additive summary of one batch, float64 ``(E + 3,)``: per-expert load, then the token count and the sums
    over tokens of the routing entropy and the top-2 margin. Sums of batches (or of ranks) summarise their union.

    The load of expert i counts the routed assignments (``g > 0``); for soft routing, where every gate is positive,
    it is the gate mass instead. Entropy and margin use the softmax probabilities ``probs_NE`` (the normalised
    gates when they are unknown).
    """
    gates = gates_NE.detach().double()
    probs = (probs_NE if probs_NE is not None else gates_NE).detach().double()
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    routed = gates > 0
    # torch.where, not an if: no host synchronisation when a callback calls this on every batch
    load = torch.where(routed.all(), gates.sum(0), routed.sum(0).double())
    entropy = -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(-1)
    top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    margin = top2[:, 0] - top2[:, 1] if top2.shape[-1] > 1 else top2[:, 0]
    tokens = torch.full((1,), float(gates.shape[0]), dtype=torch.float64, device=gates.device)
    return torch.cat([load, tokens, entropy.sum().reshape(1), margin.sum().reshape(1)])


def router_health(load_E: Tensor) -> dict[str, float]:
    """Router health of per-expert loads (counts or mass over any window; NeMo AutoModel, Megatron-core):

    - ``utilisation_p50``, ``utilisation_p90``, ``utilisation_max``: percentiles (linear interpolation) over experts
      of the utilisation ``u_i = load_i / (sum_j load_j / E)``, the load over the ideal, balanced load (1 each);
    - ``dead_fraction``: the fraction of experts with no load;
    - ``diversity``: ``exp(H(s)) / E`` with ``s_i = load_i / sum_j load_j`` and ``H`` in nats: 1 when balanced,
      ``1 / E`` when one expert takes everything.

    An empty window (no load at all) has every expert dead and undefined (NaN) utilisation and diversity.
    """
    load = load_E.detach().double()
    E, total = load.numel(), load.sum()
    dead = float((load <= 0).double().mean())
    if total <= 0:
        nan = float("nan")
        return {f"utilisation_{q}": nan for q in ("p50", "p90", "max")} | {"dead_fraction": dead, "diversity": nan}
    util = load * E / total
    p50, p90 = torch.quantile(util, torch.tensor([0.5, 0.9], dtype=util.dtype, device=util.device)).tolist()
    share = load / total
    entropy = -(share * share.clamp_min(torch.finfo(share.dtype).tiny).log()).sum()
    return {
        "utilisation_p50": p50,
        "utilisation_p90": p90,
        "utilisation_max": float(util.max()),
        "dead_fraction": dead,
        "diversity": float(entropy.exp() / E),
    }


def window_statistics(sums: Tensor) -> dict[str, Any]:
    """The statistics of :func:`router_statistics` and :func:`router_health` from :func:`routing_sums` (of one
    batch, or summed over the batches of a window and over ranks)."""
    sums = sums.detach().double()
    load, (tokens, entropy_sum, margin_sum) = sums[:-3], sums[-3:].tolist()
    share = load / load.sum().clamp_min(torch.finfo(load.dtype).tiny)
    mean = share.mean()
    return {
        "load": share,
        "load_cv": float(share.std(unbiased=False) / mean),
        "load_max_over_mean": float(share.max() / mean),
        "entropy": entropy_sum / tokens if tokens else float("nan"),
        "margin": margin_sum / tokens if tokens else float("nan"),
        **router_health(load),
    }


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
    - the health statistics of :func:`router_health` on the batch's loads.
    """
    return window_statistics(routing_sums(gates_NE, probs_NE))

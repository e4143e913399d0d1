"""The router statistics RouterProbe adds to those of :func:`~moe_lightning.geometry.window_statistics`
(docs/callbacks.md, "RouterMonitor"): balance per micro-batch and over the window's union, router-logit drift,
expert co-activation, and percentiles of a statistic over layers. Each batch gives additive sums (or, for the
maxima, values combined by ``max``), so that sums over micro-batches and ranks summarise their union.

Shape legend: ``N`` tokens, ``E`` experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lightning.geometry import MoEView
from moe_lightning.geometry.router import routing_sums
from moe_lightning.nn.router import MoEAux

__all__ = [
    "BALANCE_FIELDS",
    "COACTIVATION_MAX_EXPERTS",
    "LOGIT_FIELDS",
    "LOGIT_MAXIMA",
    "balance_statistics",
    "batch_sums",
    "combine_windows",
    "empty_window",
    "coactivation_statistics",
    "ep_rank_statistics",
    "coactivation_sums",
    "layer_percentiles",
    "logit_statistics",
    "logit_sums",
    "micro_balance_sums",
    "window_parts",
    "window_width",
]

#: After the routing sums of a view: dropped, assignments, sum of aux_load_balance, sum of aux_z_loss, batches.
_AUX_FIELDS = 5
#: :func:`micro_balance_sums`: micro-batches with load, sum of their MaxVio, sum of their load CV.
BALANCE_FIELDS = 3
#: :func:`logit_sums`: tokens with logits, sum over them of ``logsumexp(logits)``.
LOGIT_FIELDS = 2
#: The maxima of :func:`logit_sums`: the largest ``logsumexp(logits)`` and the largest logit.
LOGIT_MAXIMA = 2
#: Co-activation counts ``(E, E)`` are kept for layers of at most this many experts (``E^2`` numbers per layer
#: ride on the window's collective).
COACTIVATION_MAX_EXPERTS = 64


def _maxvio_and_cv(load_E: Tensor) -> tuple[Tensor, Tensor]:
    """``(max - mean) / mean`` and population std / mean of loads (NaN-free only for a positive mean)."""
    mean = load_E.mean()
    return (load_E.max() - mean) / mean, load_E.std(unbiased=False) / mean


def micro_balance_sums(load_E: Tensor) -> Tensor:
    """One micro-batch's balance, float64 ``(BALANCE_FIELDS,)``: ``[1, MaxVio, CV]`` of its per-expert loads, or
    zeros when it has no load (no host synchronisation: ``torch.where``, not an ``if``)."""
    load = load_E.detach().double()
    any_load = load.sum() > 0
    maxvio, cv = _maxvio_and_cv(torch.where(any_load, load, torch.ones_like(load)))
    values = torch.stack([torch.ones_like(maxvio), maxvio, cv])
    return torch.where(any_load, values, torch.zeros_like(values))


def balance_statistics(load_E: Tensor, micro: Tensor) -> dict[str, float]:
    """Balance of a window: ``maxvio_global`` of its loads summed over micro-batches and ranks (``load_cv`` and
    ``load_max_over_mean`` of :func:`window_statistics` are of the same loads), and ``maxvio_micro``,
    ``load_cv_micro``, the means of the per-micro-batch values over the window's micro-batches on every rank
    (``micro``: the sum of :func:`micro_balance_sums`)."""
    load = load_E.detach().double()
    out: dict[str, float] = {}
    if load.sum() > 0:
        out["maxvio_global"] = float(_maxvio_and_cv(load)[0])
    count, maxvio_sum, cv_sum = micro.tolist()
    if count > 0:
        out["maxvio_micro"] = maxvio_sum / count
        out["load_cv_micro"] = cv_sum / count
    return out


def ep_rank_statistics(load_E: Tensor, ep_size: int, max_keys: int | None = None) -> dict[str, float]:
    """Overload of each expert-parallel rank (Megatron-LM's per-rank overload): the assignments its experts receive
    over the mean over the ranks, ``ep_overload/r<i>`` (the first ``max_keys`` ranks), and their maximum
    ``ep_overload_max``. Rank ``i`` holds the contiguous experts ``[i·E/P, (i+1)·E/P)``, as
    :class:`~moe_lightning.nn.experts.Experts` splits them; ``load_E`` is summed over the window and every rank.
    Nothing without load."""
    per_rank = load_E.detach().double().reshape(ep_size, -1).sum(-1)
    mean = per_rank.mean()
    if mean <= 0:
        return {}
    overload = (per_rank / mean).tolist()
    out = {f"ep_overload/r{i}": v for i, v in enumerate(overload) if max_keys is None or i < max_keys}
    out["ep_overload_max"] = max(overload)
    return out


def logit_sums(logits_NE: Tensor) -> tuple[Tensor, Tensor]:
    """One batch's router-logit drift: ``([tokens, Σ_x lse(x)], [max_x lse(x), max logit])`` in float64, with
    ``lse(x) = logsumexp_e logit_e(x)`` (the quantity the ST-MoE z-loss squares)."""
    logits = logits_NE.detach().double().reshape(-1, logits_NE.shape[-1])
    lse_N = torch.logsumexp(logits, dim=-1)
    tokens = torch.full((), float(logits.shape[0]), dtype=torch.float64, device=logits.device)
    if logits.shape[0] == 0:
        return torch.stack([tokens, tokens]), torch.full((LOGIT_MAXIMA,), -torch.inf, dtype=torch.float64)
    return torch.stack([tokens, lse_N.sum()]), torch.stack([lse_N.max(), logits.max()])


def logit_statistics(sums: Tensor, maxima: Tensor) -> dict[str, float]:
    """``logit_lse_mean``, ``logit_lse_max``, ``logit_max`` of a window (nothing if it saw no logits)."""
    tokens, lse_sum = sums.tolist()
    if tokens <= 0:
        return {}
    lse_max, logit_max = maxima.tolist()
    return {"logit_lse_mean": lse_sum / tokens, "logit_lse_max": lse_max, "logit_max": logit_max}


def coactivation_sums(gates_NE: Tensor) -> Tensor:
    """One batch's co-activation counts, float64 ``(E * E,)`` (row-major ``(E, E)``): entry ``(i, j)`` counts the
    tokens routed to both ``i`` and ``j`` (``g > 0``); the diagonal counts the tokens routed to ``i``."""
    routed_NE = (gates_NE.detach().reshape(-1, gates_NE.shape[-1]) > 0).double()
    return (routed_NE.T @ routed_NE).reshape(-1)


def coactivation_statistics(counts_EE: Tensor, tokens: float) -> dict[str, float]:
    """How far the window's co-activation is from independent routing with the same per-expert loads.

    With ``C_ij`` the share of tokens routed to both ``i`` and ``j`` and ``p_i = C_ii`` the share routed to ``i``,
    independent routing would give ``p_i p_j``. The off-diagonal masses themselves cannot tell the two apart (a
    token routed to exactly ``k`` experts adds ``k(k-1)`` ordered pairs whatever the routing), so the statistics
    compare the distributions of the pairs:

    - ``coactivation_tv``: total-variation distance ``½ Σ_{i≠j} |C_ij / Σ C − p_i p_j / Σ p p|`` (sums over
      ``i ≠ j``) between the observed and the independent distribution of pairs; 0 when routing looks
      independent, towards 1 when a few fixed pairs take every token;
    - ``coactivation_max_lift``: ``max_{i≠j} C_ij / (p_i p_j)``, how much more often the most linked pair serves
      the same token than under independence (1: as often).

    Empty for a window with no co-routed pair (top-1 routing).
    """
    E = int(round(counts_EE.numel() ** 0.5))
    share_EE = counts_EE.detach().double().reshape(E, E) / max(tokens, 1.0)
    p_E = share_EE.diagonal()
    off = ~torch.eye(E, dtype=torch.bool, device=share_EE.device)
    observed, independent = share_EE[off], torch.outer(p_E, p_E)[off]
    if tokens <= 0 or observed.sum() <= 0 or independent.sum() <= 0:
        return {}
    tv = 0.5 * (observed / observed.sum() - independent / independent.sum()).abs().sum()
    lift = torch.where(independent > 0, observed / independent.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return {"coactivation_tv": float(tv), "coactivation_max_lift": float(lift.max())}


def layer_percentiles(per_stat: dict[str, list[float]]) -> dict[str, float]:
    """``router/layers/<stat>_p50``, ``_p90``, ``_max`` over layers of each statistic: percentiles with linear
    interpolation between order statistics (``torch.quantile``'s default, numpy's ``"linear"``)."""
    out: dict[str, float] = {}
    for key, values in per_stat.items():
        values_L = torch.tensor(values, dtype=torch.float64)
        p50, p90 = torch.quantile(values_L, torch.tensor([0.5, 0.9], dtype=torch.float64)).tolist()
        out[f"router/layers/{key}_p50"] = p50
        out[f"router/layers/{key}_p90"] = p90
        out[f"router/layers/{key}_max"] = float(values_L.max())
    return out


# ---------------------------------------------------------------------------------------------- a view's window
def window_parts(num_experts: int) -> list[int]:
    """The lengths of the parts of a view's window sums: :func:`routing_sums` (``E + 3``), the :data:`_AUX_FIELDS`,
    :func:`micro_balance_sums`, :func:`logit_sums` and :func:`coactivation_sums` (``E^2``, none past
    :data:`COACTIVATION_MAX_EXPERTS` experts). Its :data:`LOGIT_MAXIMA` follow them."""
    E = num_experts
    return [E + 3, _AUX_FIELDS, BALANCE_FIELDS, LOGIT_FIELDS, E * E if E <= COACTIVATION_MAX_EXPERTS else 0]


def window_width(view: MoEView) -> int:
    """The length of a view's window sums, its maxima left out."""
    return sum(window_parts(view.num_experts))


def empty_window(view: MoEView, device: torch.device) -> Tensor:
    """The window of a view that saw no batch: zero sums, maxima ``-inf``."""
    maxima = torch.full((LOGIT_MAXIMA,), -torch.inf, dtype=torch.float64, device=device)
    return torch.cat([torch.zeros(window_width(view), dtype=torch.float64, device=device), maxima])


def combine_windows(window: Tensor, batch: Tensor) -> Tensor:
    """A window with one more batch: its sums added, its maxima (the last :data:`LOGIT_MAXIMA`) the larger."""
    window = window.to(batch.device)
    width = window.numel() - LOGIT_MAXIMA
    return torch.cat([window[:width] + batch[:width], torch.maximum(window[width:], batch[width:])])


def batch_sums(view: MoEView, aux: MoEAux | None, x: Tensor) -> Tensor:
    """One batch's summary for a view, the parts of :func:`window_parts` then the :data:`LOGIT_MAXIMA`: additive
    sums (the :data:`_AUX_FIELDS` and the logits' are those of an :class:`MoEAux`, zeros for other layers, whose
    :class:`MoEView` gives gates but no logits) and maxima (``-inf`` without logits). No host synchronisation."""
    E = view.num_experts
    gates_NE = aux.router.gates if aux is not None else view.gates(x.detach().reshape(-1, x.shape[-1]))
    routing = routing_sums(gates_NE, aux.router.probs if aux is not None else None)
    device = routing.device
    aux_sums = torch.zeros(_AUX_FIELDS, dtype=torch.float64, device=device)
    logits = torch.zeros(LOGIT_FIELDS, dtype=torch.float64, device=device)
    maxima = torch.full((LOGIT_MAXIMA,), -torch.inf, dtype=torch.float64, device=device)
    if aux is not None:
        dropped = aux.dropped.double()
        assignments = aux.tokens_per_expert.sum().double() + dropped
        extra = [dropped, assignments, aux.load_balance.double(), aux.z_loss.double(), torch.ones(())]
        aux_sums = torch.stack([t.detach().to(device, torch.float64).reshape(()) for t in extra])
        logits, maxima = (t.to(device) for t in logit_sums(aux.router.logits))
    coactivation = coactivation_sums(gates_NE).to(device) if E <= COACTIVATION_MAX_EXPERTS else routing[:0]
    return torch.cat([routing, aux_sums, micro_balance_sums(routing[:E]), logits, coactivation, maxima])

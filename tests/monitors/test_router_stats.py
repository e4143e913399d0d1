"""RouterProbe's balance, logit-drift, co-activation and over-layer statistics against numpy, on hand-made routings
driven through the probe by a plain loop (two optimiser steps of two micro-batches each, one window)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from moe_lightning.geometry.view import ExpertPlacement
from moe_lightning.monitors import RouterProbe, router_probe
from moe_lightning.monitors.router_stats import coactivation_statistics, micro_balance_sums
from moe_lightning.nn.router import MoEAux, RouterOutput

E = 4


class HandRouted(nn.Module):
    """An MoE block whose router logits are its input ``(N, E)``: softmax, top-k, and the records of a pass."""

    def __init__(self, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k

    def forward(self, logits_NE: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        probs_NE = logits_NE.softmax(-1)
        weight_NK, index_NK = probs_NE.topk(self.top_k, dim=-1)
        weight_NK = weight_NK / weight_NK.sum(-1, keepdim=True)
        gates_NE = torch.zeros_like(probs_NE).scatter(-1, index_NK, weight_NK)
        route = RouterOutput(logits_NE, probs_NE, gates_NE, index_NK, weight_NK)
        tokens_E = torch.bincount(index_NK.reshape(-1), minlength=E)
        zero = torch.zeros(())
        return logits_NE, MoEAux(zero, zero, tokens_E, torch.zeros((), dtype=torch.long), route)


def hand_logits(choices: list[list[int]], seed: int) -> torch.Tensor:
    """Logits ``(N, E)`` whose top-k experts of token t are ``choices[t]``: 5 + noise there, noise elsewhere."""
    noise = torch.randn(len(choices), E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    logits = noise * 0.1
    for t, chosen in enumerate(choices):
        logits[t, chosen] += 5.0 + torch.arange(len(chosen), dtype=torch.float64) * 0.01
    return logits


# Per step, two micro-batches of three tokens each; layer 0 top-1, layers 1 and 2 top-2.
ROUTINGS = {
    0: [[[0], [0], [1]], [[2], [3], [0]], [[0], [0], [0]], [[1], [1], [2]]],
    1: [[[0, 1], [0, 1], [2, 3]], [[0, 1], [0, 2], [1, 3]], [[2, 3], [2, 3], [2, 3]], [[0, 1], [0, 1], [0, 3]]],
    2: [[[0, 3], [1, 2], [0, 2]], [[1, 3], [0, 1], [2, 3]], [[0, 1], [0, 2], [0, 3]], [[1, 2], [1, 3], [2, 3]]],
}
TOP_K = {0: 1, 1: 2, 2: 2}


def numpy_maxvio_cv(load: np.ndarray) -> tuple[float, float]:
    return (load.max() - load.mean()) / load.mean(), load.std() / load.mean()


def numpy_coactivation(routed: np.ndarray) -> dict[str, float]:
    """Total variation and max lift of the observed pair distribution against independent routing, from the
    ``(N, E)`` 0/1 routing matrix."""
    N = len(routed)
    C = np.einsum("ni,nj->ij", routed, routed) / N
    p = np.diag(C).copy()
    off = ~np.eye(E, dtype=bool)
    observed, independent = C[off], np.outer(p, p)[off]
    tv = 0.5 * np.abs(observed / observed.sum() - independent / independent.sum()).sum()
    lift = np.where(independent > 0, observed / np.where(independent > 0, independent, 1), 0).max()
    return {"coactivation_tv": tv, "coactivation_max_lift": lift}


def run_probe(monkeypatch, ep_size: int = 1) -> tuple[dict[str, float], dict[int, list[torch.Tensor]]]:
    """The probe's one window over two steps of two micro-batches, and the logits of each layer's micro-batches;
    with ``ep_size`` > 1 the views say that this rank holds the first ``E / ep_size`` experts."""
    layers = nn.ModuleList(HandRouted(TOP_K[i]) for i in range(3))
    views = [SimpleNamespace(name=f"layer{i}", module=layer, num_experts=E) for i, layer in enumerate(layers)]
    if ep_size > 1:
        placement = ExpertPlacement(group=None, local_experts=range(E // ep_size), gather_all=contextlib.nullcontext)
        for view in views:
            view.placement = lambda: placement
    probe = RouterProbe(every_n_steps=2)
    monkeypatch.setattr(router_probe, "find_moe_layers", lambda model, selection: views)
    probe.attach(layers)
    logits = {i: [hand_logits(c, seed=10 * i + m) for m, c in enumerate(ROUTINGS[i])] for i in range(3)}
    metrics = None
    for micro in range(4):
        step = 1 + micro // 2  # the window of step 2 holds the batches routed at steps 1 and 2
        probe.start_batch(step)
        for i, layer in enumerate(layers):
            layer(logits[i][micro])
        metrics = probe.end_batch(layers, step + 1 if micro % 2 else step) or metrics
    probe.detach()
    assert probe._logged_step == 2
    return metrics, logits


def test_micro_and_global_balance_logit_drift_and_coactivation_match_numpy(monkeypatch):
    metrics, logits = run_probe(monkeypatch)
    for i in range(3):
        name = f"router/layer{i}"
        routed = [np.isin(np.arange(E), c).astype(float) for batch in ROUTINGS[i] for c in batch]
        loads = [np.sum([np.isin(np.arange(E), c) for c in batch], axis=0).astype(float) for batch in ROUTINGS[i]]
        micro = np.array([numpy_maxvio_cv(load) for load in loads])
        maxvio_global, cv_global = numpy_maxvio_cv(np.sum(loads, axis=0))
        assert metrics[f"{name}/maxvio_micro"] == pytest.approx(micro[:, 0].mean(), rel=1e-12)
        assert metrics[f"{name}/load_cv_micro"] == pytest.approx(micro[:, 1].mean(), rel=1e-12)
        assert metrics[f"{name}/maxvio_global"] == pytest.approx(maxvio_global, rel=1e-12)
        assert metrics[f"{name}/load_cv"] == pytest.approx(cv_global, rel=1e-12)  # load_cv is the window's
        # the micro-batch means differ from the union's values on these routings
        assert metrics[f"{name}/maxvio_micro"] != pytest.approx(maxvio_global, rel=1e-3)
        # logit drift: logsumexp over experts, mean and max over tokens, and the largest logit
        x = torch.cat(logits[i]).numpy()
        lse = np.log(np.exp(x).sum(-1))
        assert metrics[f"{name}/logit_lse_mean"] == pytest.approx(lse.mean(), rel=1e-12)
        assert metrics[f"{name}/logit_lse_max"] == pytest.approx(lse.max(), rel=1e-12)
        assert metrics[f"{name}/logit_max"] == pytest.approx(x.max(), rel=1e-12)
        if TOP_K[i] == 1:  # no pair is co-routed
            assert not any("coactivation" in key for key in metrics if key.startswith(name + "/"))
            continue
        for key, value in numpy_coactivation(np.array(routed)).items():
            assert metrics[f"{name}/{key}"] == pytest.approx(value, rel=1e-12), key
    # layer 1 routes fixed pairs ({0,1}, {2,3}) far more often than layer 2
    assert metrics["router/layer1/coactivation_tv"] > metrics["router/layer2/coactivation_tv"]


def test_expert_parallel_rank_overload_matches_numpy(monkeypatch):
    metrics, _ = run_probe(monkeypatch, ep_size=2)
    for i in range(3):
        loads = np.sum([np.isin(np.arange(E), c) for batch in ROUTINGS[i] for c in batch], axis=0).astype(float)
        per_rank = loads.reshape(2, E // 2).sum(-1)  # rank r holds experts [2r, 2r + 2)
        expected = per_rank / per_rank.mean()
        assert [metrics[f"router/layer{i}/ep_overload/r{r}"] for r in range(2)] == pytest.approx(expected, rel=1e-12)
        assert metrics[f"router/layer{i}/ep_overload_max"] == pytest.approx(expected.max(), rel=1e-12)
    without, _ = run_probe(monkeypatch)
    assert not any("ep_overload" in key for key in without)  # every expert on every rank: no expert parallelism


def test_percentiles_over_layers_match_numpy_linear(monkeypatch):
    metrics, _ = run_probe(monkeypatch)
    means = {key.removeprefix("router/mean/") for key in metrics if key.startswith("router/mean/")}
    assert {"maxvio_micro", "maxvio_global", "load_cv_micro", "logit_lse_mean", "coactivation_tv"} <= means
    for stat in means:
        values = [metrics[f"router/layer{i}/{stat}"] for i in range(3) if f"router/layer{i}/{stat}" in metrics]
        for suffix, expected in (("p50", np.percentile(values, 50)), ("p90", np.percentile(values, 90))):
            assert metrics[f"router/layers/{stat}_{suffix}"] == pytest.approx(expected, rel=1e-12), (stat, suffix)
        assert metrics[f"router/layers/{stat}_max"] == max(values)


def test_micro_balance_of_an_empty_micro_batch_counts_nothing_and_coactivation_of_independent_routing():
    assert micro_balance_sums(torch.zeros(E)).tolist() == [0.0, 0.0, 0.0]
    assert micro_balance_sums(torch.tensor([3.0, 1.0, 0.0, 0.0])).tolist() == pytest.approx([1.0, 2.0, np.sqrt(1.5)])
    # every pair of 4 experts once: the pair distribution is the independent one (uniform loads)
    pairs = [[i, j] for i in range(E) for j in range(i + 1, E)]
    routed = torch.tensor([np.isin(np.arange(E), p) for p in pairs], dtype=torch.float64)
    stats = coactivation_statistics((routed.T @ routed).reshape(-1), float(len(pairs)))
    assert stats["coactivation_tv"] == pytest.approx(0.0, abs=1e-12)
    assert stats["coactivation_max_lift"] == pytest.approx((1 / 6) / (1 / 2) ** 2)

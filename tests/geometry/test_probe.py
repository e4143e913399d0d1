"""probe(view, x): values against hand computations, DDP-style additivity, edge cases, metric keys."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jacobian as autograd_jacobian

from moe_lightning.geometry import (
    ProbeConfig,
    alignment_chance,
    finalize,
    mlp_expert_jacobian,
    probe,
    probe_statistics,
    weighted_pca,
)

DT = torch.float64
D, H = 6, 9


def auto_jac(fn, x_ND):
    return torch.stack([autograd_jacobian(lambda xi: fn(xi.unsqueeze(0)).squeeze(0), x) for x in x_ND])


class ToyView:
    """Top-2 GELU-MLP MoE. ``dead`` experts are never routed; ``zero`` experts compute 0."""

    def __init__(self, num_experts=4, top_k=2, dead=(), zero=(), closed_form=True, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.name, self.module, self.num_experts, self.top_k = "blocks.0.ffn", None, num_experts, top_k
        self.router = torch.randn(D, num_experts, generator=g, dtype=DT)
        self.w = [
            (torch.randn(D, H, generator=g, dtype=DT), torch.randn(H, generator=g, dtype=DT),
             torch.randn(H, D, generator=g, dtype=DT) * (0.0 if e in zero else 1.0))
            for e in range(num_experts)
        ]  # fmt: skip
        self.dead, self.closed_form = list(dead), closed_form

    def gates(self, x):
        logits = x @ self.router
        if self.dead:
            logits = logits.index_fill(-1, torch.tensor(self.dead), -1e9)
        if self.num_experts == 1:
            return torch.ones_like(logits)
        vals, idx = logits.topk(self.top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, idx, vals.softmax(-1))

    def expert(self, e):
        w1, b1, w2 = self.w[e]
        return lambda x: F.gelu(x @ w1 + b1) @ w2

    def expert_hidden(self, e):
        w1, b1, _ = self.w[e]
        return lambda x: F.gelu(x @ w1 + b1)

    def expert_jacobian(self, e, x):
        if not self.closed_form:
            return None
        w1, b1, w2 = self.w[e]
        return mlp_expert_jacobian(x, w1, b1, w2, "gelu")


def inputs(n=40, seed=1):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=DT)


def test_probe_values_match_hand_computation():
    view, x = ToyView(), inputs()
    report = probe(view, x, ProbeConfig(subspace_rank=3))
    g = view.gates(x)
    Js = [auto_jac(view.expert(e), x) for e in range(4)]  # every expert at every token
    Jbar = []
    for e in range(4):
        rows = g[:, e] > 0
        w = g[rows, e]
        s = torch.linalg.svdvals(Js[e][rows])
        sigma_max = s[:, 0]
        mean = (w * sigma_max).sum() / w.sum()
        std = torch.sqrt((w * (sigma_max - mean) ** 2).sum() / w.sum())
        assert report.tokens[e] == rows.sum()
        assert report.n_eff[e].item() == pytest.approx((w.sum() ** 2 / (w**2).sum()).item(), rel=1e-12)
        assert report.expert["jac_sigma_max"][e].item() == pytest.approx(mean.item(), rel=1e-10)
        assert report.expert["jac_sigma_max_std"][e].item() == pytest.approx(std.item(), rel=1e-7, abs=1e-10)
        fro = (w * torch.linalg.matrix_norm(Js[e][rows])).sum() / w.sum()
        assert report.expert["jac_frobenius"][e].item() == pytest.approx(fro.item(), rel=1e-10)
        spectrum = (w.unsqueeze(-1) * s).sum(0) / w.sum()
        torch.testing.assert_close(report.spectra["jac_mean_spectrum"][e], spectrum, rtol=1e-10, atol=1e-12)
        pca = weighted_pca(x[rows], w)
        torch.testing.assert_close(report.pca["input"][e].eigenvalues, pca.eigenvalues, rtol=1e-9, atol=1e-12)
        hidden = weighted_pca(view.expert_hidden(e)(x[rows]), w)
        assert report.expert["pca_hidden_effective_rank"][e].item() == pytest.approx(hidden.effective_rank, rel=1e-9)
        Jbar.append(torch.einsum("n,nij->ij", w, Js[e][rows]) / w.sum())
    # Mean-Jacobian and pointwise alignment (docs/geometry.md §4).
    A = report.matrices["align_mean_jacobian"]
    P = report.matrices["align_pointwise"]
    for i in range(4):
        for j in range(4):
            ref = (Jbar[i] * Jbar[j]).sum().abs() / Jbar[i].norm() / Jbar[j].norm()
            assert A[i, j].item() == pytest.approx(ref.item(), rel=1e-9)
            cos = (Js[i] * Js[j]).sum((1, 2)).abs() / Js[i].norm(dim=(1, 2)) / Js[j].norm(dim=(1, 2))
            assert P[i, j].item() == pytest.approx(cos.mean().item(), rel=1e-9)
    off = ~torch.eye(4, dtype=torch.bool)
    assert report.layer["align_mean_offdiag"] == pytest.approx(A[off].mean().item(), rel=1e-12)
    assert report.layer["palign_max_offdiag"] == pytest.approx(P[off].max().item(), rel=1e-12)
    assert report.layer["align_ratio"] == pytest.approx(A[off].mean().item() / alignment_chance(D), rel=1e-12)
    # Functional subspaces: top-3 right singular vectors of J̄_e.
    V0 = torch.linalg.svd(Jbar[0])[2][:3].T.numpy()
    V1 = torch.linalg.svd(Jbar[1])[2][:3].T.numpy()
    import scipy.linalg

    theta = scipy.linalg.subspace_angles(V0, V1)
    assert report.matrices["subspace_fun_overlap"][0, 1].item() == pytest.approx(np.mean(np.cos(theta) ** 2), abs=1e-9)
    assert report.layer["subspace_overlap_chance"] == pytest.approx(3 / D)
    # Rank-r gaps (v_3 - v_4) / v_3 of each subspace's spectrum, from numpy.
    for e in range(4):
        rows = (g[:, e] > 0).numpy()
        sv = np.linalg.svd(Jbar[e].numpy(), compute_uv=False)
        assert report.expert["subspace_fun_gap"][e].item() == pytest.approx((sv[2] - sv[3]) / sv[2], rel=1e-9)
        cov = np.cov(x.numpy()[rows], rowvar=False, aweights=g[:, e].numpy()[rows], bias=True)
        lam = np.linalg.eigvalsh(cov)[::-1]
        assert report.expert["subspace_rep_gap"][e].item() == pytest.approx((lam[2] - lam[3]) / lam[2], rel=1e-8)
    assert report.variants["subspace_gap"].startswith("relative_gap_at_rank_r")

    # Layer Jacobian through the router, every token weighted 1.
    def layer(x):
        gg = view.gates(x)
        return sum(gg[:, e : e + 1] * view.expert(e)(x) for e in range(4))

    s_layer = torch.linalg.svdvals(auto_jac(layer, x))
    assert report.layer["layer_jac_sigma_max"] == pytest.approx(s_layer[:, 0].mean().item(), rel=1e-10)
    torch.testing.assert_close(report.spectra["layer_jac_mean_spectrum"], s_layer.mean(0), rtol=1e-10, atol=1e-12)
    assert report.variants["jac_effective_rank"] == "roy_vetterli_2007"
    assert report.variants["jac_source"] == "closed_form"


def test_closed_form_and_func_paths_agree():
    x = inputs()
    a = probe(ToyView(closed_form=True), x).scalars("g")
    cfg = ProbeConfig(jacobian_method="func", layer_jacobian_method="func")
    b_report = probe(ToyView(closed_form=False), x, cfg)
    assert b_report.variants["jac_source"] == "torch_func"
    b = b_report.scalars("g")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12, nan_ok=True), k


def _split_and_sum(view, x, split, cfg=None):
    """Probe two disjoint shards with a fake all-reduce that adds the other shard's statistics."""
    shards = [x[:split], x[split:]]
    stats = [probe_statistics(view, s, cfg) for s in shards]
    flats = [s.flatten() for s in stats]
    calls = []

    def fake_reduce(rank):
        def reduce_fn(t):
            calls.append((rank, tuple(t.shape), t.dtype))
            return flats[0] + flats[1]

        return reduce_fn

    reports = [probe(view, s, cfg, reduce_fn=fake_reduce(rank)) for rank, s in enumerate(shards)]
    return reports, calls, stats


@pytest.mark.parametrize("dead", [(), (3,)])
def test_sharded_probe_equals_full_probe(dead):
    view, x = ToyView(dead=dead), inputs(60)
    # Put every token that routes to expert 1 in the second shard, so expert 1 is empty on the first rank.
    g = view.gates(x)
    order = torch.argsort((g[:, 1] > 0).to(torch.int64), stable=True)
    x = x[order]
    split = int((g[:, 1] == 0).sum())
    x[2, 0] = float("inf")  # a non-finite token on one rank
    cfg = ProbeConfig(subspace_rank=2)
    full = probe(view, x, cfg)
    (r0, r1), calls, stats = _split_and_sum(view, x, split, cfg)
    assert stats[0].tensors["count"][1] == 0 and stats[1].tensors["count"][1] > 0
    # One reduce call per rank, same shape and dtype on both ranks: no DDP deadlock.
    assert len(calls) == 2 and calls[0][1:] == calls[1][1:]
    assert finalize(stats).tokens.tolist() == full.tokens.tolist()
    ref = full.scalars("geometry/blocks.0.ffn")
    for rep in (r0, r1):
        got = rep.scalars("geometry/blocks.0.ffn")
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12, nan_ok=True), k
        for k, M in full.matrices.items():
            torch.testing.assert_close(rep.matrices[k], M, rtol=1e-9, atol=1e-12, equal_nan=True)
    assert r0.nonfinite_tokens == 1


def test_empty_expert_is_flagged_with_nan_values():
    report = probe(ToyView(dead=(2,)), inputs())
    assert report.empty.tolist() == [False, False, True, False]
    assert report.tokens[2] == 0 and report.n_eff[2] == 0
    assert math.isnan(report.expert["jac_sigma_max"][2].item())
    assert math.isnan(report.expert["pca_input_effective_rank"][2].item())
    assert torch.isnan(report.spectra["jac_mean_spectrum"][2]).all()
    assert torch.isnan(report.matrices["align_mean_jacobian"][2]).all()
    assert report.pca["input"][2].undersampled
    keys = report.scalars("p")
    assert math.isnan(keys["p/jac_sigma_max/e2"])
    finite = [keys[f"p/jac_sigma_max/e{i}"] for i in (0, 1, 3)]
    assert keys["p/jac_sigma_max/mean"] == pytest.approx(sum(finite) / 3)
    assert keys["p/empty_experts"] == 1.0


def test_one_token():
    report = probe(ToyView(), inputs(1))
    assert report.tokens.sum() == 2  # top-2
    routed = report.tokens > 0
    assert torch.all(report.n_eff[routed] == 1.0)
    assert torch.all(report.expert["jac_sigma_max_std"][routed] == 0.0)
    assert report.expert["pca_input_undersampled"][routed].eq(1.0).all()
    assert report.expert["pca_input_effective_rank"][routed].eq(0.0).all()  # zero covariance


def test_subspace_rank_above_dim_is_capped():
    report = probe(ToyView(), inputs(), ProbeConfig(subspace_rank=50))
    assert report.layer["subspace_rank"] == D
    assert report.layer["subspace_overlap_chance"] == 1.0
    assert report.layer["subspace_rep_overlap"] == pytest.approx(1.0)  # r = d: the whole space
    routed = report.tokens > 0
    assert report.expert["subspace_rep_gap"][routed].eq(1.0).all()  # the whole space is always determined
    assert report.expert["subspace_fun_gap"][routed].eq(1.0).all()


def test_subspace_gap_flags_rank_deficient_inputs_and_empty_experts():
    """Inputs spanning 2 of D dims: a rank-3 representation subspace is undetermined (gap 0); dead expert: NaN."""
    x = inputs()
    x[:, 2:] = 0.0
    report = probe(ToyView(dead=(3,)), x, ProbeConfig(subspace_rank=3, layer_jacobian=False))
    assert report.expert["subspace_rep_gap"][:3].eq(0.0).all()
    assert report.expert["subspace_rep_gap"][3].isnan() and report.expert["subspace_fun_gap"][3].isnan()
    with_rank_2 = probe(ToyView(dead=(3,)), x, ProbeConfig(subspace_rank=2, layer_jacobian=False))
    assert with_rank_2.expert["subspace_rep_gap"][:3].eq(1.0).all()  # v_3 = 0 < v_2


def test_undetermined_subspaces_are_not_reported_and_one_warning_names_them():
    """Inputs spanning 2 of D dims: at rank 3 no expert's representational subspace is determined (the third
    direction would be whatever round-off picks), so none of their distances is reported and one warning says so;
    at rank 2 each is the inputs' plane, and every pair overlaps fully."""
    x = inputs()
    x[:, 2:] = 0.0
    match = r"'blocks.0.ffn': the representational subspaces of experts \[0, 1, 2\] are not determined at rank r = 3"
    with pytest.warns(RuntimeWarning, match=match):
        report = probe(ToyView(dead=(3,)), x, ProbeConfig(subspace_rank=3, layer_jacobian=False))
    assert report.matrices["subspace_rep_overlap"].isnan().all()
    assert math.isnan(report.layer["subspace_rep_overlap"]) and math.isnan(report.layer["subspace_rep_geodesic"])
    with_rank_2 = probe(ToyView(dead=(3,)), x, ProbeConfig(subspace_rank=2, layer_jacobian=False))
    torch.testing.assert_close(with_rank_2.matrices["subspace_rep_overlap"][:3, :3], torch.ones(3, 3, dtype=DT))
    assert with_rank_2.layer["subspace_rep_overlap"] == pytest.approx(1.0)


def test_nonfinite_inputs_are_dropped_and_counted():
    x = inputs()
    bad = x.clone()
    bad[0, 0], bad[5, 3], bad[7, 1] = float("nan"), float("inf"), -float("inf")
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[[0, 5, 7]] = False
    report, clean = probe(ToyView(), bad), probe(ToyView(), x[keep])
    assert report.nonfinite_tokens == 3 and report.total_tokens == len(x) - 3
    a, b = report.scalars("g"), clean.scalars("g")
    for k in b:
        if k != "g/nonfinite_tokens":
            assert a[k] == pytest.approx(b[k], rel=1e-12, nan_ok=True), k
    assert a["g/nonfinite_tokens"] == 3.0


def test_zero_jacobian_expert():
    report = probe(ToyView(zero=(1,)), inputs())
    assert report.expert["jac_effective_rank"][1].item() == 0.0
    assert report.expert["jac_sigma_max"][1].item() == 0.0
    assert torch.isnan(report.matrices["align_mean_jacobian"][1]).all()
    assert torch.isnan(report.matrices["align_pointwise"][1]).all()
    assert math.isfinite(report.layer["align_mean_offdiag"])  # the other pairs still count


def test_dense_single_expert():
    view = ToyView(num_experts=1, top_k=1)
    report = probe(view, inputs())
    assert report.tokens.tolist() == [40] and report.n_eff.item() == pytest.approx(40)
    keys = report.scalars("geometry/dense")
    assert not any("align" in k or "subspace" in k for k in keys)
    assert report.variants["align"] == "skipped_single_expert"
    J = auto_jac(view.expert(0), inputs())
    s = torch.linalg.svdvals(J)
    assert keys["geometry/dense/jac_sigma_max/e0"] == pytest.approx(s[:, 0].mean().item(), rel=1e-10)
    # For E = 1 with gate 1 the layer Jacobian is the expert Jacobian.
    assert keys["geometry/dense/layer_jac_sigma_max"] == pytest.approx(s[:, 0].mean().item(), rel=1e-10)


def test_matrix_free_path_matches_exact_sigma_max():
    view, x = ToyView(), inputs(12)
    exact = probe(view, x)
    cfg = ProbeConfig(matrix_free_threshold=4, matrix_free_rank=3, matrix_free_tol=1e-12, matrix_free_max_iter=200)
    mf = probe(view, x, cfg)
    torch.testing.assert_close(mf.expert["jac_sigma_max"], exact.expert["jac_sigma_max"], rtol=1e-6, atol=0)
    torch.testing.assert_close(
        mf.spectra["jac_mean_spectrum"], exact.spectra["jac_mean_spectrum"][:, :3], rtol=1e-6, atol=1e-12
    )
    assert mf.layer["layer_jac_sigma_max"] == pytest.approx(exact.layer["layer_jac_sigma_max"], rel=1e-6)
    # a function-only expert's Frobenius norm is estimated, and the layer's (tests/geometry/test_wide_estimates.py)
    error = (mf.expert["jac_frobenius"] - exact.expert["jac_frobenius"]).abs()
    assert bool((error < 3 * mf.expert["jac_frobenius_se"]).all())
    assert mf.variants["jac_frobenius"] == "sqrt_sum_sigma_sq_hutchinson_r16"
    layer_error = abs(mf.layer["layer_jac_frobenius"] - exact.layer["layer_jac_frobenius"])
    assert layer_error < 3 * mf.layer["layer_jac_frobenius_se"]
    assert mf.variants["layer_jac_frobenius"] == "sqrt_sum_sigma_sq_hutchinson_r16"
    assert "align_mean_offdiag" not in mf.layer and "subspace_rep_overlap" in mf.layer
    assert mf.expert["jac_unconverged"].tolist() == [0.0] * 4 and mf.layer["layer_jac_unconverged"] == 0.0
    assert "jac_unconverged" not in exact.expert and "layer_jac_unconverged" not in exact.layer


def test_matrix_free_reports_tokens_whose_spectra_did_not_converge():
    """A basis of one K-column block (11 of 32 dimensions) cannot meet tol 1e-12 (the convergence test needs values
    from two), so every routed token of every expert, and every token of the layer, is counted; the values are
    still reported."""
    from moe_lightning.adapters import find_moe_layers
    from moe_lightning.nn.layer import MoEConfig, MoELayer

    torch.manual_seed(0)
    (view,) = find_moe_layers(MoELayer(MoEConfig(dim=32, expert_hidden=48, num_experts=4, top_k=2)).double())
    x = torch.randn(12, 32, dtype=DT)
    cfg = ProbeConfig(
        matrix_free_threshold=4, matrix_free_rank=3, matrix_free_tol=1e-12, matrix_free_max_iter=1, pca=False
    )
    rep = probe(view, x, cfg)
    assert (rep.tokens > 0).any()
    torch.testing.assert_close(rep.expert["jac_unconverged"], rep.tokens.to(torch.float64))
    assert rep.layer["layer_jac_unconverged"] == 12.0
    assert torch.isfinite(rep.expert["jac_sigma_max"]).all()
    scalars = rep.scalars("geometry/l")
    assert scalars["geometry/l/jac_unconverged/e0"] == float(rep.tokens[0])
    assert scalars["geometry/l/layer_jac_unconverged"] == 12.0
    from moe_lightning.commands.probe import format_summary

    warning = format_summary({"blocks.0.ffn": rep}).splitlines()[-1]
    assert warning.startswith("warning: blocks.0.ffn: the matrix-free top values of 24 expert token(s) and 12 layer")
    converged = probe(view, x, dataclasses.replace(cfg, matrix_free_max_iter=200))
    assert "warning" not in format_summary({"blocks.0.ffn": converged})


def test_matrix_free_chunks_batch_tokens_without_changing_values(monkeypatch):
    """On the matrix-free path a chunk holds no D x D matrix, so the default budget batches all 12 tokens into one
    topr call per routed expert and one for the layer (shared GEMMs); one token per chunk gives the same values.
    The layer's calls run on its estimates' batches, each token once with the full ``matrix_free_max_iter`` or
    converged under a smaller cap where the budget holds fewer blocks for the whole batch."""
    from moe_lightning.adapters import find_moe_layers
    from moe_lightning.geometry import probe_plan
    from moe_lightning.nn.layer import MoEConfig, MoELayer

    sizes = []
    original = probe_plan.topr_singular_values

    def spy(fn, x, r, **kw):
        res = original(fn, x, r, **kw)
        # The views' closed-form operators hold their tokens; the layer's (composed) has no factors.
        layer_call = (kw["max_iter"], int(res.converged.sum()), fn.num_tokens)
        (layer if fn.factors is None else sizes).append(layer_call if fn.factors is None else fn.num_tokens)
        return res

    layer = []

    def layer_tokens_solved():
        full = kw["matrix_free_max_iter"]
        return sum(n if it == full else converged for it, converged, n in layer)

    monkeypatch.setattr(probe_plan, "topr_singular_values", spy)
    torch.manual_seed(0)
    moe = MoELayer(MoEConfig(dim=12, expert_hidden=16, num_experts=3, top_k=2, activation="swiglu")).double()
    (view,) = find_moe_layers(moe)
    x = torch.randn(12, 12, dtype=DT)
    counts = (view.gates(x) > 0).sum(0).tolist()
    kw = dict(matrix_free_threshold=4, matrix_free_rank=3, matrix_free_tol=1e-13, matrix_free_max_iter=200, pca=False)
    kw["matrix_free_products_dtype"] = None  # float64 products: the values agree to their round-off
    batched = probe(view, x, ProbeConfig(**kw))
    assert sizes == [c for c in counts if c]  # each expert's queued tokens
    assert layer == [(kw["matrix_free_max_iter"], 12, 12)]  # and the layer's batch
    sizes.clear()
    layer.clear()
    single = probe(view, x, ProbeConfig(memory_budget_bytes=1, **kw))
    assert sizes == [1] * (2 * 12)  # top-2: two expert calls per token
    assert layer == [(kw["matrix_free_max_iter"], 1, 1)] * 12  # no block of a batch fits: a layer call per token
    # Chunks of 4 tokens: an expert sees 2-3 of each chunk's tokens; its queue runs as soon as it holds 4, in
    # calls of exactly 4, and the remainder after the last chunk.
    sizes.clear()
    layer.clear()
    per_token = probe_plan._bytes_per_token(ProbeConfig(**kw), 12, 3, 3, 8, True)
    four = probe(view, x, ProbeConfig(memory_budget_bytes=4 * per_token, **kw))
    routed = [c for c in counts if c]
    remainders = [c % 4 for c in routed if c % 4]
    assert remainders  # (this routing leaves some)
    # every expert's full calls of 4, then the remainders, short, at the end
    assert sorted(sizes[: len(sizes) - len(remainders)]) == [4] * sum(c // 4 for c in routed)
    assert sorted(sizes[len(sizes) - len(remainders) :]) == sorted(remainders)
    assert layer_tokens_solved() == 12, layer
    for key in ("jac_mean_spectrum", "layer_jac_mean_spectrum"):
        torch.testing.assert_close(batched.spectra[key], single.spectra[key], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(four.spectra[key], single.spectra[key], rtol=1e-9, atol=1e-12)


def test_scalars_keys_and_max_experts():
    report = probe(ToyView(), inputs(), ProbeConfig(layer_jacobian=False, pca_sites=("input",)))
    keys = report.scalars("geometry/blocks.0.ffn", max_experts=2)
    assert "geometry/blocks.0.ffn/jac_sigma_max/e1" in keys
    assert "geometry/blocks.0.ffn/jac_sigma_max/e2" not in keys
    assert "geometry/blocks.0.ffn/jac_sigma_max/mean" in keys
    assert "geometry/blocks.0.ffn/pca_input_n90/mean" in keys
    assert not any("pca_hidden" in k or "layer_jac" in k for k in keys)
    for k in ("align_mean_offdiag", "align_chance", "palign_ratio", "subspace_fun_overlap", "subspace_rep_geodesic"):
        assert f"geometry/blocks.0.ffn/{k}" in keys
    all_e = report.scalars("g")
    assert all_e["g/jac_sigma_max/mean"] == pytest.approx(keys["geometry/blocks.0.ffn/jac_sigma_max/mean"])
    assert len([k for k in all_e if k.startswith("g/jac_sigma_max/e")]) == 4


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dtype", torch.float16),
        ("subspace_rank", 0),
        ("jacobian_method", "fast"),
        ("pca_sites", ("inputs",)),
        ("decay_fit_max", 1),
        ("memory_budget_bytes", -5),
        ("pca", "yes"),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ProbeConfig(**{field: value})


class _ModuleView:
    """A view over a float32 nn.Module with dropout, to check that probing leaves it exactly as it was."""

    def __init__(self):
        torch.manual_seed(0)
        self.module = nn.ModuleDict(
            {"router": nn.Linear(D, 2), "e0": nn.Linear(D, D), "e1": nn.Linear(D, D), "drop": nn.Dropout(0.5)}
        )
        self.module.train()
        self.name, self.num_experts = "m", 2

    def gates(self, x):
        return self.module["router"](x).softmax(-1)

    def expert(self, e):
        return lambda x: torch.tanh(self.module["drop"](self.module[f"e{e}"](x)))

    def expert_hidden(self, e):
        return None

    def expert_jacobian(self, e, x):
        return None


def test_probe_restores_module_and_computes_in_float64():
    view = _ModuleView()
    before = {k: v.clone() for k, v in view.module.state_dict().items()}
    x = torch.randn(10, D)
    rng = torch.get_rng_state()
    report = probe(view, x)
    assert view.module.training and all(m.training for m in view.module.modules())
    for k, v in view.module.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k])
    assert all(p.grad is None for p in view.module.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    # Reference in float64 with dropout off (the probe runs in eval mode): J_0 = diag(1 - tanh²(W x + b)) W.
    xd = x.double()
    w, b = view.module["e0"].weight.double(), view.module["e0"].bias.double()
    g = (xd @ view.module["router"].weight.double().T + view.module["router"].bias.double()).softmax(-1)
    J0 = (1 - torch.tanh(xd @ w.T + b) ** 2).unsqueeze(-1) * w
    s = torch.linalg.svdvals(J0)[:, 0]
    ref = (g[:, 0] * s).sum() / g[:, 0].sum()
    assert report.expert["jac_sigma_max"][0].item() == pytest.approx(ref.item(), rel=1e-10)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_matrix_free_path_uses_the_views_closed_form_operator(activation, monkeypatch):
    """Our layers offer ``expert_jacobian_operator``; on the matrix-free path it must be used (for the experts'
    spectra and, composed through the router, for the layer's), and agree with the torch.func products
    (``jacobian_method="func"``) and with the exact spectra."""
    from moe_lightning.adapters import find_moe_layers
    from moe_lightning.adapters.native import NativeMoEView
    from moe_lightning.nn.layer import MoEConfig, MoELayer

    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(dim=12, expert_hidden=16, num_experts=3, top_k=2, activation=activation)).double()
    (view,) = find_moe_layers(layer)
    x = torch.randn(20, 12, dtype=DT)
    calls = []
    original = NativeMoEView.expert_jacobian_operator

    def spy(self, e, x_ND):
        if bool(x_ND.any()):  # the probe reads the factors' shapes at one zero token first
            calls.append(e)
        return original(self, e, x_ND)

    monkeypatch.setattr(NativeMoEView, "expert_jacobian_operator", spy)
    # the products in the probe's dtype, so that the values agree with the exact path's to round-off
    kw = dict(matrix_free_threshold=4, matrix_free_rank=3, matrix_free_tol=1e-13, matrix_free_max_iter=200)
    kw["matrix_free_products_dtype"] = None
    # without the cross-expert quantities, which build each expert's factors on every token of a chunk
    with_op = probe(view, x, ProbeConfig(alignment=False, subspaces=False, **kw))
    assert sorted(calls) == [0, 1, 2]  # one build per expert: its own spectra, then reused for the layer's
    calls.clear()
    probe(view, x, ProbeConfig(alignment=False, subspaces=False, **{**kw, "matrix_free_products_dtype": "float32"}))
    assert sorted(calls) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # and the float32 products of the experts' and layer's
    calls.clear()
    func = probe(view, x, ProbeConfig(jacobian_method="func", **kw))
    assert calls == []
    exact = probe(view, x)
    for report in (with_op, func):
        torch.testing.assert_close(
            report.spectra["jac_mean_spectrum"], exact.spectra["jac_mean_spectrum"][:, :3], rtol=1e-8, atol=1e-12
        )
        torch.testing.assert_close(
            report.spectra["layer_jac_mean_spectrum"],
            exact.spectra["layer_jac_mean_spectrum"][:3],
            rtol=1e-8,
            atol=1e-12,
        )


def test_matrix_free_layer_operator_rebuilds_experts_whose_layer_rows_differ():
    """The layer's composed operator reuses the experts' own operators (built on the tokens with g_e > 0); a view
    whose expert-1 gates are negative on some tokens (outside the gate-weight contract, but a layer all the same) still
    gets that expert's products on its g_e != 0 tokens: the layer spectra equal the autograd Jacobian's."""
    from moe_lightning.adapters import find_moe_layers
    from moe_lightning.nn.layer import MoEConfig, MoELayer

    torch.manual_seed(1)
    layer = MoELayer(MoEConfig(dim=12, expert_hidden=16, num_experts=3, top_k=2, activation="swiglu")).double()
    (view,) = find_moe_layers(layer)

    def signed(x):  # expert 1's gate flips sign where x[:, 0] < 0
        g = view.gates(x)
        return torch.cat([g[:, :1], g[:, 1:2] * torch.sign(x[:, :1]), g[:, 2:]], 1)

    class SignedView:
        def __getattr__(self, name):
            return getattr(view, name)

        def gates(self, x):
            return signed(x)

    x = torch.randn(10, 12, dtype=DT)

    def layer_fn(x):
        g = signed(x)
        return sum(g[:, e : e + 1] * view.expert(e)(x) for e in range(3))

    kw = dict(matrix_free_threshold=4, matrix_free_rank=3, matrix_free_tol=1e-13, matrix_free_max_iter=200, pca=False)
    report = probe(SignedView(), x, ProbeConfig(matrix_free_products_dtype=None, **kw))
    exact = torch.linalg.svdvals(auto_jac(layer_fn, x))[:, :3].mean(0)
    torch.testing.assert_close(report.spectra["layer_jac_mean_spectrum"], exact, rtol=1e-8, atol=1e-12)
    g1 = signed(x)[:, 1]
    assert bool((g1 < 0).any()) and int(report.expert["tokens"][1]) == int((g1 > 0).sum()) > 0  # own: g_e > 0


def test_closed_form_method_requires_an_operator_on_the_matrix_free_path():
    """ToyView offers expert_jacobian but no expert_jacobian_operator: 'auto' falls back to torch.func, while
    'closed_form' must say what is missing instead of silently using torch.func."""
    kw = dict(matrix_free_threshold=4, matrix_free_rank=3, layer_jacobian=False)
    auto = probe(ToyView(), inputs(), ProbeConfig(**kw))
    assert torch.isfinite(auto.expert["jac_sigma_max"]).all()
    with pytest.raises(ValueError, match="expert_jacobian_operator"):
        probe(ToyView(), inputs(), ProbeConfig(jacobian_method="closed_form", **kw))


def test_every_chunk_sees_one_whole_frozen_context(monkeypatch):
    from moe_lightning.geometry.accumulators import Chunk, ProbeContext

    seen = []
    original = Chunk.__init__

    def recording(self, ctx, *args, **kwargs):
        seen.append(ctx)
        original(self, ctx, *args, **kwargs)

    monkeypatch.setattr(Chunk, "__init__", recording)
    cfg = ProbeConfig(bootstrap=3, memory_budget_bytes=20_000)  # small chunks, so that there are several
    stats = probe_statistics(ToyView(), inputs(), cfg)
    assert len(seen) > 1 and all(ctx is seen[0] for ctx in seen)
    ctx = seen[0]
    # pointwise alignment needs every expert's Jacobian at every token; the bootstrap's replicas are the buffer's
    assert ctx.all_token_jacobians is True
    assert dict(ctx.replicas) == dict(stats.replicas) and len(ctx.replicas) > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.replicas = {}

    def holds_context(value, depth=0):
        if isinstance(value, ProbeContext):
            return True
        if depth < 3 and isinstance(value, (list, tuple, dict)):
            items = value.values() if isinstance(value, dict) else value
            return any(holds_context(v, depth + 1) for v in items)
        return depth < 3 and hasattr(value, "__dict__") and holds_context(vars(value), depth + 1)

    # statistics outlive the probe: no accumulator keeps the context (and through it the view)
    assert not any(holds_context(acc) for acc in (stats.tokens, *stats.quantities))


def test_guarded_keeps_the_first_error_of_a_rank_under_expert_parallelism():
    from moe_lightning.geometry.accumulators import ProbeContext

    required = [f for f in dataclasses.fields(ProbeContext) if f.default is f.default_factory is dataclasses.MISSING]
    fields = {f.name: None for f in required}
    fields.update(experts=(), hidden=(), dtype=DT)
    ctx = ProbeContext(**fields, expert_group=object(), local_experts=range(0))

    def fail(message):
        raise ValueError(message)

    assert ctx.guarded(lambda: fail("first"), lambda: "fallback") == "fallback"
    assert ctx.guarded(lambda: fail("second"), lambda: 7) == 7
    assert ctx.guarded(lambda: 5, lambda: 7) == 5
    with pytest.raises(ValueError, match="^first$"):
        ctx.failure.raise_if_any()
    # without expert parallelism an error propagates at once and nothing is kept
    alone = dataclasses.replace(ctx, expert_group=None, local_experts=None, failure=type(ctx.failure)())
    with pytest.raises(ValueError, match="^third$"):
        alone.guarded(lambda: fail("third"), lambda: None)
    assert alone.failure.error is None
    alone.failure.raise_if_any()

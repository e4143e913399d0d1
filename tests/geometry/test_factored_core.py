"""The factored core's singular values (docs/geometry.md §1, "Factored experts at any width") against the SVD of
each formed Jacobian, in every shape the core takes (square, wide and reduced by a QR first, ``H ≥ D``), and the
mean Jacobian's values and top subspaces against the SVD of the formed mean."""

from dataclasses import replace

import pytest
import torch

from moe_lightning.geometry import factored, mlp_jacobian_operator, swiglu_jacobian_operator
from moe_lightning.geometry.factored import (
    factored_core_rank,
    factored_singular_values,
    mean_jacobian_gram,
    mean_jacobian_singular,
)

DT = torch.float64


def _operator(kind, d, h, tokens, seed):
    """A SwiGLU or GELU-MLP expert's closed-form operator at random weights and tokens."""
    torch.manual_seed(seed)
    x = torch.randn(tokens, d, dtype=DT)
    w_in, w_out = torch.randn(d, h, dtype=DT) / d**0.5, torch.randn(h, d, dtype=DT)
    if kind == "swiglu":
        return swiglu_jacobian_operator(x, w_in, torch.randn(d, h, dtype=DT) / d**0.5, w_out)
    return mlp_jacobian_operator(x, w_in, None, w_out, "gelu")


def _formed(op, d):
    """Every token's Jacobian formed from its products with the identity, ``(N, D, D)``."""
    eye = torch.eye(d, dtype=DT).expand(op.num_tokens, d, d)
    return op.apply(eye.contiguous())


@pytest.mark.parametrize(
    ("kind", "d", "h"),
    [
        ("swiglu", 64, 20),  # K_B = 2H = 40 > H: the wide core, reduced by a QR of each token's P
        ("swiglu", 64, 40),  # K_B = D = 64 < 2H = 80, still > H
        ("swiglu", 32, 48),  # H >= D: the core is D x D, nothing to reduce
        ("gelu", 64, 20),  # one group: K_B = H, nothing to reduce
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_core_singular_values_equal_the_formed_jacobians(kind, d, h, seed):
    op = _operator(kind, d, h, tokens=5, seed=seed)
    reference = torch.linalg.svdvals(_formed(op, d))
    got = factored_singular_values(op.factors, d)
    rank = factored_core_rank(op.factors)
    assert got.shape == reference.shape
    torch.testing.assert_close(got[:, :rank], reference[:, :rank], rtol=1e-10, atol=1e-12 * float(reference.max()))
    assert bool((got[:, rank:] == 0).all())
    if rank < d:  # the formed Jacobian's values past the rank are round-off
        assert float(reference[:, rank:].max()) < 1e-10 * float(reference.max())


@pytest.mark.parametrize(("kind", "d", "h"), [("swiglu", 64, 20), ("swiglu", 32, 48), ("gelu", 64, 20)])
def test_mean_jacobian_singular_equals_the_svd_of_the_formed_mean(kind, d, h):
    """Values and the top right singular subspaces of ``J̄ = A Σ_g diag(m_g) B_g``, reduced by a QR where the core
    is wide, against the SVD of the formed mean Jacobian (projectors compared: vectors are defined up to sign)."""
    op = _operator(kind, d, h, tokens=6, seed=3)
    weights = torch.rand(6, dtype=DT)
    mean_F = (weights[:, None] * op.factors.scales_NGH.reshape(6, -1)).sum(0) / weights.sum()
    mean_J = (weights[:, None, None] * _formed(op, d)).sum(0) / weights.sum()
    _, S_ref, Vh_ref = torch.linalg.svd(mean_J)
    S, Vh = mean_jacobian_singular(op.factors, mean_F, d)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-12 * float(S_ref[0]))
    for r in (1, 3, 5):
        torch.testing.assert_close(Vh[:r].T @ Vh[:r], Vh_ref[:r].T @ Vh_ref[:r], rtol=0, atol=1e-9)
    S_top, Vh_top = mean_jacobian_singular(op.factors, mean_F, d, top=3)  # the leading rows alone
    assert Vh_top.shape == (3, d)
    # A wide core square on the left (H < D) gives them from its Gram's eigenpairs, with the leading 4 values.
    gram_route = h < d
    shown = 4 if gram_route else d
    torch.testing.assert_close(S_top[:shown], S_ref[:shown], rtol=1e-10, atol=1e-12 * float(S_ref[0]))
    assert bool((S_top[shown:] == 0).all())
    torch.testing.assert_close(Vh_top @ Vh_top.T, torch.eye(3, dtype=DT), rtol=0, atol=1e-10)
    torch.testing.assert_close(Vh_top.T @ Vh_top, Vh_ref[:3].T @ Vh_ref[:3], rtol=0, atol=1e-9)


def test_mean_jacobian_top_vectors_of_a_degenerate_gap_take_the_svd(monkeypatch):
    """Equal 3rd and 4th singular values leave the top-3 subspace to rounding: the Gram's error bound is not met
    and the core's SVD gives the vectors (a spy counts the calls), as for every vector."""
    torch.manual_seed(0)
    d, h = 40, 10
    q_o, q_i = (torch.linalg.qr(torch.randn(n, h, dtype=DT))[0] for n in (d, d))
    sigma = torch.tensor([5.0, 4.0, 3.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.2, 0.1], dtype=DT)
    left, right = q_o * sigma, q_i.T.contiguous()
    f = replace(_operator("gelu", d, h, tokens=1, seed=0).factors, left_OH=left, rights_HI=(right,))
    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or real_svd(*a, **k))
    S, Vh = mean_jacobian_singular(f, torch.ones(h, dtype=DT), d, top=3)
    assert calls, "the SVD was not taken"
    torch.testing.assert_close(S[:h], sigma, rtol=1e-12, atol=0)
    calls.clear()
    S, Vh = mean_jacobian_singular(f, torch.ones(h, dtype=DT), d, top=2)  # a gap of 1 at rank 2: the Gram
    assert not calls
    torch.testing.assert_close(S[:3], sigma[:3], rtol=1e-12, atol=0)
    torch.testing.assert_close(Vh.T @ Vh, q_i[:, :2] @ q_i[:, :2].T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("budget", [2**30, 3 * 8 * 64 * 2])  # one block; blocks of 1 row (3 experts, I = 64)
def test_mean_jacobian_gram_of_stored_factors_equals_the_formed_means(budget):
    """The Gram of three experts' mean Jacobians (one without tokens) from factors in float32, as stored, with float64
    means: every entry equals the Gram of the formed means of the same weights cast first (the factors are cast row
    by row and promoted in the products, exactly), and one block or many give it to round-off."""
    ops = [_operator("swiglu", 64, 20, tokens=4, seed=s) for s in range(3)]
    stored = [
        replace(
            op.factors, left_OH=op.factors.left_OH.float(), rights_HI=tuple(r.float() for r in op.factors.rights_HI)
        )
        for op in ops
    ]
    means = [op.factors.scales_NGH.reshape(4, -1).mean(0) for op in ops]
    means[1] = None
    got = mean_jacobian_gram(lambda e: stored[e], means, budget)
    formed = [
        None
        if m is None
        else f.left_OH.double()
        @ sum(m_g.unsqueeze(-1) * r.double() for m_g, r in zip(m.view(2, -1), f.rights_HI, strict=True))
        for f, m in zip(stored, means, strict=True)
    ]
    for i in range(3):
        for j in range(3):
            want = 0.0 if formed[i] is None or formed[j] is None else float((formed[i] * formed[j]).sum())
            assert float(got[i, j]) == pytest.approx(want, rel=1e-12, abs=1e-12 * float(got.abs().max()))


def _formed_from_factors(f):
    """``(N, O, I)``: ``A · Σ_g diag(s_{n,g}) B_g`` formed."""
    return torch.stack(
        [f.left_OH @ sum(s_g.unsqueeze(-1) * r for s_g, r in zip(s, f.rights_HI, strict=True)) for s in f.scales_NGH]
    )


def test_ill_conditioned_tokens_of_a_wide_core_take_the_svd(monkeypatch):
    """A wide core's values come from its Gram only where its condition number is at most 1 / GRAM_MIN_RATIO: a
    token with hidden units switched nearly off (condition number ~1e10) takes the SVD, alone, and every token's
    values match the formed Jacobian's to the SVD's accuracy."""
    op = _operator("swiglu", 64, 20, tokens=4, seed=3)
    scales = op.factors.scales_NGH.clone()
    scales[1, :, :6] *= 1e-9
    f = replace(op.factors, scales_NGH=scales)
    reference = torch.linalg.svdvals(_formed_from_factors(f))
    assert float(reference[1, 19] / reference[1, 0]) < 1e-6  # the token is ill-conditioned indeed
    calls = []
    through_svd = factored._core_svdvals
    monkeypatch.setattr(factored, "_core_svdvals", lambda core, s: calls.append(s.shape[0]) or through_svd(core, s))
    got = factored_singular_values(f, 64)
    assert calls == [1]
    torch.testing.assert_close(got[:, :20], reference[:, :20], rtol=1e-10, atol=1e-12 * float(reference.max()))


def test_the_gram_alone_would_lose_an_ill_conditioned_core(monkeypatch):
    """Two nearly collinear columns of the left factor (condition number ~1e8): the Gram's values are off by
    ~1e-9 of the largest, the switch to the SVD keeps them within 1e-12."""
    op = _operator("swiglu", 64, 20, tokens=4, seed=3)
    left = op.factors.left_OH.clone()
    left[:, 0] = left[:, 1] + 1e-7 * torch.randn(64, dtype=DT, generator=torch.Generator().manual_seed(0))
    f = replace(op.factors, left_OH=left)
    reference = torch.linalg.svdvals(_formed_from_factors(f))[:, :20]
    got = factored_singular_values(f, 64)[:, :20]
    torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-12 * float(reference.max()))
    monkeypatch.setattr(factored, "GRAM_MIN_RATIO", 0.0)
    gram_only = factored_singular_values(f, 64)[:, :20]
    assert float((gram_only - reference).abs().max()) > 1e-11 * float(reference.max())

"""The probe's estimated Jacobian quantities above ``matrix_free_threshold`` (docs/geometry.md §1, "Estimated
quantities") against the exact path: each estimate lies within 3 of its own standard errors of the exact value, and
the standard errors are small and calibrated. Experts known only as token functions (a view without factors) and
factored experts of hidden width ``H ≥ D`` (no small core) take this path."""

import warnings

import pytest
import torch
from helpers import FunctionOnlyView

from moe_lightning.adapters import find_moe_layers
from moe_lightning.geometry import ProbeConfig, finalize, probe, probe_statistics
from moe_lightning.geometry.estimates import (
    hutchinson_frobenius_sq,
    lanczos_quadrature,
    slq_effective_rank,
    token_probes,
)
from moe_lightning.geometry.operators import func_jacobian_operator
from moe_lightning.geometry.spectra import effective_rank
from moe_lightning.nn.layer import MoEConfig, MoELayer

DT = torch.float64
FAST = dict(layer_jacobian=False, cka=False, pca=False, subspace_rank=3)
ESTIMATED = ("jac_frobenius", "jac_stable_rank", "jac_effective_rank")


def _layer(dim, hidden, activation, seed, tokens, num_experts=3):
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(dim=dim, expert_hidden=hidden, num_experts=num_experts, top_k=2, activation=activation))
    (view,) = find_moe_layers(layer.to(DT))
    return view, torch.randn(tokens, dim, dtype=DT)


def _z_scores(view, x, keys, **kw):
    """``(wide − exact) / se`` of each estimated key and expert, less the quadrature error where the estimate has
    one (it is systematic: the standard error does not cover it), and the relative standard errors."""
    exact = probe(view, x, ProbeConfig(**FAST, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no alignment without factors: tested below
        wide = probe(view, x, ProbeConfig(matrix_free_threshold=x.shape[1] - 1, **FAST, **kw))
    z, rel = [], []
    seen = ~exact.empty  # experts without tokens have no value (NaN) on either path
    assert bool(seen.any()) and torch.equal(seen, ~wide.empty)
    for key in keys:
        se = wide.expert[f"{key}_se"][seen]
        assert bool((se > 0).all()), key
        err = (wide.expert[key] - exact.expert[key]).abs()[seen]
        err = err - wide.expert.get(f"{key}_quadrature_error", torch.zeros(len(seen), dtype=DT))[seen]
        z.append(err.clamp_min(0) / se)
        rel.append(se / exact.expert[key][seen])
    return torch.cat(z), torch.cat(rel), wide


# One seed by default (about 4 s); the rest are slow, and the calibration test below covers the same path fast.
SEEDS = [0, *(pytest.param(seed, marks=pytest.mark.slow) for seed in range(1, 5))]


@pytest.mark.parametrize("seed", SEEDS)
def test_function_only_experts_estimates_lie_within_three_standard_errors_at_d512(seed):
    """D = 512, experts known only as functions: Hutchinson's Frobenius norm and stable rank and the SLQ effective
    rank over the whole spectrum, each within 3 of its standard errors of the exact path's value (formed 512 x 512
    Jacobians), with relative standard errors under 10 %."""
    view, x = _layer(512, 96, "gelu", seed, tokens=6)
    z, rel, wide = _z_scores(FunctionOnlyView(view), x, ESTIMATED)
    assert bool((z < 3).all()), z
    assert bool((rel < 0.1).all()), rel
    v = wide.variants
    assert v["jac_frobenius"] == "sqrt_sum_sigma_sq_hutchinson_r16"
    assert v["jac_effective_rank"] == "roy_vetterli_2007_slq_m30_s4"
    assert v["jac_stable_rank"].startswith("hutchinson_r16_")


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_factored_experts_wider_hidden_than_d_estimate_the_effective_rank_at_d512(seed):
    """D = 512, SwiGLU with H = 640 >= D (Mixtral's shape class): no small core, so the effective rank over the whole
    spectrum is estimated by SLQ within 3 standard errors (plus its quadrature error) of the exact path's, while
    the Frobenius norm stays exact (no standard error)."""
    view, x = _layer(512, 640, "swiglu", seed, tokens=4)
    z, rel, wide = _z_scores(view, x, ("jac_effective_rank",))
    assert bool((z < 3).all()), z
    assert bool((rel < 0.1).all()), rel
    assert "jac_frobenius_se" not in wide.expert and wide.variants["jac_frobenius"].endswith("_exact_factored")
    assert wide.variants["jac_effective_rank"] == "roy_vetterli_2007_slq_m30_s4_products_float32"


def test_standard_errors_are_calibrated_over_seeds():
    """Over 5 seeds, 3 experts and the three estimates of a function-only view (D = 96, quick), the standardised
    errors have a root mean square near 1: the standard errors are neither too small nor absurdly large."""
    zs = []
    for seed in range(5):
        view, x = _layer(96, 144, "swiglu", seed, tokens=8)
        exact = probe(view, x, ProbeConfig(**FAST))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            wide = probe(FunctionOnlyView(view), x, ProbeConfig(matrix_free_threshold=95, **FAST))
        for key in ("jac_frobenius", "jac_effective_rank"):
            zs.append((wide.expert[key] - exact.expert[key]) / wide.expert[f"{key}_se"])
    z = torch.cat(zs)
    rms = float(z.square().mean().sqrt())
    assert 0.4 < rms < 2.0, z


LAYER_ESTIMATED = ("layer_jac_frobenius", "layer_jac_stable_rank", "layer_jac_effective_rank")


@pytest.mark.parametrize("seed", SEEDS[:3])
@pytest.mark.parametrize("function_only", [False, True], ids=["factored", "function_only"])
def test_layer_jacobian_whole_spectrum_estimates_lie_within_three_standard_errors_at_d512(seed, function_only):
    """D = 512: the layer Jacobian through the router, a sum of experts' products with no small core, has its
    Frobenius norm, stable rank and effective rank over the whole spectrum estimated (Hutchinson, SLQ), each
    within 3 of its standard errors (plus the quadrature error) of the exact path's formed 512 x 512 Jacobians,
    with relative standard errors under 10 %; σ_max stays the converged Krylov value."""
    view, x = _layer(512, 96, "swiglu", seed, tokens=6)
    view = FunctionOnlyView(view) if function_only else view
    cfg = dict(jacobian=False, cka=False, pca=False, alignment=False, subspaces=False)
    exact = probe(view, x, ProbeConfig(**cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        wide = probe(view, x, ProbeConfig(matrix_free_threshold=511, **cfg))
    for key in LAYER_ESTIMATED:
        se = wide.layer[f"{key}_se"]
        err = abs(wide.layer[key] - exact.layer[key]) - wide.layer.get(f"{key}_quadrature_error", 0.0)
        assert 0 < se < 0.1 * exact.layer[key], key
        assert max(err, 0.0) / se < 3, (key, wide.layer[key], exact.layer[key], se)
    assert wide.layer["layer_jac_sigma_max"] == pytest.approx(exact.layer["layer_jac_sigma_max"], rel=1e-6)
    # a view that casts what it reads rounds the products in float32; another's module holds float64 copies
    products = "" if function_only else "_products_float32"
    assert wide.variants["layer_jac_frobenius"] == f"sqrt_sum_sigma_sq_hutchinson_r16{products}"
    assert wide.variants["layer_jac_effective_rank"] == f"roy_vetterli_2007_slq_m30_s4{products}"


def test_function_only_view_reports_no_alignment_and_warns_why():
    """Without factors the alignment and functional subspaces would be estimated from probes whose noise exceeds
    the chance level: they are not reported, the variants say so and a warning names the reason."""
    view, x = _layer(40, 24, "gelu", 0, tokens=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = probe(FunctionOnlyView(view), x, ProbeConfig(matrix_free_threshold=39, layer_jacobian=False))
    assert any("alignment and the functional subspaces are not reported" in str(w.message) for w in caught)
    assert "align_mean_offdiag" not in report.layer and "palign_mean_offdiag" not in report.layer
    assert "subspace_fun_overlap" not in report.layer and "subspace_rep_overlap" in report.layer
    assert report.variants["align"] == report.variants["subspace_fun"] == "unavailable_matrix_free_without_factors"


def test_estimates_of_two_shards_sum_to_one_process():
    """Each token draws its probes from its own values, so the estimates and their sums of variances are additive:
    two shards' statistics summed equal one probe of the union (the top-r values to the Krylov tolerance)."""
    view, x = _layer(40, 24, "gelu", 1, tokens=24)
    cfg = ProbeConfig(matrix_free_threshold=39, matrix_free_tol=1e-12, matrix_free_max_iter=100, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        shards = [probe_statistics(FunctionOnlyView(view), s, cfg) for s in (x[:10], x[10:])]
        whole = probe(FunctionOnlyView(view), x, cfg)
    summed = finalize(shards)
    a, b = whole.scalars("g"), summed.scalars("g")
    assert "g/jac_effective_rank_se/mean" in a and a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-7, abs=1e-10, nan_ok=True), key


def test_standard_error_of_the_mean_over_experts_adds_in_quadrature():
    view, x = _layer(40, 24, "gelu", 2, tokens=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = probe(FunctionOnlyView(view), x, ProbeConfig(matrix_free_threshold=39, **FAST))
    se = report.expert["jac_frobenius_se"]
    assert report.scalars("g")["g/jac_frobenius_se/mean"] == pytest.approx(float(se.square().sum().sqrt() / 3))


def test_hutchinson_frobenius_against_the_formed_jacobian():
    """Per token: unbiased within 4 standard errors of ``‖J‖_F²`` from the formed Jacobian, on 64 tokens, with a
    standardised error of root mean square near 1."""
    torch.manual_seed(0)
    W1, W2 = torch.randn(48, 32, dtype=DT), torch.randn(32, 48, dtype=DT)

    def fn(x):
        return torch.tanh(x @ W1) @ W2

    x = torch.randn(64, 48, dtype=DT)
    op = func_jacobian_operator(fn, x)
    est, var = hutchinson_frobenius_sq(op, token_probes(x, 16, 0, 0, DT))
    J = torch.func.vmap(torch.func.jacrev(lambda v: fn(v[None])[0]))(x)
    z = (est - J.square().sum((1, 2))) / var.sqrt()
    assert bool((z.abs() < 4).all()) and 0.6 < float(z.square().mean().sqrt()) < 1.5


def test_gauss_and_radau_bracket_the_square_root_trace_and_are_exact_once_the_space_is_spanned():
    """Gauss over- and Gauss–Radau under-estimates ``qᵀ √A q`` (derivatives of constant sign); with as many steps
    as the dimension both are exact."""
    torch.manual_seed(1)
    B = torch.randn(3, 60, 60, dtype=DT)
    A = B.transpose(1, 2) @ B  # (N, D, D) PSD with a hard edge near 0
    lam, U = torch.linalg.eigh(A)
    starts = torch.randn(3, 60, 2, dtype=DT)
    q = starts / starts.norm(dim=1, keepdim=True)
    exact = ((U.transpose(1, 2) @ q).square() * lam.clamp_min(0).sqrt().unsqueeze(-1)).sum(1)  # (N, S)

    def quad(theta, tau):
        return (tau * theta.clamp_min(0).sqrt()).sum(-1)

    tG, wG, tR, wR = lanczos_quadrature(lambda V: A @ V, starts, 10)
    assert bool((quad(tG, wG) > exact).all()) and bool((quad(tR, wR) < exact).all())
    tG, wG, tR, wR = lanczos_quadrature(lambda V: A @ V, starts, 60)
    torch.testing.assert_close(quad(tG, wG), exact, rtol=1e-8, atol=0)
    torch.testing.assert_close(quad(tR, wR), exact, rtol=1e-8, atol=0)


def test_slq_effective_rank_of_a_small_matrix_is_exact_up_to_its_starts():
    """With steps >= D the quadrature is exact, so the only error is the starts': within 3 standard errors."""
    torch.manual_seed(2)
    W = torch.randn(24, 24, dtype=DT) @ torch.diag(torch.logspace(0, -2, 24, dtype=DT))

    def fn(x):
        return x @ W.T

    x = torch.randn(5, 24, dtype=DT)
    rank, var, quad = slq_effective_rank(func_jacobian_operator(fn, x), token_probes(x, 8, 0, 0, DT), 24)
    exact = effective_rank(torch.linalg.svdvals(W))
    assert bool(((rank - exact).abs() < 3 * var.sqrt()).all())
    assert float(quad.abs().max()) < 1e-8 * float(exact)


def test_token_probes_depend_on_the_token_and_salt_only():
    x = torch.randn(4, 16, dtype=DT)
    p = token_probes(x, 3, 0, 5, DT)
    torch.testing.assert_close(token_probes(x[2:], 3, 0, 5, DT), p[2:])  # not on the batch
    assert not torch.equal(token_probes(x, 3, 0, 6, DT), p)  # another expert draws anew
    assert set(p.unique().tolist()) == {-1.0, 1.0}


def test_probe_config_needs_two_samples_for_a_standard_error():
    for name in ("matrix_free_trace_probes", "matrix_free_slq_starts"):
        with pytest.raises(ValueError, match=name):
            ProbeConfig(**{name: 1})


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_estimates_at_d1024(activation):
    view, x = _layer(1024, 192, activation, 0, tokens=4)
    z, rel, _ = _z_scores(FunctionOnlyView(view), x, ESTIMATED)
    assert bool((z < 3).all()) and bool((rel < 0.1).all()), (z, rel)


def test_float32_products_move_the_estimates_far_less_than_their_standard_errors():
    """Every matrix-free product in float32 (the default), the Krylov bases, Lanczos recurrences and sums in float64:
    at D = 512 (SwiGLU, H = 640 >= D, so the experts' spectra are matrix-free too, and the layer's) every estimate is
    within 1 % of its standard error of the same estimate with float64 products, from the same probes; the top-r
    values within the Krylov solve's rounding floor (16 float32 eps, relative) of the float64 solve's, a thousandth
    of their spread over tokens; the variants name the products' dtype."""
    view, x = _layer(512, 640, "swiglu", 0, tokens=4)
    cfg = dict(matrix_free_threshold=511, cka=False, pca=False, alignment=False, subspaces=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        single = probe(view, x, ProbeConfig(**cfg))
        double = probe(view, x, ProbeConfig(matrix_free_products_dtype=None, **cfg))
    for key in LAYER_ESTIMATED:
        shift = abs(single.layer[key] - double.layer[key])
        assert 0 < shift < 0.01 * double.layer[f"{key}_se"], (key, shift, double.layer[f"{key}_se"])
    seen = ~double.empty
    shift = (single.expert["jac_effective_rank"] - double.expert["jac_effective_rank"]).abs()[seen]
    assert bool((shift < 0.01 * double.expert["jac_effective_rank_se"][seen]).all()), shift
    floor = 16 * torch.finfo(torch.float32).eps
    for prefix, one, two in (("layer_jac", single.layer, double.layer), ("jac", single.expert, double.expert)):
        for stat in ("sigma_max", "decay_slope"):
            a, b = torch.as_tensor(one[f"{prefix}_{stat}"]), torch.as_tensor(two[f"{prefix}_{stat}"])
            a, b, spread = a[seen] if a.dim() else a, b[seen] if b.dim() else b, two[f"{prefix}_{stat}_std"]
            spread = torch.as_tensor(spread)[seen] if torch.as_tensor(spread).dim() else torch.as_tensor(spread)
            assert bool(((a - b).abs() <= floor * b.abs()).all()), (prefix, stat, a, b)
            assert bool(((a - b).abs() < 1e-3 * spread).all()), (prefix, stat, a - b, spread)
            assert single.variants[f"{prefix}_{stat}"].endswith("_products_float32")
            assert not double.variants[f"{prefix}_{stat}"].endswith("_products_float32")
        spectrum = f"{prefix}_mean_spectrum"
        torch.testing.assert_close(single.spectra[spectrum], double.spectra[spectrum], rtol=floor, atol=0)
    assert single.variants["layer_jac_effective_rank"].endswith("_products_float32")
    assert single.variants["layer_jac_stable_rank"].endswith("_products_float32")
    assert double.variants["layer_jac_effective_rank"] == "roy_vetterli_2007_slq_m30_s4"
    # The exact Frobenius norms of the factored experts do not change with it.
    assert single.expert["jac_frobenius"].equal(double.expert["jac_frobenius"])


@pytest.mark.parametrize("products_dtype", [None, torch.float32])
def test_layer_estimates_batch_tokens_of_several_chunks_without_changing_values(products_dtype, monkeypatch):
    """The layer Jacobian's estimates run on the tokens of several chunks at once (``estimate_batch``, which the
    memory budget sets apart from the chunk): with a budget that gives chunks of a few tokens and batches of more,
    the estimates run on whole chunks queued until a batch is full, the rest at the end, and every estimate and
    standard error equals the one-chunk probe's (each token draws its own probes)."""
    from moe_lightning.geometry.accumulators import layer_jacobian
    from moe_lightning.geometry.probe_plan import probe_context

    sizes = []
    original = layer_jacobian.whole_spectrum_statistics

    def spy(op, x_ND, *args, **kw):
        sizes.append(x_ND.shape[0])
        return original(op, x_ND, *args, **kw)

    monkeypatch.setattr(layer_jacobian, "whole_spectrum_statistics", spy)

    view, x = _layer(40, 24, "swiglu", 0, tokens=40, num_experts=4)
    cfg = dict(matrix_free_threshold=39, jacobian=False, cka=False, pca=False, alignment=False, subspaces=False)
    cfg["matrix_free_products_dtype"] = products_dtype
    whole = probe(view, x, ProbeConfig(**cfg))
    small = ProbeConfig(memory_budget_bytes=2**20, **cfg)
    ctx = probe_context(view, x, small, None, None)
    assert 1 < ctx.chunk_size < ctx.estimate_batch < x.shape[0] // 2, (ctx.chunk_size, ctx.estimate_batch)
    sizes.clear()
    batched = probe(view, x, small)
    chunk, batch = ctx.chunk_size, ctx.estimate_batch
    per_batch = -(-batch // chunk) * chunk  # whole chunks until the batch is full
    n = x.shape[0]
    assert sizes == [per_batch] * (n // per_batch) + ([n % per_batch] if n % per_batch else []), sizes
    rel = 1e-9 if products_dtype is None else 1e-5
    for key in (*LAYER_ESTIMATED, "layer_jac_sigma_max"):
        for suffix in ("", "_std", "_se") if key in LAYER_ESTIMATED else ("", "_std"):
            assert batched.layer[key + suffix] == pytest.approx(whole.layer[key + suffix], rel=rel), key + suffix


@pytest.mark.parametrize("fits", [2, 1, 0])
def test_layer_top_values_of_a_batch_over_the_budget_are_solved_again_in_full(fits, monkeypatch):
    """The layer Jacobian's top-``r`` values run on the estimates' token batch with as many Krylov blocks as the
    budget holds for all its tokens: where that is fewer than ``matrix_free_max_iter`` (two blocks here, which span
    the whole space; one; or none), the tokens not converged by then are solved again with the full
    ``matrix_free_max_iter`` a chunk at a time, and the report equals the one whose batch holds the full basis."""
    from moe_lightning.geometry import probe_plan
    from moe_lightning.geometry.accumulators import layer_jacobian
    from moe_lightning.geometry.krylov import SMALL_BLOCK

    view, x = _layer(40, 24, "swiglu", 1, tokens=24, num_experts=4)
    cfg = ProbeConfig(matrix_free_threshold=39, jacobian=False, cka=False, pca=False, alignment=False, subspaces=False)
    full = probe(view, x, cfg)
    calls = []
    solve = probe_plan.topr_singular_values

    def spy(op, x_ND, r, **kw):
        res = solve(op, x_ND, r, **kw)
        calls.append((op.num_tokens, kw["max_iter"], int(res.converged.sum())))
        assert kw["block_size"] == (SMALL_BLOCK if kw["max_iter"] < cfg.matrix_free_max_iter else None)
        return res

    monkeypatch.setattr(probe_plan, "topr_singular_values", spy)

    def fitting(d, k, iters, *sizes):  # the budget holds ``fits`` blocks of the batch's tokens and no more
        return 0 if iters <= fits and sizes[-1] == SMALL_BLOCK else 2**60

    monkeypatch.setattr(layer_jacobian, "krylov_bytes_per_token", fitting)
    capped = probe(view, x, cfg)
    ctx = probe_plan.probe_context(view, x, cfg, None, None)
    assert ctx.estimate_batch >= x.shape[0]  # one batch of every token
    first = [fits] if fits else []
    assert [it for _, it, _ in calls] == first + [cfg.matrix_free_max_iter] * (len(calls) - len(first)), calls
    if fits:  # every token converges in a basis that spans the space; some miss a smaller one
        assert calls[0][0] == x.shape[0] and (calls[0][2] == x.shape[0]) == (fits == 2), calls
    assert sum(n for n, _, _ in calls[len(first) :]) == x.shape[0] - (calls[0][2] if fits else 0), calls
    assert all(converged == n <= ctx.chunk_size for n, _, converged in calls[len(first) :]), calls
    assert capped.layer["layer_jac_unconverged"] == 0
    for key in ("layer_jac_sigma_max", "layer_jac_sigma_max_std", "layer_jac_decay_slope"):
        assert capped.layer[key] == pytest.approx(full.layer[key], rel=1e-5), key
    torch.testing.assert_close(capped.spectra["layer_jac_mean_spectrum"], full.spectra["layer_jac_mean_spectrum"])

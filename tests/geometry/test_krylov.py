"""Matrix-free top-r singular values (docs/geometry.md §1) against the exact SVD."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian as autograd_jacobian

from moe_lightning.geometry import swiglu_expert_jacobian, topr_singular_values
from moe_lightning.geometry.krylov import _extrapolated_converged
from moe_lightning.geometry.operators import (
    _COLUMN_LAYOUT_MIN,
    _columns_layout,
    func_jacobian_operator,
    mlp_jacobian_operator,
    swiglu_jacobian_operator,
)

DT = torch.float64


@pytest.mark.parametrize(("method", "products"), [("krylov", "func"), ("subspace", "func"), ("krylov", "closed_form")])
def test_topr_matches_exact_on_random_swiglu_expert(method, products):
    """Through torch.func (the function itself) and through the closed-form operator."""
    gen = torch.Generator().manual_seed(0)
    D, H, N, r = 160, 320, 3, 6
    w_gate, w_up = (
        torch.randn(D, H, generator=gen, dtype=DT) / D**0.5,
        torch.randn(D, H, generator=gen, dtype=DT) / D**0.5,
    )
    w_down = torch.randn(H, D, generator=gen, dtype=DT) / H**0.5
    x = torch.randn(N, D, generator=gen, dtype=DT)

    def expert(x):
        return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down

    exact = torch.linalg.svdvals(swiglu_expert_jacobian(x, w_gate, w_up, w_down))[:, :r]
    fn = expert if products == "func" else swiglu_jacobian_operator(x, w_gate, w_up, w_down)
    res = topr_singular_values(fn, x, r, oversample=10, max_iter=300, tol=1e-12, return_vectors=True, method=method)
    assert res.converged.all() and res.iterations < 300
    if method == "krylov":
        assert res.iterations * 16 < D  # converged before the Krylov basis filled the space
    torch.testing.assert_close(res.values, exact, rtol=1e-6, atol=0)
    # The residual estimate bounds the actual error.
    assert ((res.values - exact).abs() <= res.error_estimate + 1e-12).all()
    assert (res.error_estimate / exact < 1e-4).all()
    assert res.right_vectors.shape == (N, D, r)


@pytest.mark.parametrize("method", ["krylov", "subspace"])
def test_float32_batches_stop_at_the_rounding_floor(method):
    """A tolerance below float32's resolution is floored (16·eps) and convergence is latched per token, so a batch
    of tokens stops instead of chasing rounding noise to max_iter, and its values are as good as float32 allows."""
    gen = torch.Generator().manual_seed(3)
    D, H, N, r = 256, 512, 8, 4
    w_gate, w_up = (torch.randn(D, H, generator=gen) / D**0.5 for _ in range(2))
    w_down = torch.randn(H, D, generator=gen) / H**0.5
    x = torch.randn(N, D, generator=gen)
    op = swiglu_jacobian_operator(x, w_gate, w_up, w_down)
    res = topr_singular_values(op, None, r, oversample=4, max_iter=200, tol=1e-12, method=method)
    assert res.converged.all() and res.iterations < 200
    J64 = swiglu_expert_jacobian(x.double(), w_gate.double(), w_up.double(), w_down.double())
    exact = torch.linalg.svdvals(J64)[:, :r]
    torch.testing.assert_close(res.values.double(), exact, rtol=2e-5, atol=0)


def test_extrapolated_stop_rule_on_hand_made_sequences():
    """Aitken's geometric tail of the last three changes, by hand: values 1 - 2^-j have changes 2^-11, 2^-12, 2^-13
    (ratio 1/2), so the change still to come is 2^-13 = 1.22e-4 of the last value 1 - 2^-13."""
    last4 = [torch.full((1, 2), 1 - 2.0**-j, dtype=DT) for j in (10, 11, 12, 13)]
    tail = 2.0**-13 / (1 - 2.0**-13)
    assert _extrapolated_converged(last4, tail * 1.001, 1e-15).tolist() == [True]
    assert _extrapolated_converged(last4, tail * 0.999, 1e-15).tolist() == [False]

    def run(changes, tol=1e-3, noise=1e-15):
        values = [torch.tensor([[1.0]], dtype=DT)]
        for c in changes:
            values.append(values[-1] + c)
        return _extrapolated_converged(values, tol, noise).item()

    assert not run([1e-9, 1e-9, 1e-9])  # a stall: ratio 1, no geometric tail to trust
    assert not run([1e-9, 2e-9, 4e-9])  # growing changes
    assert not run([0.0, 1e-9, 1e-10])  # a change after none: ratio inf
    assert run([0.0, 0.0, 0.0])  # no change at all
    assert run([1e-9, 2e-9, 1e-12], noise=1e-11)  # the last change is rounding noise
    assert not run([1e-9, 2e-9, 1e-12], noise=1e-13)
    # per token: the second token's first value stalls
    a = torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=DT)
    steps = torch.tensor([[[1e-4, 1e-4], [1e-4, 1e-4]], [[1e-5, 1e-5], [1e-4, 1e-5]], [[1e-6, 1e-6], [1e-4, 1e-6]]])
    last4 = [a, a + steps[0], a + steps[:2].sum(0), a + steps.sum(0)]
    assert _extrapolated_converged(last4, 1e-6, 1e-15).tolist() == [True, False]


def _random_swiglu(seed, D, H, N):
    """Random float64 SwiGLU weights (variance-preserving scales) and N tokens."""
    gen = torch.Generator().manual_seed(seed)
    w_gate, w_up = (torch.randn(D, H, generator=gen, dtype=DT) / D**0.5 for _ in range(2))
    w_down = torch.randn(H, D, generator=gen, dtype=DT) / H**0.5
    return w_gate, w_up, w_down, torch.randn(N, D, generator=gen, dtype=DT)


@pytest.mark.parametrize("tol", [1e-4, 1e-8])
def test_krylov_values_are_within_tol_when_it_stops(tol):
    """The extrapolated stop ends a run early, never before the values are within ``tol`` of the exact ones
    (16 tokens, blocks of 4: values compared every 4 columns; float64, so ``tol`` is not floored)."""
    D, H, N, r = 96, 256, 16, 8
    w_gate, w_up, w_down, x = _random_swiglu(5, D, H, N)
    res = topr_singular_values(swiglu_jacobian_operator(x, w_gate, w_up, w_down), None, r, tol=tol)
    exact = torch.linalg.svdvals(swiglu_expert_jacobian(x, w_gate, w_up, w_down))[:, :r]
    assert res.converged.all() and res.basis_columns < D
    assert ((res.values - exact).abs() / exact).max() <= tol


def test_topr_caps_r_and_handles_zero_jacobian():
    x = torch.randn(3, 5, dtype=DT)
    res = topr_singular_values(lambda x: 0.0 * x, x, 10)
    assert res.values.shape == (3, 5)
    assert (res.values == 0).all() and res.converged.all()
    W = torch.randn(7, 5, dtype=DT)
    res = topr_singular_values(lambda x: x @ W.T, x, 2, oversample=0, max_iter=1)
    assert res.iterations == 1 and res.values.shape == (3, 2)
    assert (res.error_estimate >= 0).all()


def test_topr_does_not_touch_global_rng():
    x = torch.randn(2, 4, dtype=DT)
    state = torch.get_rng_state()
    topr_singular_values(torch.tanh, x, 2)
    assert torch.equal(state, torch.get_rng_state())


def _autograd_jacobians(fn, x_ND):
    """Per-token torch.autograd.functional.jacobian: the independent reference."""
    return torch.stack([autograd_jacobian(lambda xi: fn(xi.unsqueeze(0)).squeeze(0), x) for x in x_ND])


def _expert_and_operator(kind, dtype=DT):
    """An expert (drawn in float64, then cast to ``dtype``), its tokens and its closed-form operator."""
    gen = torch.Generator().manual_seed(3)
    D, H, N = 9, 13, 4

    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=DT).to(dtype)

    x = draw(N, D)
    if kind == "swiglu":
        w_gate, w_up = draw(D, H), draw(D, H)
        w_down = draw(H, D + 2)  # D_out != D_in checks the transposes

        def fn(x):
            return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down

        return fn, x, swiglu_jacobian_operator(x, w_gate, w_up, w_down)
    w_in, b_in = draw(D, H), draw(H)
    w_out = draw(H, D + 2)
    act = {"gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh}[kind]

    def fn(x):
        return act(x @ w_in + b_in) @ w_out

    return fn, x, mlp_jacobian_operator(x, w_in, b_in, w_out, kind)


@pytest.mark.parametrize("kind", ["gelu", "relu", "tanh", "swiglu", "func"])
def test_operators_equal_products_with_the_autograd_jacobian(kind):
    fn, x, op = _expert_and_operator("gelu" if kind == "func" else kind)
    if kind == "func":
        op = func_jacobian_operator(fn, x)
    J = _autograd_jacobians(fn, x)  # (N, D_out, D_in)
    N, d_out, d_in = J.shape
    assert (op.num_tokens, op.d_in, op.d_out) == (N, d_in, d_out)
    gen = torch.Generator().manual_seed(4)
    for k in (2, 5):
        V = torch.randn(N, d_in, k, generator=gen, dtype=DT)
        U = torch.randn(N, d_out, k, generator=gen, dtype=DT)
        torch.testing.assert_close(op.apply(V), J @ V, rtol=0, atol=1e-12)
        torch.testing.assert_close(op.apply_transpose(U), J.transpose(1, 2) @ U, rtol=0, atol=1e-12)
    if kind == "func":
        return
    # float32 on CPU: 4 tokens x 2 columns multiply (N·K, D) rows into the weights, x 5 the weights into (D, N·K)
    # columns (from _COLUMN_LAYOUT_MIN = 16 columns on; float64 always uses rows)
    assert N * 2 < _COLUMN_LAYOUT_MIN <= N * 5
    assert _columns_layout(N * 5, x.float()) and not _columns_layout(N * 5, x) and not _columns_layout(N * 2, x.float())
    _, x32, op32 = _expert_and_operator(kind, torch.float32)
    torch.testing.assert_close(x32, x.float())  # the same expert, in float32
    for k in (2, 5):
        V = torch.randn(N, d_in, k, generator=gen, dtype=DT)
        U = torch.randn(N, d_out, k, generator=gen, dtype=DT)
        for got, want in ((op32.apply(V.float()), J @ V), (op32.apply_transpose(U.float()), J.transpose(1, 2) @ U)):
            torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4 * float(want.abs().max()))


def test_func_operator_falls_back_to_jvp_when_linearize_cannot_trace():
    """``float(...)`` reads a value out of the tensor, which make_fx tracing (linearize) refuses; jvp copes."""
    x = torch.randn(3, 4, dtype=DT)
    W = torch.randn(4, 4, dtype=DT)
    scale = float(x.abs().max())

    def fn(x):
        return (x @ W) * float(x.detach().abs().max())  # the float is a constant to autodiff

    op = func_jacobian_operator(fn, x)
    V = torch.randn(3, 4, 2, dtype=DT)
    torch.testing.assert_close(op.apply(V), scale * (W.T @ V), rtol=0, atol=1e-12)
    torch.testing.assert_close(op.apply_transpose(V), scale * (W @ V), rtol=0, atol=1e-12)


def test_topr_rejects_a_function_without_tokens():
    with pytest.raises(ValueError, match="x_ND"):
        topr_singular_values(torch.tanh, None, 2)


@pytest.mark.parametrize(("routing", "activation"), [("topk", "gelu"), ("topk", "swiglu"), ("soft", "gelu")])
def test_composed_layer_operator_equals_products_with_the_autograd_layer_jacobian(routing, activation):
    """J = Σ g_e J_e + Σ f_e ∇g_eᵀ through the router, products only, against autograd of the whole layer."""
    from moe_lightning.adapters import find_moe_layers
    from moe_lightning.geometry import compose_layer_operator, jacobians
    from moe_lightning.nn.layer import MoEConfig, MoELayer

    torch.manual_seed(0)
    cfg = MoEConfig(dim=10, expert_hidden=12, num_experts=4, top_k=2, routing=routing, activation=activation)
    (view,) = find_moe_layers(MoELayer(cfg).double())
    x = torch.randn(6, 10, dtype=DT)

    def layer(x):
        g = view.gates(x)
        return sum(g[:, e : e + 1] * view.expert(e)(x) for e in range(4))

    with torch.no_grad():
        g = view.gates(x)
        parts = []
        for e in range(4):
            rows = g[:, e] != 0
            parts.append((rows, view.expert_jacobian_operator(e, x[rows]) if rows.any() else None))
        op = compose_layer_operator(g, jacobians(view.gates, x), [view.expert(e)(x) for e in range(4)], parts)
    J = _autograd_jacobians(layer, x)
    if routing == "topk":
        assert sum(int(rows.sum()) for rows, _ in parts) == 2 * 6  # each expert's products on its own tokens
    V = torch.randn(6, 10, 3, dtype=DT)
    torch.testing.assert_close(op.apply(V), J @ V, rtol=0, atol=1e-12)
    torch.testing.assert_close(op.apply_transpose(V), J.mT @ V, rtol=0, atol=1e-12)


def _counting(op):
    """``op`` with every ``apply``'s column count recorded (block columns over all tokens)."""
    from moe_lightning.geometry.operators import JacobianOperator

    widths = []

    def apply(V):
        widths.append(V.shape[-1])
        return op.apply(V)

    counted = JacobianOperator(
        apply, op.apply_transpose, op.num_tokens, op.d_in, op.d_out, op.dtype, op.device, op.gemm_tokens
    )
    return counted, widths


def test_composed_operator_blocks_fill_the_experts_gemms():
    """A top-2-of-4 layer operator runs each expert on ~half the tokens, so the default Krylov block is chosen for
    the experts' mean routed tokens (``gemm_tokens``), not for the layer's 6, and the values stay exact."""
    from moe_lightning.adapters import find_moe_layers
    from moe_lightning.geometry import compose_layer_operator, jacobians
    from moe_lightning.nn.layer import MoEConfig, MoELayer

    torch.manual_seed(0)
    (view,) = find_moe_layers(MoELayer(MoEConfig(dim=40, expert_hidden=24, num_experts=4, top_k=2)).double())
    x = torch.randn(6, 40, dtype=DT)
    with torch.no_grad():
        g = view.gates(x)
        parts = [(g[:, e] != 0, view.expert_jacobian_operator(e, x[g[:, e] != 0])) for e in range(4)]
        op = compose_layer_operator(g, jacobians(view.gates, x), [view.expert(e)(x) for e in range(4)], parts)
    active = [int(rows.sum()) for rows, _ in parts if rows.any()]
    assert op.gemm_tokens == sum(active) // len(active) < 6
    counted, widths = _counting(op)
    res = topr_singular_values(counted, None, 2, oversample=8, tol=1e-12, max_iter=20)
    assert widths[0] == min(10, -(-32 // op.gemm_tokens)) > -(-32 // 6)  # K = 10 caps it; 6 tokens would give 6
    J = torch.stack(
        [torch.autograd.functional.jacobian(lambda v: view.module(v.view(1, 1, -1))[0].view(-1), xi) for xi in x]
    )
    torch.testing.assert_close(res.values, torch.linalg.svdvals(J)[:, :2], rtol=1e-9, atol=0)


@pytest.mark.parametrize("block_size", [None, 1, 2, 16])
def test_krylov_block_sizes_match_exact_and_small_blocks_need_fewer_columns(block_size):
    """Any block size gives the exact top-r values; a batch of 8 tokens defaults to blocks of 4 columns, and on this
    flat random spectrum the smaller blocks converge with fewer product columns than blocks of K = r + p."""
    D, H, N, r = 200, 400, 8, 6
    w_gate, w_up, w_down, x = _random_swiglu(5, D, H, N)
    exact = torch.linalg.svdvals(swiglu_expert_jacobian(x, w_gate, w_up, w_down))[:, :r]
    columns = {}
    for b in (block_size, 16):
        op, widths = _counting(swiglu_jacobian_operator(x, w_gate, w_up, w_down))
        res = topr_singular_values(op, None, r, oversample=10, max_iter=100, tol=1e-10, block_size=b)
        assert res.converged.all()
        torch.testing.assert_close(res.values, exact, rtol=1e-8, atol=0)
        assert ((res.values - exact).abs() <= res.error_estimate + 1e-12).all()
        assert widths[-1] == r  # the residual's products; every block before it is b columns wide
        assert set(widths[:-2]) == {b or 4}
        columns[b] = sum(widths[:-1])
        assert res.basis_columns == columns[b]
    assert columns[block_size] < D  # converged before the basis filled the space
    if block_size != 16:
        assert columns[block_size] < columns[16]


@pytest.mark.parametrize("block_size", [None, 12])
def test_krylov_finds_a_repeated_top_value(block_size):
    """J = U diag(s) Vᵀ with a six-fold top singular value, r = 8: blocks of K = r + p = 12 >= 6 columns see every
    copy at once; the default blocks of 4 (8 tokens) get the other copies from rounding, later."""
    gen = torch.Generator().manual_seed(6)
    D = 40
    U = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=DT))[0]
    V = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=DT))[0]
    s = torch.cat([torch.full((6,), 5.0, dtype=DT), torch.linspace(3.0, 0.1, D - 6, dtype=DT)])
    W = U @ torch.diag(s) @ V.T
    x = torch.zeros(8, D, dtype=DT)
    res = topr_singular_values(lambda x: x @ W.T, x, 8, oversample=4, block_size=block_size, tol=1e-12)
    torch.testing.assert_close(res.values, s[:8].expand(8, 8), rtol=1e-10, atol=0)


@pytest.mark.parametrize("block_size", [0, -1, 2.5])
def test_topr_rejects_a_bad_block_size(block_size):
    with pytest.raises(ValueError, match="block_size must be None or an int >= 1"):
        topr_singular_values(torch.tanh, torch.zeros(2, 3), 2, block_size=block_size)


def test_krylov_basis_grows_past_its_first_allocation():
    """r = 1, no oversampling: blocks of one column and a first allocation of 8 columns, which a random 60 x 60
    matrix's top singular value outgrows (the basis storage doubles); the value is still exact."""
    gen = torch.Generator().manual_seed(7)
    W = torch.randn(60, 60, generator=gen, dtype=DT)
    x = torch.zeros(2, 60, dtype=DT)
    res = topr_singular_values(lambda x: x @ W.T, x, 1, oversample=0, max_iter=200, tol=1e-13)
    assert res.converged.all() and 16 < res.basis_columns <= 60
    torch.testing.assert_close(res.values, torch.linalg.svdvals(W)[:1].expand(2, 1), rtol=1e-12, atol=0)

"""Exact per-token Jacobians: torch.func, closed forms for MLP / SwiGLU experts, and the layer Jacobian.

Shape legend: ``N`` tokens, ``E`` experts, ``D`` model dim (``D_in``/``D_out`` where they may differ), ``H``
expert hidden width. A *row-wise function* maps ``(n, D_in) -> (n, D_out)`` with output row ``i`` depending on
input row ``i`` only (every expert, gate function and MoE layer is one). Weight layout is the model's stacked
expert layout sliced to one expert: ``w_in`` is ``(D, H)`` and ``w_out`` is ``(H, D)``, i.e. ``f(x) = φ(x @ w_in
+ b_in) @ w_out``.

Definitions: docs/geometry.md §1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import jacfwd, jacrev, vmap

from moe_lightning.geometry.activations import activation_derivative, silu_derivative
from moe_lightning.geometry.view import MoEView

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "compose_layer_jacobian",
    "expert_jacobian",
    "jacobians",
    "layer_jacobian",
    "mlp_expert_jacobian",
    "swiglu_expert_jacobian",
]

RowFn = Callable[[Tensor], Tensor]

#: Default peak-memory budget of one Jacobian chunk (256 MiB).
DEFAULT_MEMORY_BUDGET_BYTES: int = 256 * 2**20

_JACOBIAN_MODES = ("auto", "jacfwd", "jacrev")
_LAYER_METHODS = ("auto", "func", "compose")


def _check_budget(memory_budget_bytes: int) -> None:
    if not isinstance(memory_budget_bytes, int) or memory_budget_bytes <= 0:
        raise ValueError(f"memory_budget_bytes must be a positive int, got {memory_budget_bytes!r}")


def _chunk_size(bytes_per_token: int, memory_budget_bytes: int) -> int:
    return max(1, memory_budget_bytes // max(1, bytes_per_token))


def _per_token(fn: RowFn) -> Callable[[Tensor], Tensor]:
    """Turn a row-wise batched function into a function of one token ``(D_in,) -> (D_out,)``."""
    return lambda x_D: fn(x_D.unsqueeze(0)).squeeze(0)


def jacobians(
    fn: RowFn,
    x_ND: Tensor,
    *,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    mode: str = "auto",
) -> Tensor:
    """Exact Jacobian of a row-wise function at every token, by ``torch.func`` (docs/geometry.md §1).

    ``vmap`` over tokens of ``jacfwd`` or ``jacrev``. ``"auto"`` picks the cheaper one for the shape: forward mode
    costs one JVP per input dimension and reverse mode one VJP per output dimension, so it takes ``jacfwd`` when
    ``D_in < D_out`` and ``jacrev`` otherwise. Tokens run in chunks so that a chunk's Jacobians and
    intermediates (estimated as 4 Jacobian-sized tensors per token) stay within ``memory_budget_bytes``.

    Args:
        fn: row-wise function ``(n, D_in) -> (n, D_out)``; one that ``vmap`` cannot batch (``.item()``,
            ``one_hot``, data-dependent branches) runs one token at a time.
        x_ND: ``(N, D_in)`` tokens.
        memory_budget_bytes: peak-memory budget of one chunk.
        mode: ``"auto"``, ``"jacfwd"`` or ``"jacrev"``.

    Returns:
        ``(N, D_out, D_in)`` Jacobians, ``J[n, i, j] = ∂fn(x)[n, i] / ∂x[n, j]``.

    Example:
        >>> lin = torch.nn.Linear(3, 2).double()
        >>> J = jacobians(lin, torch.randn(5, 3, dtype=torch.float64))
        >>> J.shape, torch.allclose(J[0], lin.weight)
        (torch.Size([5, 2, 3]), True)
    """
    if mode not in _JACOBIAN_MODES:
        raise ValueError(f"jacobians: mode must be one of {_JACOBIAN_MODES}, got {mode!r}")
    _check_budget(memory_budget_bytes)
    if x_ND.dim() != 2:
        raise ValueError(f"jacobians: x_ND must be 2-D (N, D), got shape {tuple(x_ND.shape)}")
    n, d_in = x_ND.shape
    with torch.no_grad():
        d_out = fn(x_ND[:1] if n else torch.zeros(1, d_in, dtype=x_ND.dtype, device=x_ND.device)).shape[-1]
    if n == 0:
        return x_ND.new_zeros(0, d_out, d_in)
    if mode == "auto":
        mode = "jacfwd" if d_in < d_out else "jacrev"
    transform = jacfwd if mode == "jacfwd" else jacrev
    one_token = transform(_per_token(fn))
    jac_fn = vmap(one_token)
    chunk = _chunk_size(4 * d_out * d_in * x_ND.element_size(), memory_budget_bytes)
    try:
        return torch.cat([jac_fn(x_ND[i : i + chunk]) for i in range(0, n, chunk)], dim=0)
    except RuntimeError as error:
        if "vmap" not in str(error):
            raise
    # A function vmap cannot batch (other libraries' routers: one_hot, .item(), data-dependent branches) is
    # differentiated one token at a time; the Jacobian is the same, only slower.
    return torch.stack([one_token(x_D) for x_D in x_ND])


# ---------------------------------------------------------------------------------------------------------------
# Closed forms (docs/geometry.md §1)
# ---------------------------------------------------------------------------------------------------------------


#: Target size of the per-chunk scratch of the closed forms on CPU: the scaled weight of a chunk is written and
#: read back by the GEMM at once, so a chunk whose scratch stays cache-sized (4 MiB fits a server CPU's last-level
#: cache with room to spare) is read back from cache rather than memory. See docs/benchmarks/geometry.md.
_CPU_SCRATCH_BYTES: int = 4 * 2**20


def _closed_form_chunks(x_ND: Tensor, scratch_bytes_per_token: int, memory_budget_bytes: int):
    """Token ranges ``(start, stop)`` for a closed form: cache-sized scratch on CPU, budget-sized elsewhere."""
    _check_budget(memory_budget_bytes)
    budget = memory_budget_bytes
    if x_ND.device.type == "cpu":
        budget = min(budget, _CPU_SCRATCH_BYTES)
    n = x_ND.shape[0]
    chunk = _chunk_size(scratch_bytes_per_token, budget)
    return [(i, min(n, i + chunk)) for i in range(0, n, chunk)], chunk


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def mlp_expert_jacobian(
    x_ND: Tensor,
    w_in_DH: Tensor,
    b_in_H: Tensor | None,
    w_out_HD: Tensor,
    activation: str | Callable[[Tensor], Tensor] = "gelu",
    *,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> Tensor:
    """Closed-form Jacobian of an MLP expert ``f(x) = φ(x @ w_in + b_in) @ w_out (+ b_out)`` (docs/geometry.md §1).

    ``J(x) = w_outᵀ diag(φ'(z)) w_inᵀ`` with ``z = x @ w_in + b_in``: ``2·D_out·H·D_in`` flops per token, the
    least any method forming ``J`` can do (each of the ``D_out·D_in`` entries is a length-``H`` sum). Per chunk of
    tokens the columns of ``w_in`` are scaled by ``φ'(z)`` into a reused scratch buffer and one GEMM
    ``(n·D_in, H) @ (H, D_out)`` gives the chunk's stacked ``Jᵀ``, copied transposed into the output
    (:func:`_stacked_transpose_gemm`).

    Args:
        x_ND: ``(N, D_in)`` tokens.
        w_in_DH: ``(D_in, H)`` input weight.
        b_in_H: ``(H,)`` input bias or None.
        w_out_HD: ``(H, D_out)`` output weight (the output bias does not enter the Jacobian).
        activation: a name in :data:`~moe_lightning.geometry.activations.ACTIVATIONS` or an elementwise callable.
        memory_budget_bytes: peak-memory budget of one chunk's scratch.

    Returns:
        ``(N, D_out, D_in)`` Jacobians (differentiable when an input requires grad).
    """
    d_in, h = w_in_DH.shape
    if w_out_HD.shape[0] != h or x_ND.shape[-1] != d_in:
        raise ValueError(
            f"mlp_expert_jacobian: shapes x {tuple(x_ND.shape)}, w_in {tuple(w_in_DH.shape)}, "
            f"w_out {tuple(w_out_HD.shape)} do not chain as (N, D) @ (D, H) @ (H, D_out)"
        )
    n, d_out = x_ND.shape[0], w_out_HD.shape[1]
    z_NH = x_ND @ w_in_DH
    if b_in_H is not None:
        z_NH = z_NH + b_in_H
    dphi_NH = activation_derivative(activation, z_NH)
    ranges, chunk = _closed_form_chunks(x_ND, x_ND.element_size() * d_in * (h + d_out), memory_budget_bytes)
    if _needs_grad(x_ND, w_in_DH, b_in_H, w_out_HD):  # out= buffers are not differentiable
        parts = [w_out_HD.t() @ (w_in_DH * dphi_NH[i:j].unsqueeze(1)).mT for i, j in ranges]
        return torch.cat(parts) if n else x_ND.new_zeros(0, d_out, d_in)
    return _stacked_transpose_gemm(w_in_DH, dphi_NH, w_out_HD, ranges, chunk)


def swiglu_expert_jacobian(
    x_ND: Tensor,
    w_gate_DH: Tensor,
    w_up_DH: Tensor,
    w_down_HD: Tensor,
    *,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> Tensor:
    """Closed-form Jacobian of a SwiGLU expert ``f(x) = (silu(x @ w_gate) ⊙ (x @ w_up)) @ w_down``.

    ``J(x) = w_downᵀ M(x)`` (docs/geometry.md §1) with ``M(x) = diag(silu'(a) ⊙ b) w_gateᵀ + diag(silu(a)) w_upᵀ``,
    ``a = x @ w_gate``, ``b = x @ w_up``. ``M`` is ``(H, D_in)`` and elementwise (``3·H·D_in`` flops), so the only
    GEMM is ``w_downᵀ M``: ``2·D_out·H·D_in`` flops per token, a third of what ``vmap(jacrev)`` spends (one VJP per
    output row through all three weights). Chunks of tokens write ``Mᵀ = w_gate diag(silu'(a) ⊙ b) + w_up
    diag(silu(a))`` into a reused scratch buffer and one GEMM ``(n·D_in, H) @ (H, D_out)`` gives their stacked
    ``Jᵀ = Mᵀ w_down``, copied transposed into the output (:func:`_stacked_transpose_gemm`).

    Args:
        x_ND: ``(N, D_in)`` tokens.
        w_gate_DH: ``(D_in, H)`` gate weight.
        w_up_DH: ``(D_in, H)`` up weight.
        w_down_HD: ``(H, D_out)`` down weight.
        memory_budget_bytes: peak-memory budget of one chunk's scratch.

    Returns:
        ``(N, D_out, D_in)`` Jacobians (differentiable when an input requires grad).
    """
    d_in, h = w_gate_DH.shape
    if w_up_DH.shape != (d_in, h) or w_down_HD.shape[0] != h or x_ND.shape[-1] != d_in:
        raise ValueError(
            f"swiglu_expert_jacobian: shapes x {tuple(x_ND.shape)}, w_gate {tuple(w_gate_DH.shape)}, "
            f"w_up {tuple(w_up_DH.shape)}, w_down {tuple(w_down_HD.shape)} are inconsistent"
        )
    n, d_out = x_ND.shape[0], w_down_HD.shape[1]
    a_NH = x_ND @ w_gate_DH
    b_NH = x_ND @ w_up_DH
    c_gate_NH = silu_derivative(a_NH) * b_NH
    c_up_NH = F.silu(a_NH)
    ranges, chunk = _closed_form_chunks(x_ND, x_ND.element_size() * d_in * (h + d_out), memory_budget_bytes)
    if _needs_grad(x_ND, w_gate_DH, w_up_DH, w_down_HD):  # out= buffers are not differentiable
        parts = [
            w_down_HD.t() @ (w_gate_DH * c_gate_NH[i:j].unsqueeze(1) + w_up_DH * c_up_NH[i:j].unsqueeze(1)).mT
            for i, j in ranges
        ]
        return torch.cat(parts) if n else x_ND.new_zeros(0, d_out, d_in)
    return _stacked_transpose_gemm(w_gate_DH, c_gate_NH, w_down_HD, ranges, chunk, w_up_DH, c_up_NH)


def _stacked_transpose_gemm(
    w_DH: Tensor,
    c_NH: Tensor,
    w_out_HO: Tensor,
    ranges: list[tuple[int, int]],
    chunk: int,
    w2_DH: Tensor | None = None,
    c2_NH: Tensor | None = None,
) -> Tensor:
    """``J_n = ((w ⊙ c_n + w2 ⊙ c2_n) @ w_out)ᵀ`` for every token ``n``: the kernel both closed forms share.

    Per chunk of tokens the column-scaled ``(D_in, H)`` weights are written into one reused scratch buffer, one
    GEMM ``(n·D_in, H) @ (H, D_out)`` gives the stacked ``J_nᵀ``, and a transposing copy writes ``J_n``. Compared
    with forming ``J = w_outᵀ (c ⊙ wᵀ)`` directly: no transposed copy of a weight, contiguous reads in the
    elementwise pass, and one tall GEMM per chunk instead of a batch of per-token ones, which BLAS runs at a
    higher rate (docs/benchmarks/geometry.md).
    """
    n, (d_in, h), d_out = c_NH.shape[0], w_DH.shape, w_out_HO.shape[1]
    # Row-major (D_in, H) for the elementwise pass: free for our layout, one copy for an ``nn.Linear`` weight's
    # transposed view (Hugging Face experts), whose strided reads would be repeated for every token of a chunk.
    w_DH = w_DH.contiguous()
    w2_DH = None if w2_DH is None else w2_DH.contiguous()
    if w_out_HO.dtype == torch.float64 and w_out_HO.device.type == "cpu":
        # A column-major right operand: MKL's float64 GEMM runs faster with it, its float32 GEMM slower, so only
        # float64 changes layout (docs/benchmarks/geometry.md). A Hugging Face expert's transposed ``nn.Linear``
        # view already is column-major; our row-major ``(H, D_out)`` costs one copy a call.
        w_out_HO = w_out_HO.t().contiguous().t()
    out_NOI = w_DH.new_empty(n, d_out, d_in)
    if n == 0:
        return out_NOI
    chunk = min(chunk, n)
    scratch = w_DH.new_empty(chunk, d_in, h)
    jt = w_DH.new_empty(chunk * d_in, d_out)
    for i, j in ranges:
        m = j - i
        s_nIH = torch.mul(w_DH, c_NH[i:j].unsqueeze(1), out=scratch[:m])
        if w2_DH is not None:
            s_nIH.addcmul_(w2_DH, c2_NH[i:j].unsqueeze(1))
        jt_nIO = torch.mm(s_nIH.view(-1, h), w_out_HO, out=jt[: m * d_in]).view(m, d_in, d_out)
        out_NOI[i:j].copy_(jt_nIO.transpose(1, 2))
    return out_NOI


# ---------------------------------------------------------------------------------------------------------------
# Layer Jacobian through the router (docs/geometry.md §1)
# ---------------------------------------------------------------------------------------------------------------


def _layer_fn(view: MoEView) -> RowFn:
    experts = [view.expert(e) for e in range(view.num_experts)]

    def layer(x: Tensor) -> Tensor:
        g_NE = view.gates(x)
        return sum(g_NE[:, e : e + 1] * experts[e](x) for e in range(len(experts)))

    return layer


def compose_layer_jacobian(
    gates_NE: Tensor,
    gate_jacobian_NED: Tensor,
    expert_outputs: Sequence[Tensor],
    expert_jacobians: Sequence[tuple[Tensor, Tensor]],
) -> Tensor:
    """Assemble the layer Jacobian from its parts by the product rule.

    ``J(x) = Σ_e g_e(x) J_e(x) + Σ_e f_e(x) ∇g_e(x)ᵀ`` (docs/geometry.md §1). Expert Jacobians are only needed where
    ``g_e(x) ≠ 0``; they are passed per expert as ``(rows, J_rows)`` with ``rows`` a ``(N,)`` bool mask or index
    tensor and ``J_rows`` of shape ``(len(rows), D_out, D_in)``.

    Args:
        gates_NE: ``(N, E)`` gate weights.
        gate_jacobian_NED: ``(N, E, D_in)`` gate Jacobians ``∂g_e/∂x``.
        expert_outputs: ``E`` tensors ``(N, D_out)``, ``f_e(x)``.
        expert_jacobians: ``E`` pairs ``(rows, J_rows)``.

    Returns:
        ``(N, D_out, D_in)`` layer Jacobians.
    """
    n, num_experts = gates_NE.shape
    d_in = gate_jacobian_NED.shape[-1]
    d_out = expert_outputs[0].shape[-1]
    # Router term: Σ_e f_e(x) ∇g_e(x)ᵀ, an outer product per token.
    f_NEO = torch.stack(list(expert_outputs), dim=1)
    J_NOI = torch.einsum("neo,nei->noi", f_NEO, gate_jacobian_NED)
    for e in range(num_experts):
        rows, J_rows = expert_jacobians[e]
        idx = rows.nonzero().squeeze(-1) if rows.dtype == torch.bool else rows
        if idx.numel() == 0:
            continue
        J_NOI.index_add_(0, idx, gates_NE[idx, e].view(-1, 1, 1) * J_rows.reshape(-1, d_out, d_in))
    return J_NOI


def layer_jacobian(
    view: MoEView,
    x_ND: Tensor,
    *,
    method: str = "auto",
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    mode: str = "auto",
) -> Tensor:
    """Jacobian of the whole MoE layer ``y(x) = Σ_e g_e(x) f_e(x)`` including the router (docs/geometry.md §1).

    Gates are smooth for soft routing and piecewise smooth for top-k; at a point off the top-k switching set the
    derivative of the kept-and-renormalised gates is what autograd returns through ``topk``.

    The ``method`` choices:

    - ``"func"``: ``torch.func`` over the per-token layer function.
    - ``"compose"``: the product rule of :func:`compose_layer_jacobian`, with expert Jacobians from
      ``view.expert_jacobian`` where offered (else ``torch.func``), evaluated only on routed tokens, and the
      gate Jacobian ``(N, E, D)`` by ``torch.func`` (cheap: E outputs). Much faster for top-k.
    - ``"auto"``: ``"compose"``.

    Args:
        view: an ``MoEView`` (``gates``, ``expert``, ``expert_jacobian``, ``num_experts``).
        x_ND: ``(N, D)`` layer inputs.
        method: ``"auto"``, ``"func"`` or ``"compose"``.
        memory_budget_bytes: chunk budget passed to :func:`jacobians`.
        mode: forward/reverse choice passed to :func:`jacobians`.

    Returns:
        ``(N, D, D)`` layer Jacobians.
    """
    if method not in _LAYER_METHODS:
        raise ValueError(f"layer_jacobian: method must be one of {_LAYER_METHODS}, got {method!r}")
    if method == "func":
        return jacobians(_layer_fn(view), x_ND, memory_budget_bytes=memory_budget_bytes, mode=mode)
    g_NE = view.gates(x_ND)
    dg_NED = jacobians(view.gates, x_ND, memory_budget_bytes=memory_budget_bytes, mode="jacrev")
    outputs, parts = [], []
    for e in range(view.num_experts):
        outputs.append(view.expert(e)(x_ND))
        rows = g_NE[:, e] != 0
        parts.append((rows, expert_jacobian(view, e, x_ND[rows], memory_budget_bytes=memory_budget_bytes)))
    return compose_layer_jacobian(g_NE, dg_NED, outputs, parts)


def expert_jacobian(
    view: MoEView,
    e: int,
    x_ND: Tensor,
    *,
    prefer_closed_form: bool = True,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    mode: str = "auto",
) -> Tensor:
    """Jacobian of expert ``e`` of a view: ``view.expert_jacobian`` first, else (where it returns None)
    ``torch.func``.

    Args:
        view: an ``MoEView``.
        e: expert index.
        x_ND: ``(N, D)`` tokens.
        prefer_closed_form: try ``view.expert_jacobian`` before ``torch.func``.
        memory_budget_bytes: chunk budget for the ``torch.func`` path.
        mode: forward/reverse choice for the ``torch.func`` path.

    Returns:
        ``(N, D, D)`` Jacobians.
    """
    if prefer_closed_form and x_ND.shape[0] > 0:
        J = view.expert_jacobian(e, x_ND)
        if J is not None:
            return J
    return jacobians(view.expert(e), x_ND, memory_budget_bytes=memory_budget_bytes, mode=mode)

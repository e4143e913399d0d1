"""Per-token Jacobians known only through block products ``J V`` and ``Jᵀ U`` (docs/geometry.md §1, "When d is
too large to form J"): the :class:`JacobianOperator` type and its builders for MLP, SwiGLU, any function and a layer.

Shape legend: ``N`` tokens, ``D`` model dim (``D_in``/``D_out``), ``H`` expert hidden width, ``K`` block columns.

For a row-wise function one batched JVP/VJP with a ``(N, D)`` tangent gives every token's own product, and
``vmap`` over the ``K`` block columns turns matrix-vector products into matrix-matrix products; the JVP is taken
from ``torch.func.linearize`` (the primal is traced once, not recomputed per block). Where the expert's weights are
known, :func:`mlp_jacobian_operator` and :func:`swiglu_jacobian_operator` apply ``J`` and ``Jᵀ`` as plain GEMMs
over all tokens and block columns at once (the factored closed forms of §1), the fastest way to multiply by ``J``
without forming it. The solvers that consume these operators are in :mod:`moe_lightning.geometry.krylov`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import jvp, linearize, vjp, vmap

from moe_lightning.geometry.activations import activation_derivative, silu_derivative

__all__ = [
    "JacobianFactors",
    "JacobianOperator",
    "casting_operator",
    "compose_layer_operator",
    "func_jacobian_operator",
    "mlp_jacobian_operator",
    "router_term",
    "sparse_layer_operator",
    "swiglu_jacobian_operator",
]


@dataclass(frozen=True)
class JacobianFactors:
    """The factored form ``J_n = left · Σ_g diag(scales[n, g]) · rights[g]`` of an expert's per-token Jacobians
    (docs/geometry.md §1): MLP ``W_outᵀ diag(φ'(z_n)) W_inᵀ`` (one group), SwiGLU
    ``W_downᵀ [diag(silu'(a_n) ⊙ b_n) W_gateᵀ + diag(silu(a_n)) W_upᵀ]`` (two groups).

    Only ``scales`` depends on the token, so the Jacobians' spectra, norms and gate-weighted means are functions of
    small per-token vectors and the weights (:mod:`moe_lightning.geometry.factored`).

    Attributes:
        left_OH: ``(D_out, H)``.
        rights_HI: ``G`` matrices ``(H, D_in)``, one per group (views of the weights, not copies).
        scales_NGH: ``(N, G, H)`` per-token diagonal of each group.
    """

    left_OH: Tensor
    rights_HI: tuple[Tensor, ...]
    scales_NGH: Tensor

    @property
    def width(self) -> int:
        """``F = G · H``, the length of one token's flattened scales."""
        return len(self.rights_HI) * self.left_OH.shape[1]


@dataclass(frozen=True)
class JacobianOperator:
    """Per-token Jacobians ``J_n`` (``D_out × D_in``) of ``N`` tokens, known only through block products.

    Attributes:
        apply: ``(N, D_in, K) -> (N, D_out, K)``, ``V_n ↦ J_n V_n`` for every token ``n``.
        apply_transpose: ``(N, D_out, K) -> (N, D_in, K)``, ``U_n ↦ J_nᵀ U_n``.
        num_tokens: ``N``.
        d_in: ``D_in``.
        d_out: ``D_out``.
        dtype: dtype of the products (and of the random start block).
        device: their device.
        gemm_tokens: how many tokens share one GEMM against a weight inside ``apply`` (None: ``num_tokens``); a
            composed layer operator runs each expert on its routed tokens only, about ``top_k / E`` of them. The
            default Krylov block is chosen so that this many tokens fill a wide GEMM.
        factors: the factored form of the Jacobians where the builder knows it (MLP and SwiGLU experts), else None.
        rounding: the dtype the products round in where it is coarser than ``dtype``
            (:func:`casting_operator`), else None.
    """

    apply: Callable[[Tensor], Tensor]
    apply_transpose: Callable[[Tensor], Tensor]
    num_tokens: int
    d_in: int
    d_out: int
    dtype: torch.dtype
    device: torch.device
    gemm_tokens: int | None = None
    factors: JacobianFactors | None = None
    rounding: torch.dtype | None = None


def _linearized_jvp(fn: Callable[[Tensor], Tensor], x_ND: Tensor) -> Callable[[Tensor], Tensor]:
    """``v ↦ J v`` for all tokens: ``torch.func.linearize`` when it can trace ``fn``, else ``jvp`` per call."""
    try:
        with warnings.catch_warnings():
            # torch-internal noise of the tracer: const-folding warns about weights that are plain tensors, not
            # module attributes, and make_fx touches the deprecated torch.jit.script
            warnings.simplefilter("ignore")
            _, jvp_fn = linearize(fn, x_ND)
        return jvp_fn
    except Exception:  # noqa: BLE001 - a function linearize cannot trace (data-dependent control flow, ...)
        return lambda v: jvp(fn, (x_ND,), (v,))[1]


def func_jacobian_operator(fn: Callable[[Tensor], Tensor], x_ND: Tensor) -> JacobianOperator:
    """The Jacobians of a row-wise function at every token as a :class:`JacobianOperator`, by ``torch.func``.

    ``J V`` is ``vmap`` over block columns of the linearised JVP, ``Jᵀ U`` of the VJP; both are batched over
    tokens because ``fn`` is row-wise (output row ``n`` depends on input row ``n`` only).

    Args:
        fn: row-wise function ``(n, D_in) -> (n, D_out)``.
        x_ND: ``(N, D_in)`` tokens.
    """
    n, d_in = x_ND.shape
    y, vjp_fn = vjp(fn, x_ND)
    jvp_fn = _linearized_jvp(fn, x_ND)

    def apply(V_NIK: Tensor) -> Tensor:
        return vmap(jvp_fn)(V_NIK.permute(2, 0, 1)).permute(1, 2, 0)

    def apply_transpose(U_NOK: Tensor) -> Tensor:
        return vmap(lambda u: vjp_fn(u)[0])(U_NOK.permute(2, 0, 1)).permute(1, 2, 0)

    return JacobianOperator(apply, apply_transpose, n, d_in, y.shape[-1], x_ND.dtype, x_ND.device)


def _rows(block_NDK: Tensor) -> Tensor:
    """``(N, D, K) -> (N·K, D)``: every block column of every token as one row, for one GEMM against a weight."""
    n, d, k = block_NDK.shape
    return block_NDK.transpose(1, 2).reshape(n * k, d)


def _block(rows_MD: Tensor, n: int) -> Tensor:
    """Inverse of :func:`_rows`: ``(N·K, D) -> (N, D, K)``."""
    return rows_MD.view(n, -1, rows_MD.shape[-1]).transpose(1, 2)


def _cols(block_NDK: Tensor) -> Tensor:
    """``(N, D, K) -> (D, N·K)``: every block column of every token as one column, for ``weight @ columns``."""
    n, d, k = block_NDK.shape
    return block_NDK.permute(1, 0, 2).reshape(d, n * k)


def _uncols(cols_DM: Tensor, n: int) -> Tensor:
    """Inverse of :func:`_cols`: ``(D, N·K) -> (N, D, K)``."""
    return cols_DM.view(cols_DM.shape[0], n, -1).permute(1, 0, 2)


# MKL runs float32 GEMMs against a large weight faster as ``weight @ (D, N·K) columns`` than as
# ``(N·K, D) rows @ weight`` once there are 16 or more block columns, and slower below that. In float64 the rows
# layout is the faster one, so float64 keeps it; CUDA keeps it too, as nothing shows the columns layout helps there.
# A transposed copy of the weight would cost more than it saves. See docs/benchmarks/geometry.md.
_COLUMN_LAYOUT_MIN = 16


def _columns_layout(width: int, weight: Tensor) -> bool:
    """Multiply ``weight @ columns`` (True) or ``rows @ weight`` (False) for ``width`` block columns in all."""
    return width >= _COLUMN_LAYOUT_MIN and weight.dtype == torch.float32 and weight.device.type == "cpu"


def mlp_jacobian_operator(
    x_ND: Tensor,
    w_in_DH: Tensor,
    b_in_H: Tensor | None,
    w_out_HD: Tensor,
    activation: str | Callable[[Tensor], Tensor] = "gelu",
) -> JacobianOperator:
    """Products with the MLP expert Jacobians ``J_n = w_outᵀ diag(φ'(z_n)) w_inᵀ`` (docs/geometry.md §1), unformed.

    ``J V`` is ``((Vᵀ w_in) ⊙ φ'(z)) w_out`` and ``Jᵀ U`` is ``((Uᵀ w_outᵀ) ⊙ φ'(z)) w_inᵀ``, each two GEMMs over all
    ``N·K`` block columns at once (``4·D·H`` flops per column). Weight layout as
    :func:`~moe_lightning.geometry.mlp_expert_jacobian`.
    """
    d_in, h = w_in_DH.shape
    if w_out_HD.shape[0] != h or x_ND.shape[-1] != d_in:
        raise ValueError(
            f"mlp_jacobian_operator: shapes x {tuple(x_ND.shape)}, w_in {tuple(w_in_DH.shape)}, "
            f"w_out {tuple(w_out_HD.shape)} do not chain as (N, D) @ (D, H) @ (H, D_out)"
        )
    n = x_ND.shape[0]
    z_NH = x_ND @ w_in_DH
    if b_in_H is not None:
        z_NH = z_NH + b_in_H
    dphi_N1H = activation_derivative(activation, z_NH).unsqueeze(1)

    dphi_HN1 = dphi_N1H.squeeze(1).t().unsqueeze(-1)

    def apply(V_NIK: Tensor) -> Tensor:
        if _columns_layout(n * V_NIK.shape[-1], w_in_DH):
            t_HNK = (w_in_DH.t() @ _cols(V_NIK)).view(h, n, -1) * dphi_HN1
            return _uncols(w_out_HD.t() @ t_HNK.view(h, -1), n)
        t_NKH = (_rows(V_NIK) @ w_in_DH).view(n, -1, h) * dphi_N1H
        return _block(t_NKH.view(-1, h) @ w_out_HD, n)

    def apply_transpose(U_NOK: Tensor) -> Tensor:
        if _columns_layout(n * U_NOK.shape[-1], w_out_HD):
            t_HNK = (w_out_HD @ _cols(U_NOK)).view(h, n, -1) * dphi_HN1
            return _uncols(w_in_DH @ t_HNK.view(h, -1), n)
        t_NKH = (_rows(U_NOK) @ w_out_HD.t()).view(n, -1, h) * dphi_N1H
        return _block(t_NKH.view(-1, h) @ w_in_DH.t(), n)

    factors = JacobianFactors(w_out_HD.t(), (w_in_DH.t(),), dphi_N1H)
    return JacobianOperator(
        apply, apply_transpose, n, d_in, w_out_HD.shape[1], x_ND.dtype, x_ND.device, factors=factors
    )


def swiglu_jacobian_operator(x_ND: Tensor, w_gate_DH: Tensor, w_up_DH: Tensor, w_down_HD: Tensor) -> JacobianOperator:
    """Products with the SwiGLU expert Jacobians ``J_n = w_downᵀ M(x_n)`` (docs/geometry.md §1), unformed.

    ``M(x) = diag(silu'(a) ⊙ b) w_gateᵀ + diag(silu(a)) w_upᵀ``: ``J V = (c_g ⊙ Vᵀw_gate + c_u ⊙ Vᵀw_up) w_down``
    and ``Jᵀ U = (c_g ⊙ T) w_gateᵀ + (c_u ⊙ T) w_upᵀ`` with ``T = Uᵀ w_downᵀ``: three GEMMs over all ``N·K``
    block columns at once (``6·D·H`` flops per column, what one JVP costs, at GEMM speed). Weight layout as
    :func:`~moe_lightning.geometry.swiglu_expert_jacobian`.
    """
    d_in, h = w_gate_DH.shape
    if w_up_DH.shape != (d_in, h) or w_down_HD.shape[0] != h or x_ND.shape[-1] != d_in:
        raise ValueError(
            f"swiglu_jacobian_operator: shapes x {tuple(x_ND.shape)}, w_gate {tuple(w_gate_DH.shape)}, "
            f"w_up {tuple(w_up_DH.shape)}, w_down {tuple(w_down_HD.shape)} are inconsistent"
        )
    n = x_ND.shape[0]
    a_NH = x_ND @ w_gate_DH
    b_NH = x_ND @ w_up_DH
    c_gate_N1H = (silu_derivative(a_NH) * b_NH).unsqueeze(1)
    c_up_N1H = F.silu(a_NH).unsqueeze(1)

    c_gate_HN1, c_up_HN1 = (c.squeeze(1).t().unsqueeze(-1) for c in (c_gate_N1H, c_up_N1H))

    def apply(V_NIK: Tensor) -> Tensor:
        if _columns_layout(n * V_NIK.shape[-1], w_gate_DH):
            v = _cols(V_NIK)
            t_HNK = (w_gate_DH.t() @ v).view(h, n, -1) * c_gate_HN1
            t_HNK.addcmul_((w_up_DH.t() @ v).view(h, n, -1), c_up_HN1)
            return _uncols(w_down_HD.t() @ t_HNK.view(h, -1), n)
        v = _rows(V_NIK)
        t_NKH = (v @ w_gate_DH).view(n, -1, h) * c_gate_N1H
        t_NKH.addcmul_((v @ w_up_DH).view(n, -1, h), c_up_N1H)
        return _block(t_NKH.view(-1, h) @ w_down_HD, n)

    def apply_transpose(U_NOK: Tensor) -> Tensor:
        if _columns_layout(n * U_NOK.shape[-1], w_down_HD):
            t_HNK = (w_down_HD @ _cols(U_NOK)).view(h, n, -1)
            out = w_gate_DH @ (t_HNK * c_gate_HN1).view(h, -1)
            out.addmm_(w_up_DH, (t_HNK * c_up_HN1).view(h, -1))
            return _uncols(out, n)
        t_NKH = (_rows(U_NOK) @ w_down_HD.t()).view(n, -1, h)
        out = (t_NKH * c_gate_N1H).view(-1, h) @ w_gate_DH.t()
        out.addmm_((t_NKH * c_up_N1H).view(-1, h), w_up_DH.t())
        return _block(out, n)

    factors = JacobianFactors(w_down_HD.t(), (w_gate_DH.t(), w_up_DH.t()), torch.cat([c_gate_N1H, c_up_N1H], 1))
    return JacobianOperator(
        apply, apply_transpose, n, d_in, w_down_HD.shape[1], x_ND.dtype, x_ND.device, factors=factors
    )


def compose_layer_operator(
    gates_NE: Tensor,
    gate_jacobian_NED: Tensor,
    expert_outputs: list[Tensor],
    expert_operators: list[tuple[Tensor, JacobianOperator | None]],
) -> JacobianOperator:
    """The MoE layer's Jacobians ``J = Σ_e g_e J_e + Σ_e f_e ∇g_eᵀ`` (docs/geometry.md §1) as products, unformed.

    The matrix-free counterpart of :func:`~moe_lightning.geometry.compose_layer_jacobian`: expert ``e``'s products
    run only on the tokens routed to it (``rows``), so a top-k layer costs k experts per token instead of the E
    that ``torch.func`` through the whole layer function pays. The router term is a product of rank at most the
    number of experts whose gate moves at the token (``∇g_e ≠ 0``: with top-k routing the k selected, as the
    others' gates are zero around it), and only those experts' rows are kept.

    Args:
        gates_NE: ``(N, E)`` gate weights.
        gate_jacobian_NED: ``(N, E, D_in)`` gate Jacobians ``∂g_e/∂x``.
        expert_outputs: ``E`` tensors ``(N, D_out)``, ``f_e(x)``.
        expert_operators: ``E`` pairs ``(rows, op)``: ``rows`` a ``(N,)`` bool mask of the tokens with
            ``g_e ≠ 0`` and ``op`` expert ``e``'s :class:`JacobianOperator` on exactly those tokens (None when
            there are none).
    """
    dg_NKD, f_NKO = router_term(gate_jacobian_NED, lambda e, rows: expert_outputs[e][rows])
    return sparse_layer_operator(gates_NE, dg_NKD, f_NKO, expert_operators)


def sparse_layer_operator(
    gates_NE: Tensor,
    router_jacobian_NKD: Tensor,
    router_outputs_NKO: Tensor,
    expert_operators: list[tuple[Tensor, JacobianOperator | None]],
) -> JacobianOperator:
    """:func:`compose_layer_operator` from the router term's factors of :func:`router_term`."""
    n, d_in = gates_NE.shape[0], router_jacobian_NKD.shape[-1]
    dg_NKD, f_NKO = router_jacobian_NKD, router_outputs_NKO
    parts = []
    for e, (rows, op) in enumerate(expert_operators):
        idx = rows.nonzero().squeeze(-1)
        if idx.numel():
            if op is None or op.num_tokens != idx.numel():
                raise ValueError(f"compose_layer_operator: expert {e} has {idx.numel()} routed tokens but no operator")
            parts.append((idx, gates_NE[idx, e].view(-1, 1, 1), op))

    def apply(V_NIK: Tensor) -> Tensor:
        out_NOK = f_NKO.transpose(1, 2) @ (dg_NKD @ V_NIK)  # Σ_e f_e (∇g_eᵀ V)
        for idx, g, op in parts:
            out_NOK.index_add_(0, idx, g * op.apply(V_NIK[idx]))
        return out_NOK

    def apply_transpose(U_NOK: Tensor) -> Tensor:
        out_NIK = dg_NKD.transpose(1, 2) @ (f_NKO @ U_NOK)  # Σ_e ∇g_e (f_eᵀ U)
        for idx, g, op in parts:
            out_NIK.index_add_(0, idx, g * op.apply_transpose(U_NOK[idx]))
        return out_NIK

    routed = [op.gemm_tokens or op.num_tokens for _, _, op in parts]
    return JacobianOperator(
        apply,
        apply_transpose,
        n,
        d_in,
        f_NKO.shape[-1],
        dg_NKD.dtype,
        dg_NKD.device,
        gemm_tokens=max(1, sum(routed) // len(routed)) if routed else None,
    )


def casting_operator(op: JacobianOperator, dtype: torch.dtype) -> JacobianOperator:
    """``op`` taking and giving ``dtype``: its products still round in ``op.dtype``."""
    if op.dtype == dtype:
        return op
    inner = op.dtype
    return replace(
        op,
        apply=lambda V: op.apply(V.to(inner)).to(dtype),
        apply_transpose=lambda U: op.apply_transpose(U.to(inner)).to(dtype),
        dtype=dtype,
        factors=None,
        rounding=inner if torch.finfo(inner).eps > torch.finfo(dtype).eps else op.rounding,
    )


def router_term(gate_jacobian_NED: Tensor, output_at: Callable[[int, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """The router term ``Σ_e f_e ∇g_eᵀ`` of the layer Jacobian restricted to the experts whose gate moves at each
    token: ``(N, K, D_in)`` gate Jacobians and ``(N, K, D_out)`` outputs, ``K`` the most such experts at one
    token, zero-padded.

    Dropping an expert with ``∇g_e = 0`` at a token drops an exact zero from the sum there, so the products are
    the dense ones', at ``K / E`` of their cost and memory (``K = k`` for top-k routing).

    Args:
        gate_jacobian_NED: ``(N, E, D_in)`` gate Jacobians.
        output_at: ``(e, rows) -> (n_e, D_out)``, expert ``e``'s outputs at the tokens of the ``(N,)`` mask
            ``rows`` (called only for experts that move somewhere).
    """
    n, num_experts, d_in = gate_jacobian_NED.shape
    moves_NE = (gate_jacobian_NED != 0).any(-1)
    k = max(1, int(moves_NE.sum(-1).max())) if n else 1
    # The moving experts of each token first, in expert order (a stable sort of the mask, descending).
    idx_NK = torch.sort(moves_NE.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :k]
    keep_NK = moves_NE.gather(1, idx_NK)
    dg_NKD = gate_jacobian_NED.gather(1, idx_NK.unsqueeze(-1).expand(-1, -1, d_in)) * keep_NK.unsqueeze(-1)
    f_NKO: Tensor | None = None
    for e in range(num_experts):
        at_NK = (idx_NK == e) & keep_NK
        if not bool(at_NK.any()):
            continue
        f_nO = output_at(e, at_NK.any(-1))
        if f_NKO is None:
            f_NKO = dg_NKD.new_zeros(n, k, f_nO.shape[-1])
        f_NKO[at_NK] = f_nO.to(f_NKO.dtype)
    if f_NKO is None:  # no gate moves anywhere (one expert, or dense gates)
        f_NKO = dg_NKD.new_zeros(n, k, output_at(0, torch.zeros(n, dtype=torch.bool, device=dg_NKD.device)).shape[-1])
    return dg_NKD, f_NKO

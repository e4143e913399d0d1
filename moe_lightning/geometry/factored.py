"""Exact Jacobian quantities of factored experts at any width (docs/geometry.md §1, "Factored experts at any
width"): per-token singular values from a small core, Frobenius norms, and the gate-weighted mean Jacobian's
Frobenius inner products and top singular subspaces, all from :class:`~moe_lightning.geometry.JacobianFactors`.

Shape legend: ``N`` tokens, ``E`` experts, ``O``/``I`` Jacobian output/input dims (both ``D`` for an expert), ``H``
expert hidden width, ``G`` groups (1 for an MLP, 2 for a SwiGLU), ``F = G·H`` the flattened scales of one token,
``K`` the core's sides.

An expert of the form ``J_n = A · Σ_g diag(s_{n,g}) B_g`` (``A = left``, ``B_g = rights[g]``) has rank at most
``H``. With the thin QR factorisations ``A = Q_A R_A`` and ``[B_1; …; B_G]ᵀ = Q_B R_B`` (once per expert),
``J_n = Q_A · core_n · Q_Bᵀ`` with ``core_n = [R_A diag(s_{n,1}) … R_A diag(s_{n,G})] R_Bᵀ``, and ``Q_A``, ``Q_B``
have orthonormal columns, so ``J_n`` and the ``min(O, H) × min(I, F)`` core have the same nonzero singular values.
The mean Jacobian is ``J̄ = A · Σ_g diag(m_g) B_g`` with ``m = Σ_n w_n s_n / Σ_n w_n``: the probe sums ``w·s``
(``F`` numbers per expert, additive over tokens and ranks) instead of ``w·J`` (``O·I``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from moe_lightning.geometry.lapack import congruence_eigh, congruence_eigvalsh, symmetric_gram
from moe_lightning.geometry.operators import JacobianFactors
from moe_lightning.geometry.spectra import batched_svdvals

__all__ = [
    "GRAM_MIN_RATIO",
    "Core",
    "core_factors",
    "factored_core_rank",
    "factored_frobenius_sq",
    "factored_inner_products",
    "factored_singular_values",
    "mean_jacobian_gram",
    "pointwise_cosine_sums_factored",
    "mean_jacobian_singular",
    "stacked_rights",
]


def stacked_rights(f: JacobianFactors) -> Tensor:
    """``(F, I)``: the groups' right factors one above the other, rows in the order of the flattened scales."""
    return f.rights_HI[0] if len(f.rights_HI) == 1 else torch.cat(f.rights_HI)


def factored_core_rank(f: JacobianFactors) -> int:
    """``min(O, H, I, F)``: the largest rank a Jacobian of this form can have, and the number of singular values
    :func:`factored_singular_values` computes."""
    (o, h), i = f.left_OH.shape, f.rights_HI[0].shape[1]
    return min(o, h, i, f.width)


@dataclass
class Core:
    """What :func:`factored_singular_values` needs of an expert's weights, computed once for all its tokens."""

    r_A_KH: Tensor
    """``R_A``, ``(K_A, H)``."""
    rights_FI: Tensor
    """The stacked right factors ``B``, ``(F, I)``."""
    gram_FF: Tensor | None
    """``B Bᵀ``, ``(F, F)``, where the core is wide (``K_B = min(I, F) > H``), else None."""
    _r_Bt_FK: Tensor | None = None

    @property
    def r_Bt_FK(self) -> Tensor:
        """``R_Bᵀ``, ``(F, K_B)``: a thin QR of ``Bᵀ``, computed when first asked for (a wide core needs it only for
        the tokens its Gram cannot give accurately)."""
        if self._r_Bt_FK is None:
            self._r_Bt_FK = torch.linalg.qr(self.rights_FI.t(), mode="r")[1].t()
        return self._r_Bt_FK


#: A wide core's values come from its Gram when ``σ_min ≥ GRAM_MIN_RATIO · σ_max`` (condition number at most 10⁴),
#: from its SVD otherwise (docs/geometry.md §1, "Factored experts at any width").
GRAM_MIN_RATIO = 1e-4


def core_factors(f: JacobianFactors) -> Core:
    """One thin QR of the left side, and the right side's Gram where the core is wide (its QR when first needed):
    they depend on the weights alone (:func:`factored_singular_values` takes them to share them between calls)."""
    r_A = torch.linalg.qr(f.left_OH, mode="r")[1]
    rights = stacked_rights(f)
    wide = min(rights.shape) > f.left_OH.shape[1]
    return Core(r_A, rights, symmetric_gram(rights) if wide else None)


def factored_singular_values(
    f: JacobianFactors, size: int, core: Core | None = None, rows: slice | None = None
) -> Tensor:
    """Every singular value of each token's Jacobian, exactly, from its core (no ``O × I`` matrix is formed).

    Args:
        f: the factors of ``N`` tokens' Jacobians.
        size: length of each returned spectrum (the Jacobian's ``min(O, I)``): the core's values, then zeros, so
            that statistics defined on the whole spectrum (a mean spectrum, a decay fit's index) are those of the
            formed Jacobian.
        core: :func:`core_factors` of ``f``, if already computed.
        rows: the tokens to compute (all ``N`` if None).

    Returns:
        ``(N, size)`` (or ``rows``' count) descending singular values.
    """
    core = core_factors(f) if core is None else core
    scales_NGH = f.scales_NGH if rows is None else f.scales_NGH[rows]
    if core.gram_FF is None:
        sv = _core_svdvals(core, scales_NGH)
    else:
        # A wide core (a SwiGLU's K_B = min(I, 2H) > H): core_n core_nᵀ = R_A P_n P_nᵀ R_Aᵀ, and P_n P_nᵀ is the
        # weights' Gram B Bᵀ = R_Bᵀ R_B scaled on both sides, elementwise (no QR of Bᵀ): the congruence by the
        # triangular R_A (LAPACK's sygst on CPU, a quarter of two GEMMs' flops) and a symmetric eigensolve a token,
        # against a QR of the (2H, H) P_nᵀ, a GEMM and an SVD. A value σ_i from its square is within
        # ~ eps·σ_max²/σ_i of the SVD's, so tokens with σ_min < GRAM_MIN_RATIO · σ_max take the SVD: every value
        # within ~ 1e-12 σ_max.
        eig = congruence_eigvalsh(core.r_A_KH, _scaled_gram(core.gram_FF, scales_NGH))
        sv = eig.flip(-1).clamp_min(0).sqrt()
        ill = eig[:, 0] < GRAM_MIN_RATIO**2 * eig[:, -1]
        if bool(ill.any()):
            sv[ill] = _core_svdvals(core, scales_NGH[ill])
    return torch.nn.functional.pad(sv, (0, size - sv.shape[-1]))


def _core_p(r_Bt_FK: Tensor, scales_NGH: Tensor) -> Tensor:
    """``(N, H, K_B)``: ``P_n = Σ_g diag(s_{n,g}) (R_Bᵀ)_g``, so that ``core_n = R_A P_n``; elementwise, no GEMM
    over ``F``."""
    h = scales_NGH.shape[-1]
    p_NHK = scales_NGH[:, 0, :, None] * r_Bt_FK[:h]
    for g in range(1, scales_NGH.shape[1]):
        p_NHK.addcmul_(scales_NGH[:, g, :, None], r_Bt_FK[g * h : (g + 1) * h])
    return p_NHK


def _core_svdvals(core: Core, scales_NGH: Tensor) -> Tensor:
    """``(N, min(K_A, H))``: the cores' singular values by their SVDs."""
    p_NHK = _core_p(core.r_Bt_FK, scales_NGH)
    if p_NHK.shape[-1] > p_NHK.shape[1]:
        # A wide P_n: P_nᵀ = Q_n R_n with orthonormal Q_n, so core_n = R_A R_nᵀ Q_nᵀ has the singular values of the
        # H × H R_A R_nᵀ. Orthogonal transformations only, so the values are as accurate as the wide core's, and the
        # square SVD costs a third of the wide one's.
        p_NHK = torch.linalg.qr(p_NHK.mT, mode="r")[1].mT
    return batched_svdvals(core.r_A_KH @ p_NHK)  # one batched GEMM over the tokens, then their SVDs


def _scaled_gram(gram_FF: Tensor, scales_NGH: Tensor) -> Tensor:
    """``(N, H, H)``: ``P_n P_nᵀ = Σ_{g,g'} diag(s_{n,g}) (B Bᵀ)_{g,g'} diag(s_{n,g'})``."""
    n, groups, h = scales_NGH.shape
    out = scales_NGH.new_zeros(n, h, h)
    for a in range(groups):
        for b in range(groups):
            block = gram_FF[a * h : (a + 1) * h, b * h : (b + 1) * h]
            out.addcmul_(scales_NGH[:, a, :, None] * block, scales_NGH[:, b, None, :])
    return out


def _scale_gram(fi: JacobianFactors, fj: JacobianFactors) -> Tensor:
    """``(F_i, F_j)`` matrix ``K`` with ``⟨J_i, J_j⟩_F = s_iᵀ K s_j`` for any scales:
    ``K[(g,a), (g',b)] = (A_iᵀ A_j)[a, b] · (B_{i,g} B_{j,g'}ᵀ)[a, b]``, its products in the weights' dtype and the
    result in the scales'."""
    if fi is fj:  # ‖J‖_F²'s Grams: symmetric products, half the flops
        left, rights = symmetric_gram(fi.left_OH.t()), symmetric_gram(stacked_rights(fi))
    else:
        left = fi.left_OH.t() @ fj.left_OH  # (H_i, H_j)
        rights = stacked_rights(fi) @ stacked_rights(fj).t()  # (F_i, F_j)
    return (left.repeat(len(fi.rights_HI), len(fj.rights_HI)) * rights).to(fi.scales_NGH.dtype)


def factored_frobenius_sq(f: JacobianFactors) -> Tensor:
    """``(N,)`` squared Frobenius norms ``‖J_n‖_F² = s_nᵀ K s_n`` (:func:`_scale_gram` of ``f`` with itself), exact
    whatever ``H`` and ``D``."""
    scales_NF = f.scales_NGH.reshape(f.scales_NGH.shape[0], -1)
    return ((scales_NF @ _scale_gram(f, f)) * scales_NF).sum(-1).clamp_min(0)


def factored_inner_products(factors: Sequence[JacobianFactors]) -> Tensor:
    """``(N, E, E)`` Frobenius inner products ``⟨J_i(x_n), J_j(x_n)⟩_F`` of ``E`` experts' Jacobians at the same
    ``N`` tokens (pointwise alignment), one ``F_i × F_j`` Gram of the weights per pair."""
    scales = [f.scales_NGH.reshape(f.scales_NGH.shape[0], -1) for f in factors]
    n, e = scales[0].shape[0], len(factors)
    out = scales[0].new_zeros(n, e, e)
    for i in range(e):
        for j in range(i, e):
            inner = ((scales[i] @ _scale_gram(factors[i], factors[j])) * scales[j]).sum(-1)
            out[:, i, j] = inner
            out[:, j, i] = inner
    return out


def pointwise_cosine_sums_factored(
    factors_of: Callable[[int], JacobianFactors],
    num_experts: int,
    num_tokens: int,
    memory_budget_bytes: int,
    pairs_EE: Tensor | None = None,
    gram_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Additive statistics of the pointwise alignment (docs/geometry.md §4) of ``E`` factored experts at the same
    ``N`` tokens: :func:`~moe_lightning.geometry.pointwise_cosine_sums` from :func:`factored_inner_products`,
    without holding every expert at once.

    Each pair's ``F × F`` Gram costs ``O(D·F²)`` against ``O(N·F²)`` to apply it, so it is formed once for all
    ``N`` tokens. Experts are read in blocks (their factors at the ``N`` tokens, with the weights the view may cast
    for them) small enough that two blocks fit in ``memory_budget_bytes``, so that a layer whose cast weights are
    larger than the budget is probed within it. Only the experts of the pairs computed are read: each once for its
    own block, and again for each earlier block with a pair that needs it (with sampled pairs, a few of a block).

    Args:
        factors_of: expert ``e``'s factors at the ``N`` tokens.
        num_experts: E.
        num_tokens: N.
        memory_budget_bytes: bound on the two blocks of experts held at once.
        pairs_EE: ``(E, E)`` mask of the pairs to compute (their Grams only; the others' entries stay 0, count 0);
            None computes every pair.
        gram_dtype: the dtype the Grams' products round in (the weights are read in it); None: the factors'. The
            scales and every sum stay in the factors' dtype.

    Returns:
        ``(sum_cos_EE, count_EE)`` as :func:`~moe_lightning.geometry.pointwise_cosine_sums`.
    """
    first = factors_of(0)
    (o, h), i = first.left_OH.shape, first.rights_HI[0].shape[1]
    per_expert = first.scales_NGH.element_size() * (o * h + first.width * (i + num_tokens))
    size = max(1, min(num_experts, memory_budget_bytes // max(1, 2 * per_expert)))
    blocks = [range(start, min(start + size, num_experts)) for start in range(0, num_experts, size)]
    wanted = torch.ones(num_experts, num_experts, dtype=torch.bool).triu()  # (ei, ej), ei <= ej
    if pairs_EE is not None:
        wanted &= pairs_EE.to(device="cpu", dtype=torch.bool)
    # ‖J_e(x_n)‖_F² (a pair's cosine needs both norms), once per expert, when it is first read.
    norm_sq: dict[int, Tensor] = {}
    sum_cos = first.scales_NGH.new_zeros(num_experts, num_experts)
    count = sum_cos.new_zeros(num_experts, num_experts)
    reuse = {0: first}  # expert 0's factors, read for the shapes, serve its first read
    del first

    def read(experts: list[int]) -> dict[int, JacobianFactors]:
        held = {}
        for e in experts:
            f = reuse.pop(e) if e in reuse else factors_of(e)
            if gram_dtype is not None and f.left_OH.dtype != gram_dtype:
                rights = tuple(r.to(gram_dtype) for r in f.rights_HI)
                f = replace(f, left_OH=f.left_OH.to(gram_dtype), rights_HI=rights)
            held[e] = f
            if e not in norm_sq:
                norm_sq[e] = factored_inner_products([held[e]])[:, 0, 0]
        return held

    for a, block_a in enumerate(blocks):
        # Only the experts of a wanted pair are read: with sampled pairs most blocks meet a few of another's.
        held_a = read([e for e in block_a if bool(wanted[e].any() or wanted[:, e].any())])
        reuse.clear()  # expert 0 is read in the first block or not at all
        for block_b in blocks[a:]:
            pairs = [(ei, ej) for ei in held_a for ej in block_b if bool(wanted[ei, ej])]
            if not pairs:
                continue
            held_b = held_a if block_b is block_a else read(sorted({ej for _, ej in pairs}))
            for ei, ej in pairs:
                fi, fj = held_a[ei], held_b[ej]
                if ei == ej:
                    inner_N = norm_sq[ei]
                else:
                    s_i, s_j = (f.scales_NGH.reshape(f.scales_NGH.shape[0], -1) for f in (fi, fj))
                    inner_N = ((s_i @ _scale_gram(fi, fj)) * s_j).sum(-1)
                # |cos| as :func:`~moe_lightning.geometry.alignment.pointwise_cosine_sums`: NaN (left out) where a
                # norm is zero
                denom_N = norm_sq[ei].clamp_min(0).sqrt() * norm_sq[ej].clamp_min(0).sqrt()
                ok_N = denom_N > 0
                cos_N = (inner_N.abs() / torch.where(ok_N, denom_N, torch.ones_like(denom_N))).clamp_max(1.0)
                total = torch.where(ok_N, cos_N, torch.zeros_like(cos_N)).sum()
                sum_cos[ei, ej] = sum_cos[ej, ei] = total
                count[ei, ej] = count[ej, ei] = ok_N.sum()
            del held_b
    return sum_cos, count


def _mean_right(f: JacobianFactors, mean_F: Tensor) -> Tensor:
    """``(H, I)``: ``Σ_g diag(m_g) B_g``, so that ``J̄ = A ·`` this, in the wider of the means' and the factors'
    dtypes."""
    h = f.left_OH.shape[1]
    out = mean_F[:h].unsqueeze(-1) * f.rights_HI[0]
    for g, right in enumerate(f.rights_HI[1:], start=1):
        out.add_(mean_F[g * h : (g + 1) * h].unsqueeze(-1) * right)
    return out


#: The top right singular vectors of a wide mean Jacobian come from its core's Gram when the estimate of their
#: subspace's error there, ``eps · ‖R_A‖_F² ‖Σ_g diag(m_g) B_g‖_F² / (σ_r² − σ_{r+1}²)`` (Davis–Kahan, with the
#: Frobenius norms in place of the smaller spectral ones), is at most this; from the core's SVD otherwise
#: (docs/geometry.md §1, "Factored experts at any width").
GRAM_SUBSPACE_TOL = 1e-8


def mean_jacobian_singular(
    f: JacobianFactors, mean_F: Tensor, size: int, top: int | None = None
) -> tuple[Tensor, Tensor]:
    """Singular values and right singular vectors of ``J̄ = A · Σ_g diag(m_g) B_g``, exactly, through its core
    ``R_A · Σ_g diag(m_g) B_g`` (``min(O, H) × I``; ``J̄ = Q_A`` times it).

    Args:
        f: the expert's factors (its ``scales`` are not read).
        mean_F: ``(F,)`` the gate-weighted mean of the expert's scales.
        size: length of the returned spectrum (``min(O, I)``), zero-padded as in :func:`factored_singular_values`.
        top: how many right singular vectors to return, the leading ones (None: every one, ``K``).

    Returns:
        ``(size,)`` descending singular values and ``(top, I)`` right singular vectors as rows. Where ``top`` is
        given and the core is wide and square on the left, the leading ``top + 1`` values and the vectors may come
        from the eigenpairs of the core's ``H × H`` Gram (only where :data:`GRAM_SUBSPACE_TOL` bounds their error),
        and the rest of the spectrum is then zero: what the rank gap at ``top`` reads.
    """
    r_A_KH, right_HI = torch.linalg.qr(f.left_OH, mode="r")[1], _mean_right(f, mean_F)
    if top is not None and top < r_A_KH.shape[0] == r_A_KH.shape[1] < right_HI.shape[1]:
        found = _top_from_gram(r_A_KH, right_HI, top)
        if found is not None:
            return torch.nn.functional.pad(found[0], (0, size - found[0].shape[0])), found[1]
    if right_HI.shape[1] > right_HI.shape[0]:
        # Wide (I > H): Σ_g diag(m_g) B_g = R_mᵀ Q_mᵀ with orthonormal Q_m (a QR of its transpose), so the core's
        # SVD is that of the H-wide R_A R_mᵀ = U S Wᵀ with right vectors Q_m W: orthogonal transformations only,
        # and the square SVD with vectors costs a fraction of the wide one. Only the rows asked for are rotated back.
        q_IH, r_HH = torch.linalg.qr(right_HI.t())
        _, S, Wh = torch.linalg.svd(r_A_KH @ r_HH.t(), full_matrices=False)
        Vh = Wh[:top] @ q_IH.t()
    else:
        _, S, Vh = torch.linalg.svd(r_A_KH @ right_HI, full_matrices=False)
        Vh = Vh[:top]
    return torch.nn.functional.pad(S, (0, size - S.shape[0])), Vh


def _top_from_gram(r_A_HH: Tensor, right_HI: Tensor, top: int) -> tuple[Tensor, Tensor] | None:
    """The ``top + 1`` leading singular values and ``top`` right vectors (rows) of the wide core ``C = R_A · right``
    from the eigenpairs of ``C Cᵀ = R_A (right rightᵀ) R_Aᵀ`` (``v_i = Cᵀ u_i / σ_i``): an ``H × H`` Gram, a
    congruence and the leading eigenpairs, against a QR of the ``I × H`` rightᵀ and an SVD with every vector. None
    where the gap at ``top`` leaves the bound of :data:`GRAM_SUBSPACE_TOL` unmet."""
    lam, u_HT = congruence_eigh(r_A_HH, symmetric_gram(right_HI), top + 1)
    scale = float(torch.linalg.matrix_norm(r_A_HH) * torch.linalg.matrix_norm(right_HI)) ** 2
    if not float(lam[top - 1] - lam[top]) * GRAM_SUBSPACE_TOL > torch.finfo(lam.dtype).eps * scale:
        return None
    sigma = lam.clamp_min(0).sqrt()
    return sigma, ((right_HI.t() @ (r_A_HH.t() @ u_HT[:, :top])) / sigma[:top]).t()


def mean_jacobian_gram(
    factors_of: Callable[[int], JacobianFactors], means_EF: Sequence[Tensor | None], memory_budget_bytes: int
) -> Tensor:
    """``(E, E)`` Frobenius inner products ``⟨J̄_i, J̄_j⟩_F`` of the experts' mean Jacobians, exactly.

    The mean Jacobians are formed ``rows`` output rows at a time for every expert (``J̄_e[rows] = A_e[rows] ·
    Σ_g diag(m_g) B_g``, a ``(E, rows, I)`` block within ``memory_budget_bytes``) and the block's Gram is added, so
    no ``E × O × I`` tensor exists at once; each expert's weights are read once per block. Each block is computed in
    the means' dtype: factors in a narrower dtype (the weights as stored) are cast row by row and promoted in the
    product with the means, which gives the same numbers as factors cast first.

    Args:
        factors_of: expert ``e``'s factors (their ``scales`` are not read), in the means' dtype or a narrower one.
        means_EF: ``E`` mean scales, None for an expert without tokens (its row and column are 0).
        memory_budget_bytes: bound on one block.
    """
    live = [e for e, m in enumerate(means_EF) if m is not None]
    num_experts = len(means_EF)
    if not live:
        return torch.zeros(num_experts, num_experts, dtype=torch.float64)
    first = factors_of(live[0])
    (d_out, _), d_in = first.left_OH.shape, first.rights_HI[0].shape[1]
    ref = means_EF[live[0]]
    itemsize = ref.element_size()
    # Half the budget: the rest holds the expert read for each row block and its product's temporaries (a whole
    # budget's block saved ~20 s of reads at Qwen3-30B-A3B's size and raised the peak by 0.14 GiB).
    rows = max(1, min(d_out, memory_budget_bytes // max(1, 2 * len(live) * d_in * itemsize)))
    gram = ref.new_zeros(len(live), len(live))
    for start in range(0, d_out, rows):
        block_EX = ref.new_empty(len(live), min(rows, d_out - start) * d_in)
        for k, e in enumerate(live):
            f = first if e == live[0] and start == 0 else factors_of(e)
            left = f.left_OH[start : start + rows].to(ref.dtype)
            block_EX[k] = (left @ _mean_right(f, means_EF[e])).reshape(-1)
        gram += symmetric_gram(block_EX)
    out = torch.zeros(num_experts, num_experts, dtype=gram.dtype, device=gram.device)
    idx = torch.tensor(live, device=gram.device)
    out[idx.unsqueeze(-1), idx] = gram
    return out

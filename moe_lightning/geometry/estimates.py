"""Estimated spectral statistics of per-token Jacobians known only through products (docs/geometry.md §1, "Estimated
quantities"): the Frobenius norm by Hutchinson (1989) and the effective rank over the whole spectrum by stochastic
Lanczos quadrature (Ubaru, Chen & Saad 2017), each with the variance of its estimate, for every token at once.

Shape legend: ``N`` tokens, ``D`` the Jacobian's input dim (``I``), ``O`` its output dim, ``K`` Hutchinson probes per
token, ``S`` quadrature starts per token, ``M`` Lanczos steps.

Every token draws its own Rademacher probes from a generator seeded by its values (:func:`token_probes`), so
the estimates of different tokens are independent (the variance of a weighted mean over tokens is the weighted sum
of their variances) and a token's estimate does not depend on the chunk, shard or rank it was probed on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import Tensor

from moe_lightning.common import dtype_name
from moe_lightning.geometry.lanczos import tridiagonal
from moe_lightning.geometry.operators import JacobianOperator
from moe_lightning.geometry.probe_config import ProbeConfig

__all__ = [
    "hutchinson_frobenius_sq",
    "lanczos_quadrature",
    "mark_topr_products",
    "products_suffix",
    "slq_effective_rank",
    "token_probes",
    "whole_spectrum_statistics",
    "whole_spectrum_variants",
]


def token_probes(x_ND: Tensor, columns: int, seed: int, salt: int, dtype: torch.dtype) -> Tensor:
    """``(N, D, columns)`` Rademacher (±1) probes, token ``n``'s drawn from a generator seeded by the bytes of
    ``x_ND[n]``, ``seed`` and ``salt`` (an expert's index, say, so that two experts at one token draw
    independently).

    Two tokens with the same values draw the same probes: their estimates are one estimate, counted twice.
    """
    n, d = x_ND.shape
    host = x_ND.detach().to("cpu", torch.float64).contiguous().numpy()
    out = torch.empty(n, d, columns, dtype=torch.int8)
    gen = torch.Generator()
    for i in range(n):
        key = hashlib.blake2b(host[i].tobytes(), digest_size=8, key=f"{seed}/{salt}".encode()).digest()
        gen.manual_seed(int.from_bytes(key, "little") & (2**63 - 1))
        out[i] = torch.randint(0, 2, (d, columns), generator=gen, dtype=torch.int8)
    return (out.to(device=x_ND.device, dtype=dtype) * 2 - 1).contiguous()


def _mean_and_variance(samples_NK: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over the last dim and the variance of that mean (sample variance / K)."""
    k = samples_NK.shape[-1]
    return samples_NK.mean(-1), samples_NK.var(-1, correction=1) / k


def hutchinson_frobenius_sq(op: JacobianOperator, probes_NDK: Tensor) -> tuple[Tensor, Tensor]:
    """``‖J_n‖_F² = E_v ‖J_n v‖²`` for Rademacher ``v`` (Hutchinson's estimator of ``tr J_nᵀ J_n``), one JVP block.

    Args:
        op: the tokens' Jacobians.
        probes_NDK: ``(N, D_in, K)`` Rademacher probes, ``K ≥ 2``.

    Returns:
        ``(N,)`` estimates and ``(N,)`` variances of the estimates (sample variance of ``‖J v_k‖²`` over ``K``).
    """
    samples_NK = op.apply(probes_NDK).square().sum(1)
    return _mean_and_variance(samples_NK)


def lanczos_quadrature(
    matvec: Callable[[Tensor], Tensor], starts_NDS: Tensor, steps: int, rounding: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gauss and Gauss–Radau quadrature nodes and weights of ``qᵀ f(A_n) q`` for each unit start ``q = v / ‖v‖`` of
    every token, ``A_n`` positive semi-definite.

    ``M = min(steps, D)`` Lanczos steps on ``A_n`` (``matvec``: ``(N, D, S) -> (N, D, S)``, each column its own run),
    with full reorthogonalisation (twice) against each run's basis. Gauss: the nodes are the eigenvalues ``θ`` of
    the tridiagonal ``T_M``, the weights the squared first components ``τ`` of its eigenvectors, so
    ``qᵀ f(A) q ≈ Σ_j τ_j f(θ_j)``, exact for polynomials of degree ``≤ 2M − 1``. Gauss–Radau: ``T_M`` extended by
    one row so that ``0`` (the lower end of a PSD spectrum) is a node (Golub & Meurant, *Matrices, Moments and
    Quadrature with Applications*, 2010, §6.2). For ``f`` whose derivatives of order ``2M`` and ``2M + 1`` have
    constant signs on ``λ > 0`` (``√λ``: Gauss over-, Radau under-estimates) the two rules bracket ``qᵀ f(A) q``.
    A run whose Krylov space is invariant stops there: both rules are then exact and equal; its later rows are zero
    and weigh nothing.

    Args:
        matvec: product with the ``N`` positive semi-definite matrices, column by column.
        starts_NDS: ``(N, D, S)`` nonzero start vectors.
        steps: ``M``.
        rounding: the dtype ``matvec`` rounds in, where coarser than the starts' (None: theirs): a Krylov space
            counts as invariant once what is left of a step is at its rounding.

    Returns:
        Gauss nodes and weights, ``(N, S, M)`` each, then Gauss–Radau nodes and weights, ``(N, S, M + 1)`` each
        (float64; each run's weights sum to 1).
    """
    n, d, s = starts_NDS.shape
    m = min(steps, d)
    # Each run's vectors are rows here, ``(N, S, D)``: the basis of every run is one ``(M, D)`` matrix of a batch,
    # so its reorthogonalisation is two batched matrix products; ``matvec`` takes and gives ``(N, D, S)`` views.
    q = starts_NDS.transpose(1, 2) / torch.linalg.vector_norm(starts_NDS, dim=1).unsqueeze(-1)
    basis = q.new_zeros(n * s, m, d)
    alpha = torch.zeros(n, s, m, dtype=torch.float64, device=q.device)
    beta = torch.zeros(n, s, m, dtype=torch.float64, device=q.device)  # the last couples to step M + 1
    q_prev, b_prev = torch.zeros_like(q), q.new_zeros(n, s)
    live = torch.ones(n, s, dtype=torch.bool, device=q.device)
    scale = q.new_zeros(n, s)
    floor = 64 * max(torch.finfo(q.dtype).eps, torch.finfo(rounding or q.dtype).eps)
    for j in range(m):
        basis[:, j] = q.reshape(n * s, d)
        w = matvec(q.transpose(1, 2)).transpose(1, 2)
        a = (q * w).sum(-1)
        w = w - a.unsqueeze(-1) * q - b_prev.unsqueeze(-1) * q_prev
        done = basis[:, : j + 1]
        for _ in range(2):  # "twice is enough" (Giraud et al. 2005): the basis stays orthonormal in floating point
            w_col = w.reshape(n * s, d, 1)
            w = (w_col - done.transpose(1, 2) @ (done @ w_col)).view(n, s, d)
        alpha[..., j] = a.double()
        scale = torch.maximum(scale, a.abs())
        b = torch.linalg.vector_norm(w, dim=-1)
        live &= b > floor * scale  # an invariant Krylov space: what is left of w is rounding
        if j + 1 == d:  # the whole space: exact
            live &= False
        b = torch.where(live, b, torch.zeros_like(b))
        beta[..., j] = b.double()
        q_prev, b_prev = q, b
        q = torch.where(live.unsqueeze(-1), w / torch.where(live, b, torch.ones_like(b)).unsqueeze(-1), 0.0)
    T = tridiagonal_batch(alpha, beta[..., :-1])
    theta, vectors = torch.linalg.eigh(T)
    gauss = (theta, vectors[..., 0, :].square())
    # Radau: the last diagonal entry α̃ with 0 an eigenvalue of the extended matrix, α̃ = δ_M where
    # T_M δ = β_M² e_M. A finished run keeps its exact Gauss rule (a zero-weight node added).
    live = live.to(T.device)
    eye = torch.eye(m, dtype=T.dtype, device=T.device)
    rhs = torch.zeros(n, s, m, 1, dtype=T.dtype, device=T.device)
    rhs[..., -1, 0] = beta[..., -1].square()
    T_safe = torch.where(live[..., None, None], T, eye)
    delta = torch.linalg.solve(T_safe, rhs)[..., -1, 0]
    T_R = torch.zeros(n, s, m + 1, m + 1, dtype=T.dtype, device=T.device)
    T_R[..., :m, :m] = T
    T_R[..., m, m - 1] = T_R[..., m - 1, m] = beta[..., -1]
    T_R[..., m, m] = torch.where(live, delta, torch.zeros_like(delta))
    theta_R, vectors_R = torch.linalg.eigh(T_R)
    return (*gauss, theta_R, vectors_R[..., 0, :].square())


def tridiagonal_batch(alpha: Tensor, beta: Tensor) -> Tensor:
    """``(..., M, M)`` symmetric tridiagonal matrices with diagonals ``alpha`` ``(..., M)`` and off-diagonals
    ``beta`` ``(..., M - 1)``: :func:`~moe_lightning.geometry.lanczos.tridiagonal` over a batch."""
    if alpha.dim() == 1:
        return tridiagonal(alpha, beta)
    t = torch.diag_embed(alpha)
    if beta.shape[-1]:
        t = t + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    return t


def _traces(theta: Tensor, tau: Tensor, d: int, eps: float) -> tuple[Tensor, Tensor]:
    """``D Σ_j τ_j √θ_j`` and ``D Σ_j τ_j √θ_j log √θ_j`` of each run; nodes below ``D · eps`` of a run's largest
    (rounding in place of zero eigenvalues) count as zero."""
    theta = theta.clamp_min(0)
    theta = torch.where(theta > d * eps * theta.amax(-1, keepdim=True), theta, torch.zeros_like(theta))
    sigma = theta.sqrt()
    log_sigma = torch.log(torch.where(sigma > 0, sigma, torch.ones_like(sigma)))
    return d * (tau * sigma).sum(-1), d * (tau * sigma * log_sigma).sum(-1)


def _entropy_rank(a: Tensor, b: Tensor) -> Tensor:
    """``a · exp(−b / a)``, 0 where ``a ≤ 0`` (a zero matrix)."""
    ok = a > 0
    a_safe = torch.where(ok, a, torch.ones_like(a))
    return torch.where(ok, a_safe * torch.exp(-b / a_safe), torch.zeros_like(a))


def slq_effective_rank(op: JacobianOperator, starts_NDS: Tensor, steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """The entropy effective rank (docs/geometry.md §2) of every token's Jacobian over its whole spectrum, by
    stochastic Lanczos quadrature on ``J_nᵀ J_n``, with the variance of the estimate and its quadrature error.

    With ``p_i = σ_i / Σ_j σ_j``, ``exp(H(p)) = a · exp(−b / a)`` where ``a = Σ_i σ_i = tr (JᵀJ)^{1/2}`` and
    ``b = Σ_i σ_i log σ_i = tr g(JᵀJ)``, ``g(λ) = √λ log √λ`` (``g(0) = 0``): two traces of functions of ``JᵀJ``
    (eigenvalues ``σ_i²``, and zeros that add nothing). Each start ``v`` (Rademacher, ``‖v‖² = D``) gives
    ``vᵀ f(JᵀJ) v ≈ D Σ_j τ_j f(θ_j)`` for both functions at once.

    ``√λ`` is not smooth at 0, where the small singular values of a square or rank-deficient Jacobian lie, so the
    quadrature converges slowly there (about ``1/M``): Gauss over-estimates ``a`` and Gauss–Radau with a node at 0
    under-estimates it (:func:`lanczos_quadrature`), and ``b``'s two rules err in opposite directions too. Each
    start's value is the mean of the two rules, and half the distance between the effective ranks of the two rules
    is returned as the quadrature error: systematic, it does not shrink with more starts or tokens, only with
    more steps.

    The estimate is ``a̅ · exp(−b̅ / a̅)`` over the ``S`` starts' means; its variance comes from the starts' sample
    covariance of ``(a, b)`` by the delta method.

    Args:
        op: the tokens' Jacobians.
        starts_NDS: ``(N, D_in, S)`` Rademacher starts, ``S ≥ 2``.
        steps: Lanczos steps ``M`` per start (each one JVP and one VJP).

    Returns:
        ``(N,)`` effective ranks (0 for a zero Jacobian), ``(N,)`` variances of the estimates and ``(N,)``
        quadrature errors.
    """
    d, s = starts_NDS.shape[1], starts_NDS.shape[2]
    eps = torch.finfo(starts_NDS.dtype).eps
    theta_G, tau_G, theta_R, tau_R = lanczos_quadrature(
        lambda V: op.apply_transpose(op.apply(V)), starts_NDS, steps, rounding=op.rounding
    )
    a_G, b_G = _traces(theta_G, tau_G, d, eps)
    a_R, b_R = _traces(theta_R, tau_R, d, eps)
    a_NS, b_NS = (a_G + a_R) / 2, (b_G + b_R) / 2
    a, b = a_NS.mean(-1), b_NS.mean(-1)
    da, db = a_NS - a.unsqueeze(-1), b_NS - b.unsqueeze(-1)
    cov_aa, cov_ab, cov_bb = ((u * v).sum(-1) / (s - 1) / s for u, v in ((da, da), (da, db), (db, db)))
    ok = a > 0
    ratio = b / torch.where(ok, a, torch.ones_like(a))
    grad_a, grad_b = torch.exp(-ratio) * (1 + ratio), -torch.exp(-ratio)
    var = torch.where(ok, grad_a**2 * cov_aa + 2 * grad_a * grad_b * cov_ab + grad_b**2 * cov_bb, torch.zeros_like(a))
    rule_gap = (_entropy_rank(a_G.mean(-1), b_G.mean(-1)) - _entropy_rank(a_R.mean(-1), b_R.mean(-1))).abs() / 2
    dtype = starts_NDS.dtype
    return _entropy_rank(a, b).to(dtype), var.to(dtype), rule_gap.to(dtype)


def whole_spectrum_statistics(
    op: JacobianOperator,
    x_ND: Tensor,
    top_NR: Tensor,
    config: ProbeConfig,
    salt: int,
    frobenius_sq: Tensor | None = None,
) -> dict[str, tuple[Tensor, ...]]:
    """The statistics of each token's whole spectrum that its top-``r`` singular values ``top_NR`` cannot give:
    the Frobenius norm, the stable rank and the effective rank, each ``(values, variances of the estimates[,
    quadrature errors])`` (variances None where exact), for ``SpectralMoments.add(known=...)``.

    The effective rank is estimated by SLQ (:func:`slq_effective_rank`); the Frobenius norm is ``frobenius_sq``'s
    square root where it is known exactly (a factored expert's), else Hutchinson's estimate; the stable rank is
    ``‖J‖_F² / σ_max²`` with ``σ_max`` the Krylov value, converged to the solver's tolerance, so only ``‖J‖_F²``
    adds variance. The sample sizes are ``config``'s (``matrix_free_trace_probes``, ``matrix_free_slq_starts`` and
    ``matrix_free_slq_steps``); each token draws its own probes (:func:`token_probes` with ``config.seed`` and
    ``salt``).
    """
    trace_probes, steps = config.matrix_free_trace_probes, config.matrix_free_slq_steps
    probes = token_probes(x_ND, trace_probes + config.matrix_free_slq_starts, config.seed, salt, op.dtype)
    known: dict[str, tuple[Tensor, ...]] = {"effective_rank": slq_effective_rank(op, probes[..., trace_probes:], steps)}
    top_sq = top_NR[:, 0].square()
    if frobenius_sq is not None:
        fro_sq, fro_sq_var = frobenius_sq.to(top_sq.dtype), None
    else:
        fro_sq, fro_sq_var = hutchinson_frobenius_sq(op, probes[..., :trace_probes])
        fro_sq = fro_sq.clamp_min(0)
    fro = fro_sq.sqrt()
    if fro_sq_var is None:
        known["frobenius"] = (fro, None)
    else:  # delta method: d√f = df / (2√f)
        known["frobenius"] = (fro, torch.where(fro > 0, fro_sq_var / (4 * fro_sq), torch.zeros_like(fro)))
    ok = top_sq > 0
    top_sq_safe = torch.where(ok, top_sq, torch.ones_like(top_sq))
    stable = torch.where(ok, fro_sq / top_sq_safe, torch.zeros_like(top_sq))
    stable_var = None
    if fro_sq_var is not None:
        stable_var = torch.where(ok, fro_sq_var / top_sq_safe.square(), torch.zeros_like(top_sq))
    known["stable_rank"] = (stable, stable_var)
    return known


def products_suffix(config: ProbeConfig, products: torch.dtype | None) -> str:
    """``_products_<dtype>``, the suffix of a variant whose matrix-free products rounded in ``products``, where that
    is not ``config.dtype``; else empty."""
    return "" if products in (None, config.dtype) else f"_products_{dtype_name(products)}"


def mark_topr_products(
    variants: dict[str, str], prefix: str, config: ProbeConfig, products: torch.dtype | None
) -> None:
    """Append :func:`products_suffix` to the variants of the statistics taken from the top-``r`` values alone
    (``{prefix}_sigma_max``, ``{prefix}_decay_slope``), whose Krylov products rounded in ``products``."""
    for name in ("sigma_max", "decay_slope"):
        variants[f"{prefix}_{name}"] += products_suffix(config, products)


def whole_spectrum_variants(
    prefix: str, config: ProbeConfig, exact_frobenius: bool = False, products: torch.dtype | None = None
) -> dict[str, str]:
    """The variant names of :func:`whole_spectrum_statistics`'s values for report keys ``{prefix}_{stat}``;
    ``products``: the dtype the estimates' products rounded in, named where it is not ``config.dtype``."""
    fro = "exact_factored" if exact_frobenius else f"hutchinson_r{config.matrix_free_trace_probes}"
    rounded = products_suffix(config, products)
    return {
        f"{prefix}_effective_rank": f"roy_vetterli_2007_slq_m{config.matrix_free_slq_steps}_s"
        f"{config.matrix_free_slq_starts}{rounded}",
        f"{prefix}_frobenius": f"sqrt_sum_sigma_sq_{fro}{'' if exact_frobenius else rounded}",
        f"{prefix}_stable_rank": f"{fro}_frobenius_sq_over_topr_sigma_max_sq_tol={config.matrix_free_tol:g}"
        f"{'' if exact_frobenius else rounded}",
        f"{prefix}_se": "estimator_standard_error_of_weighted_mean_sqrt_sum_w2_var_over_sum_w",
    }

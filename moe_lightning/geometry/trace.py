"""Stochastic trace estimators of a symmetric operator given only its matrix-vector product: Hutchinson (1989)
and Hutch++ (Meyer, Musco, Musco & Woodruff 2021), each with a standard error (docs/geometry.md §7).

Shape legend: ``P`` operator dimension, ``S`` Hutch++ sketch columns, ``G`` its residual Hutchinson samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_lightning.common import check_nonnegative, check_positive_int

__all__ = ["TraceResult", "hutchinson", "hutchpp", "rademacher"]


@dataclass
class TraceResult:
    """Result of a trace estimator.

    Attributes:
        trace: the estimate.
        std_error: its standard error (Hutchinson: sample std / √K; Hutch++: that of the residual Hutchinson part,
            the sketched part being exact given the sketch); NaN when fewer than 2 samples make it.
        iterations: samples drawn (Hutchinson) or matrix-vector products spent (Hutch++).
        converged: ``std_error ≤ tol · |trace|`` was reached (Hutch++: whether its standard error is finite).
    """

    trace: float
    std_error: float
    iterations: int
    converged: bool


def rademacher(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Independent ±1 entries drawn from ``gen``."""
    return torch.randint(0, 2, shape, generator=gen, device=device).to(dtype) * 2 - 1


def _mean_and_error(samples: list[float]) -> tuple[float, float]:
    k = len(samples)
    mean = sum(samples) / k
    if k < 2:
        return mean, math.nan
    var = sum((s - mean) ** 2 for s in samples) / (k - 1)
    return mean, math.sqrt(var / k)


def hutchinson(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    min_iter: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> TraceResult:
    """Hutchinson's ``tr A ≈ mean_k v_kᵀ A v_k`` with Rademacher ``v_k``; stops at ``std_error ≤ tol · |mean|``
    after at least ``min_iter`` samples, or after ``max_iter``."""
    check_positive_int("hutchinson: max_iter", max_iter)
    check_nonnegative("hutchinson: tol", tol)
    if not isinstance(min_iter, int) or not 1 <= min_iter <= max_iter:
        raise ValueError(f"hutchinson: min_iter must be an int in [1, max_iter], got {min_iter!r}")
    gen = torch.Generator(device=device).manual_seed(seed)
    samples: list[float] = []
    mean, std_err = math.nan, math.nan
    for _ in range(max_iter):
        v = rademacher((dim,), gen, dtype, device)
        samples.append(float(v @ matvec(v)))
        mean, std_err = _mean_and_error(samples)
        if len(samples) >= max(min_iter, 2) and std_err <= tol * abs(mean):
            return TraceResult(mean, std_err, len(samples), True)
    return TraceResult(mean, std_err, len(samples), False)


def hutchpp(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    *,
    num_matvecs: int = 30,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> TraceResult:
    """Hutch++: ``tr A ≈ tr(Qᵀ A Q) + (1/G) Σ_g g'ᵀ A g'`` with ``Q`` an orthonormal basis of ``A S`` for a
    Rademacher sketch ``S`` and ``g' = (I − Q Qᵀ) g`` (Meyer et al. 2021, Alg. 1).

    The budget splits as ``S = ⌊m/3⌋`` products for the sketch, ``S`` for ``Qᵀ A Q`` and ``G = m − 2S`` for the
    residual. The sketched part removes the top of the spectrum exactly, so the variance left is that of
    Hutchinson on the deflated operator: for a PSD ``A`` the error is ``O(1/m)`` against Hutchinson's ``O(1/√m)``.
    If the sketch spans the whole space (``S ≥ P``) the estimate is exact (std error 0); below 3 products the
    sketch is empty and this is Hutchinson with the same draws.
    """
    check_positive_int("hutchpp: num_matvecs", num_matvecs)
    gen = torch.Generator(device=device).manual_seed(seed)
    s = min(num_matvecs // 3, dim)
    if s:
        sketch = rademacher((s, dim), gen, dtype, device)
        q, _ = torch.linalg.qr(torch.stack([matvec(x) for x in sketch], dim=1))  # (P, S)
    else:
        q = torch.zeros(dim, 0, dtype=dtype, device=device)
    exact = sum(float(q[:, i] @ matvec(q[:, i].contiguous())) for i in range(q.shape[1]))
    if q.shape[1] >= dim:
        return TraceResult(exact, 0.0, 2 * s, True)
    samples = []
    for _ in range(num_matvecs - 2 * s):
        g = rademacher((dim,), gen, dtype, device)
        g = g - q @ (q.T @ g)
        samples.append(float(g @ matvec(g)))
    rest, std_err = _mean_and_error(samples)
    return TraceResult(exact + rest, std_err, num_matvecs, math.isfinite(std_err))

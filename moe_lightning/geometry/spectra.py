"""Spectral statistics of Jacobians and covariance spectra (docs/geometry.md §2, §3).

Shape legend: ``N`` tokens, ``E`` experts, ``D`` model dim, ``H`` expert hidden width, ``M`` number of singular
values or eigenvalues of one matrix (``min(d_out, d_in)`` for a Jacobian). Every function here accepts any number
of leading batch dimensions ``...`` and reduces over the last one.

All spectra are expected sorted in descending order (as ``torch.linalg.svdvals`` returns them).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

__all__ = [
    "SPECTRAL_STAT_NAMES",
    "SPECTRAL_VARIANTS",
    "batched_eigvalsh",
    "batched_svdvals",
    "decay_slope",
    "effective_rank",
    "n_components_for_variance",
    "participation_ratio",
    "spectral_stats",
    "stable_rank",
]

_SVD_POOL: tuple[ThreadPoolExecutor, int] | None = None  # (pool, its worker count)


def _forget_pool_after_fork() -> None:  # a forked child has none of the parent's worker threads
    global _SVD_POOL
    _SVD_POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)

#: Below this many elements a CPU batch is not split (thread hand-off would cost more than it saves).
_SPLIT_MIN_ELEMENTS = 2**16

#: Threads :func:`batched_svdvals` splits a batch over; None: ``torch.get_num_threads()``. A probe computed beside
#: training runs one torch thread (its parent's OpenMP threads do not exist in a forked child) and sets this to its
#: parent's count, so that the SVDs use the cores the parent leaves when it waits for them.
SVD_WORKERS: int | None = None


def batched_svdvals(A: Tensor) -> Tensor:
    """``torch.linalg.svdvals`` of a batch of matrices, the batch split across ``torch.get_num_threads()`` threads
    (:data:`SVD_WORKERS` if set).

    On CPU torch runs a batched SVD one matrix after another on one thread; LAPACK releases the GIL, so slices of
    the batch in worker threads run side by side on the cores torch may use. Each matrix
    goes through the same LAPACK routine as in one call. CUDA tensors, tensors that require grad, one thread and
    small batches take ``torch.linalg.svdvals`` directly.

    Args:
        A: ``(..., m, n)``.

    Returns:
        ``(..., min(m, n))`` singular values, descending.
    """
    return _split_over_threads(torch.linalg.svdvals, A)


def batched_eigvalsh(A: Tensor) -> Tensor:
    """``torch.linalg.eigvalsh`` of a batch of symmetric matrices, ascending, split over threads as
    :func:`batched_svdvals`."""
    return _split_over_threads(torch.linalg.eigvalsh, A)


def _split_over_threads(fn: Callable[[Tensor], Tensor], A: Tensor) -> Tensor:
    global _SVD_POOL
    workers = torch.get_num_threads() if SVD_WORKERS is None else SVD_WORKERS
    if (
        A.device.type != "cpu"
        or workers < 2
        or A.dim() != 3
        or A.shape[0] < 2
        or A.numel() < _SPLIT_MIN_ELEMENTS
        or (A.requires_grad and torch.is_grad_enabled())
    ):
        return fn(A)
    if _SVD_POOL is None or _SVD_POOL[1] != workers:
        _SVD_POOL = (ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moe_lightning_svd"), workers)
    futures = [_SVD_POOL[0].submit(fn, part) for part in A.chunk(workers)]
    return torch.cat([f.result() for f in futures])


#: Names of the per-matrix statistics returned by :func:`spectral_stats`, in a fixed order.
SPECTRAL_STAT_NAMES: tuple[str, ...] = ("sigma_max", "frobenius", "stable_rank", "effective_rank", "decay_slope")

#: The definition each statistic follows (docs/geometry.md §2); the probe copies these into its report.
SPECTRAL_VARIANTS: dict[str, str] = {
    "sigma_max": "largest_singular_value",
    "frobenius": "sqrt_sum_sigma_sq",
    "stable_rank": "sum_sigma_sq_over_sigma_max_sq",
    "effective_rank": "roy_vetterli_2007",
    "decay_slope": "loglog_lsq_positive_sigma",
}


def _entropy_rank(p_unnorm: Tensor) -> Tensor:
    """``exp(H(p))`` with ``p = v / Σv`` and ``0 log 0 = 0``; 0 when ``v`` is all zero."""
    v = p_unnorm.clamp_min(0)
    total = v.sum(-1, keepdim=True)
    p = torch.where(total > 0, v / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(v))
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    rank = torch.exp(-plogp.sum(-1))
    # A zero matrix has no spectrum: its effective rank is defined as 0 rather than NaN, so means stay finite.
    return torch.where(total.squeeze(-1) > 0, rank, torch.zeros_like(rank))


def effective_rank(spectrum: Tensor) -> Tensor:
    """Entropy effective rank ``exp(H(p))`` with ``p_i = s_i / Σ s`` (Roy & Vetterli, 2007; docs/geometry.md §2, §3).

    For a Jacobian pass its singular values; for a covariance pass its eigenvalues (docs/geometry.md §3 applies the
    same formula to ``λ``). Negative entries (round-off in eigenvalues) are clamped to 0.

    Args:
        spectrum: ``(..., M)`` nonnegative values.

    Returns:
        ``(...)`` effective rank in ``[1, M]``, or 0 for an all-zero spectrum.

    Example:
        >>> effective_rank(torch.ones(5, dtype=torch.float64)).item()
        5.000000000000001
    """
    return _entropy_rank(spectrum)


def participation_ratio(eigenvalues: Tensor) -> Tensor:
    """Participation ratio ``(Σλ)² / Σλ²`` of a covariance spectrum (docs/geometry.md §3).

    Args:
        eigenvalues: ``(..., M)`` covariance eigenvalues (negative round-off clamped to 0).

    Returns:
        ``(...)`` participation ratio in ``[1, M]``, or 0 for an all-zero spectrum.
    """
    lam = eigenvalues.clamp_min(0)
    num = lam.sum(-1) ** 2
    den = (lam**2).sum(-1)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))


def stable_rank(singular_values: Tensor) -> Tensor:
    """Stable rank ``Σσ² / σ_1²`` (docs/geometry.md §2); 0 for a zero matrix.

    Args:
        singular_values: ``(..., M)`` singular values, descending.
    """
    sq = singular_values.clamp_min(0) ** 2
    top = sq.amax(-1)
    return torch.where(top > 0, sq.sum(-1) / torch.where(top > 0, top, torch.ones_like(top)), torch.zeros_like(top))


def decay_slope(singular_values: Tensor, fit_max: int | None = None, rtol: float | None = None) -> Tensor:
    """Spectral decay exponent ``α`` from the least-squares fit ``log σ_i ≈ c − α log i`` (docs/geometry.md §2).

    The fit runs over ``i = 1..min(M, fit_max)``. Singular values that are numerically zero
    (``σ_i ≤ rtol · σ_1``, default ``rtol = M · eps``) have no logarithm and are left out of the fit, so a
    rank-deficient Jacobian (e.g. a ReLU expert with dead units) is fitted on its nonzero part. With fewer than two
    usable values the slope is NaN.

    Args:
        singular_values: ``(..., M)`` singular values, descending.
        fit_max: largest index used in the fit; None uses all ``M``.
        rtol: relative threshold below which a singular value counts as zero.

    Returns:
        ``(...)`` fitted ``α`` (larger means faster decay).
    """
    if fit_max is not None and fit_max < 2:
        raise ValueError(f"decay_slope: fit_max must be None or an int >= 2, got {fit_max!r}")
    s = singular_values
    m = s.shape[-1]
    if fit_max is not None:
        s = s[..., :fit_max]
    k = s.shape[-1]
    if rtol is None:
        rtol = m * torch.finfo(s.dtype).eps
    top = s[..., :1]
    use = (s > rtol * top) & (s > 0)  # (..., k)
    log_i = torch.log(torch.arange(1, k + 1, dtype=s.dtype, device=s.device)).expand_as(s)
    log_s = torch.log(torch.where(use, s, torch.ones_like(s)))
    wts = use.to(s.dtype)
    n = wts.sum(-1, keepdim=True)
    n_safe = n.clamp_min(1)
    mean_x = (wts * log_i).sum(-1, keepdim=True) / n_safe
    mean_y = (wts * log_s).sum(-1, keepdim=True) / n_safe
    dx = (log_i - mean_x) * wts
    sxx = (dx * dx).sum(-1)
    sxy = (dx * (log_s - mean_y)).sum(-1)
    slope = -sxy / torch.where(sxx > 0, sxx, torch.ones_like(sxx))
    return torch.where(n.squeeze(-1) >= 2, slope, torch.full_like(slope, math.nan))


def n_components_for_variance(eigenvalues: Tensor, fraction: float = 0.9) -> Tensor:
    """Number of leading components whose variance reaches ``fraction`` of the total (``n90``, docs/geometry.md §3).

    A relative slack of ``1e-12`` absorbs round-off when the cumulative sum lands exactly on the fraction.

    Args:
        eigenvalues: ``(..., M)`` eigenvalues, descending.
        fraction: target fraction in ``(0, 1]``.

    Returns:
        ``(...)`` integer counts (as the eigenvalues' dtype); 0 for an all-zero spectrum.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"n_components_for_variance: fraction must be in (0, 1], got {fraction!r}")
    lam = eigenvalues.clamp_min(0)
    total = lam.sum(-1, keepdim=True)
    reached = lam.cumsum(-1) >= fraction * total * (1 - 1e-12)
    count = lam.shape[-1] - reached.sum(-1) + 1
    return torch.where(total.squeeze(-1) > 0, count.to(lam.dtype), torch.zeros_like(total.squeeze(-1)))


def spectral_stats(singular_values: Tensor, fit_max: int | None = None) -> dict[str, Tensor]:
    """All docs/geometry.md §2 statistics of one or many Jacobians from their singular values.

    Args:
        singular_values: ``(..., M)`` singular values, descending (e.g. ``torch.linalg.svdvals(J_NDD)``).
        fit_max: passed to :func:`decay_slope`.

    Returns:
        A dict with keys :data:`SPECTRAL_STAT_NAMES`, each ``(...)``: ``sigma_max``, ``frobenius``,
        ``stable_rank``, ``effective_rank`` (Roy & Vetterli) and ``decay_slope``.

    Example:
        >>> s = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)
        >>> {k: round(v.item(), 4) for k, v in spectral_stats(s).items()}["stable_rank"]
        1.3125
    """
    s = singular_values.clamp_min(0)
    return {
        "sigma_max": s.amax(-1) if s.shape[-1] else torch.zeros(s.shape[:-1], dtype=s.dtype, device=s.device),
        "frobenius": torch.sqrt((s**2).sum(-1)),
        "stable_rank": stable_rank(s),
        "effective_rank": effective_rank(s),
        "decay_slope": decay_slope(s, fit_max=fit_max),
    }

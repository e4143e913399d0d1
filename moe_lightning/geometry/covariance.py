"""``WeightedCovariance``: the weighted PCA moments of docs/geometry.md §3 as a torchmetrics ``Metric`` that sums
over batches and DDP ranks.

It lives apart from :mod:`moe_lightning.geometry.pca` because torchmetrics imports ``transformers`` whenever that is
installed: ``import moe_lightning.geometry`` (and so the adapters, which use its ``MoEView``) loads this module
only when ``WeightedCovariance`` is first used.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from moe_lightning.geometry.pca import PCAResult, moments, pca_from_moments

__all__ = ["WeightedCovariance"]


class WeightedCovariance(Metric):
    """Accumulates ``Σw``, ``Σw²``, ``Σw x``, ``Σw x xᵀ`` and counts over batches and DDP ranks (docs/geometry.md §3).

    Rows with a non-finite value or weight are dropped and counted in ``nonfinite``.

    Args:
        dim: feature dimension ``D``.
        dtype: accumulation dtype (float64 by default: ``C = Σw x xᵀ / Σw − μμᵀ`` cancels digits, docs/geometry.md §3).

    Example:
        >>> metric = WeightedCovariance(dim=3)
        >>> x = torch.randn(10, 3, dtype=torch.float64)
        >>> metric.update(x[:4]); metric.update(x[4:])
        >>> torch.allclose(metric.compute().mean, x.mean(0))
        True
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, dim: int, dtype: torch.dtype = torch.float64, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"WeightedCovariance: dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.accumulate_dtype = dtype
        self.add_state("sum_w", default=torch.zeros((), dtype=dtype), dist_reduce_fx="sum")
        self.add_state("sum_w2", default=torch.zeros((), dtype=dtype), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=dtype), dist_reduce_fx="sum")
        self.add_state("nonfinite", default=torch.zeros((), dtype=dtype), dist_reduce_fx="sum")
        self.add_state("sum_wx", default=torch.zeros(dim, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("sum_wxx", default=torch.zeros(dim, dim, dtype=dtype), dist_reduce_fx="sum")

    def update(self, x: Tensor, w: Tensor | None = None) -> None:
        """Add a batch ``x`` ``(N, D)`` with weights ``w`` ``(N,)`` (ones when None)."""
        x = x.to(self.accumulate_dtype)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"WeightedCovariance.update: x must be (N, {self.dim}), got {tuple(x.shape)}")
        w = torch.ones(x.shape[0], dtype=x.dtype, device=x.device) if w is None else w.to(x.dtype)
        ok = torch.isfinite(x).all(-1) & torch.isfinite(w)
        if bool((w[ok] < 0).any()):
            raise ValueError("WeightedCovariance.update: weights w must be nonnegative")
        self.nonfinite += (~ok).sum().to(x.dtype)
        sw, sw2, swx, swxx, cnt = moments(x[ok], w[ok])
        self.sum_w += sw
        self.sum_w2 += sw2
        self.sum_wx += swx
        self.sum_wxx += swxx
        self.count += cnt

    def compute(self) -> PCAResult:
        """The :class:`PCAResult` of everything accumulated (after the DDP sum)."""
        return pca_from_moments(self.sum_w, self.sum_w2, self.sum_wx, self.sum_wxx, self.count)

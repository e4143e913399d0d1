"""Loss curvature: Hessian-vector products of a loss, and the eigenvalues, traces and spectral density built on
them (docs/geometry.md §7).

Shape legend: ``P`` total number of parameters (the Hessian is ``P × P``; it is never formed).

All run on Hessian-vector products by double backward, ``H v = ∇(∇L · v)`` (Pearlmutter, 1994), as PyHessian
(Yao et al., 2020) does. The gradient graph is built once and reused by every product. None touches ``.grad``
buffers nor the global RNG (a local generator draws the random vectors).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from moe_lightning.common import check_choice, check_positive_int
from moe_lightning.geometry.density import SpectralDensity, slq_density
from moe_lightning.geometry.lanczos import LanczosResult, lanczos
from moe_lightning.geometry.trace import TraceResult, hutchinson, hutchpp

__all__ = ["TRACE_METHODS", "HessianOperator", "hessian_eigenvalues", "hessian_spectral_density", "hessian_trace"]

TRACE_METHODS = ("hutchpp", "hutchinson")


class HessianOperator:
    """``v ↦ H v`` on flat ``(P,)`` vectors for the Hessian of ``loss_fn()`` w.r.t. ``params``: the gradient graph
    is built once here and every product is one backward through it.

    Under data parallelism pass ``all_reduce``, an in-place sum over ranks (e.g. ``torch.distributed.all_reduce``)
    and ``world_size``: each rank differentiates the loss on its own batch shard and the products are averaged with
    one all-reduce each, which equals the Hessian of the mean loss over the union of equal-sized shards. A rank
    whose loss or product fails then contributes NaN instead of raising, so every rank's algorithm sees the same
    non-finite product and stops alike; its error is in ``failure``.

    Attributes:
        dim: ``P``, the number of parameter entries.
        matvecs: products computed so far.
        failure: with ``all_reduce``, the first error of this rank's loss or products, else None.
    """

    def __init__(
        self,
        loss_fn: Callable[[], Tensor],
        params: Sequence[Tensor],
        *,
        all_reduce: Callable[[Tensor], object] | None = None,
        world_size: int = 1,
    ) -> None:
        self.params = list(params)
        if not self.params or not all(p.requires_grad for p in self.params):
            raise ValueError("HessianOperator: params must be a non-empty sequence of tensors requiring grad")
        check_positive_int("HessianOperator: world_size", world_size)
        self.all_reduce, self.world_size = all_reduce, world_size
        self.dim = sum(p.numel() for p in self.params)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.matvecs = 0
        self.failure: BaseException | None = None
        self._grads: tuple[Tensor, ...] = ()
        try:
            with torch.enable_grad():
                loss = loss_fn()
                self._grads = torch.autograd.grad(loss, self.params, create_graph=True)
        except Exception as error:
            if self.all_reduce is None:
                raise
            self.failure = error

    def _local_product(self, v_P: Tensor) -> Tensor:
        parts, offset = [], 0
        for p in self.params:
            parts.append(v_P[offset : offset + p.numel()].view(p.shape).to(p.dtype))
            offset += p.numel()
        with torch.enable_grad():
            out = torch.autograd.grad(
                self._grads, self.params, grad_outputs=parts, retain_graph=True, allow_unused=True
            )
        return torch.cat(
            [
                (torch.zeros_like(p) if o is None else o.detach()).reshape(-1).to(self.dtype)
                for o, p in zip(out, self.params, strict=True)
            ]
        )

    def __call__(self, v_P: Tensor) -> Tensor:
        # Under data parallelism a rank whose loss or product failed keeps entering the all-reduce with NaN (its
        # error kept in ``failure``), so that no rank waits for it: every rank sees the same non-finite product
        # and the algorithm stops at the same step everywhere.
        if self.failure is None:
            try:
                hv = self._local_product(v_P)
            except Exception as error:
                if self.all_reduce is None:
                    raise
                self.failure = error
        if self.failure is not None:
            hv = torch.full((self.dim,), math.nan, dtype=self.dtype, device=self.device)
        if self.all_reduce is not None:
            self.all_reduce(hv)
            hv /= self.world_size
        self.matvecs += 1
        return hv


def hessian_eigenvalues(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    *,
    k: int = 1,
    which: str = "largest",
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    return_vectors: bool = False,
    all_reduce: Callable[[Tensor], object] | None = None,
    world_size: int = 1,
    preconditioner: Tensor | None = None,
) -> LanczosResult:
    """Extreme Hessian eigenvalues by Lanczos with full reorthogonalisation
    (:func:`~moe_lightning.geometry.lanczos.lanczos`) from a seeded Gaussian start; stops when every
    wanted Ritz pair has ``‖H y − θ y‖ ≤ tol · |θ|``.

    With ``preconditioner``, the ``(P,)`` positive diagonal of a ``P``, the eigenvalues are those of ``P⁻¹H``,
    computed on the symmetric ``P^{-1/2} H P^{-1/2}`` (same eigenvalues; its Ritz vectors, if returned, are
    ``P^{1/2}`` times those of ``P⁻¹H``).

    Memory: the ``(iterations, P)`` Krylov basis plus a few ``P``-vectors and the gradient graph."""
    op = HessianOperator(loss_fn, params, all_reduce=all_reduce, world_size=world_size)
    matvec: Callable[[Tensor], Tensor] = op
    if preconditioner is not None:
        scale_P = preconditioner.to(device=op.device, dtype=torch.float64).rsqrt().to(op.dtype)

        def matvec(v_P: Tensor) -> Tensor:
            return scale_P * op(scale_P * v_P)

    gen = torch.Generator(device=op.device).manual_seed(seed)
    v0 = torch.randn(op.dim, generator=gen, dtype=op.dtype, device=op.device)
    return lanczos(matvec, v0, k=k, which=which, max_iter=max_iter, tol=tol, return_vectors=return_vectors)


def hessian_trace(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    *,
    method: str = "hutchpp",
    num_matvecs: int = 30,
    tol: float = 1e-3,
    seed: int = 0,
    all_reduce: Callable[[Tensor], object] | None = None,
    world_size: int = 1,
) -> TraceResult:
    """``tr H`` by Hutch++ (default; ``num_matvecs`` products) or Hutchinson (at most ``num_matvecs`` samples,
    stopping at ``std_error ≤ tol · |trace|``)."""
    check_choice("hessian_trace: method", method, TRACE_METHODS)
    op = HessianOperator(loss_fn, params, all_reduce=all_reduce, world_size=world_size)
    common = {"seed": seed, "dtype": op.dtype, "device": op.device}
    if method == "hutchpp":
        return hutchpp(op, op.dim, num_matvecs=num_matvecs, **common)
    return hutchinson(op, op.dim, max_iter=num_matvecs, tol=tol, **common)


def hessian_spectral_density(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    *,
    num_starts: int = 4,
    num_steps: int = 30,
    grid_size: int = 201,
    sigma: float | None = None,
    relative_sigma: float = 0.01,
    seed: int = 0,
    all_reduce: Callable[[Tensor], object] | None = None,
    world_size: int = 1,
) -> SpectralDensity:
    """Hessian eigenvalue density by stochastic Lanczos quadrature
    (:func:`~moe_lightning.geometry.density.slq_density`)."""
    op = HessianOperator(loss_fn, params, all_reduce=all_reduce, world_size=world_size)
    return slq_density(
        op,
        op.dim,
        num_starts=num_starts,
        num_steps=num_steps,
        grid_size=grid_size,
        sigma=sigma,
        relative_sigma=relative_sigma,
        seed=seed,
        dtype=op.dtype,
        device=op.device,
    )

"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Ghorbani,
Krishnan & Xiao 2019; Papyan 2020; PyHessian, Yao et al. 2020), Gaussian-broadened on a grid (docs/geometry.md §7).

Shape legend: ``P`` operator dimension, ``S`` random starts, ``M`` Lanczos steps per start, ``G`` grid points.

For a unit start ``v``, ``M`` Lanczos steps give the Gauss quadrature ``vᵀ f(A) v ≈ Σ_j τ_j f(θ_j)`` with nodes
``θ_j`` the eigenvalues of ``T_M`` and weights ``τ_j`` the squared first components of its eigenvectors; it is
exact for polynomials of degree ``≤ 2M − 1``. Averaged over random starts, ``Σ_j τ_j δ(t − θ_j)`` estimates the
eigenvalue density ``(1/P) Σ_i δ(t − λ_i)``; each delta is broadened to a Gaussian of width ``σ``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_lightning.common import check_positive, check_positive_int
from moe_lightning.geometry.lanczos import lanczos, tridiagonal

__all__ = ["SpectralDensity", "broadened_density", "slq_density"]


@dataclass
class SpectralDensity:
    """Result of :func:`slq_density`.

    Attributes:
        grid: ``(G,)`` eigenvalue grid, ascending.
        density: ``(G,)`` broadened density on the grid (integrates to 1 over the real line).
        nodes: ``(S, M)`` quadrature nodes (Ritz values) per start.
        weights: ``(S, M)`` their weights; each row sums to 1.
        sigma: the Gaussian width.
        dim: operator dimension ``P`` (``P · density`` is the expected eigenvalue count per unit).
        matvecs: products spent.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    dim: int
    matvecs: int

    def moment(self, power: int) -> float:
        """Quadrature estimate of ``(1/P) tr Aᵖ`` (of the unbroadened density): ``mean_s Σ_j τ_sj θ_sjᵖ``."""
        return float((self.weights * self.nodes**power).sum(-1).mean())

    def histogram(self) -> tuple[Tensor, Tensor]:
        """``(counts, edges)``: expected eigenvalue counts per grid cell (``P · density · width``) and the
        ``G + 1`` cell edges (midpoints between grid points, the ends half a step out), for histogram loggers."""
        step = self.grid[1:] - self.grid[:-1]
        mids = (self.grid[1:] + self.grid[:-1]) / 2
        edges = torch.cat([self.grid[:1] - step[:1] / 2, mids, self.grid[-1:] + step[-1:] / 2])
        return self.dim * self.density * (edges[1:] - edges[:-1]), edges


def broadened_density(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    """``mean_s Σ_j τ_sj N(t; θ_sj, σ²)`` at every grid point ``t``."""
    diff = grid.double()[:, None, None] - nodes.double()[None]  # (G, S, M)
    kernel = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return (kernel * weights.double()[None]).sum(-1).mean(-1)


def slq_density(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    *,
    num_starts: int = 4,
    num_steps: int = 30,
    grid_size: int = 201,
    sigma: float | None = None,
    relative_sigma: float = 0.01,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> SpectralDensity:
    """Eigenvalue density of ``matvec`` by stochastic Lanczos quadrature from ``num_starts`` Gaussian starts.

    Args:
        matvec: ``(P,) -> (P,)`` symmetric product.
        dim: ``P``.
        num_starts: random starts ``S``.
        num_steps: Lanczos steps ``M`` per start (capped at ``P``); costs ``S · M`` products.
        grid_size: grid points ``G``, spread from the smallest node − 4σ to the largest + 4σ.
        sigma: Gaussian width; None uses ``relative_sigma`` times the node range.
        relative_sigma: see ``sigma``.
        seed: seed of the starts (local generator).
    """
    check_positive_int("slq_density: num_starts", num_starts)
    check_positive_int("slq_density: num_steps", num_steps)
    check_positive_int("slq_density: grid_size", grid_size)
    check_positive("slq_density: relative_sigma", relative_sigma)
    if sigma is not None:
        check_positive("slq_density: sigma", sigma)
    gen = torch.Generator(device=device).manual_seed(seed)
    nodes, weights, matvecs = [], [], 0
    for _ in range(num_starts):
        v0 = torch.randn(dim, generator=gen, dtype=dtype, device=device)
        run = lanczos(matvec, v0, k=1, max_iter=num_steps, tol=0.0)
        theta, s = torch.linalg.eigh(tridiagonal(run.alpha, run.beta))
        matvecs += run.iterations
        # an early invariant subspace gives fewer nodes: pad with zero-weight copies to keep one (S, M) array
        pad = min(num_steps, dim) - len(theta)
        nodes.append(torch.cat([theta, theta[-1:].repeat(pad)]))
        weights.append(torch.cat([s[0] ** 2, torch.zeros(pad, dtype=s.dtype)]))
    nodes_sm, weights_sm = torch.stack(nodes), torch.stack(weights)
    lo, hi = float(nodes_sm.min()), float(nodes_sm.max())
    width = sigma if sigma is not None else relative_sigma * max(hi - lo, abs(hi), 1e-12)
    grid = torch.linspace(lo - 4 * width, hi + 4 * width, grid_size, dtype=torch.float64)
    density = broadened_density(nodes_sm, weights_sm, grid, width)
    return SpectralDensity(grid, density, nodes_sm, weights_sm, width, dim, matvecs)

"""Data-free spectra of the experts' weight matrices: the empirical spectral density (ESD) of ``WᵀW``, its power-law
exponent α fitted as WeightWatcher fits it, the spectral norm and the stable rank (docs/geometry.md §8).

Shape legend: ``E`` experts, ``M`` eigenvalues of one matrix (``min(rows, cols)``), ``B`` ESD bins.

The fit follows WeightWatcher 0.7 (Martin & Mahoney, "Implicit self-regularization in deep neural networks",
JMLR 2021; "Predicting trends in the quality of state-of-the-art neural networks without access to training or
testing data", Nature Communications 2021) with its defaults (``fit="PL"``, ``fix_fingers=False``, its own
``pl_package="ww"`` estimator), so that α here is the package's α on the same matrix:

- the eigenvalues are ``λ = σ²``, the squared singular values of ``W`` itself (WeightWatcher no longer divides by
  ``N`` since 0.6.5), and only those above ``1e-5`` enter the fit;
- for every candidate ``x_min`` among the sorted eigenvalues (all but the largest), α is the continuous
  power-law maximum-likelihood estimate on the tail ``λ ≥ x_min``, ``α = 1 + n / Σ log(λ_j / x_min)``
  (Clauset, Shalizi & Newman 2009, eq. 3.1), and ``x_min`` is the candidate whose tail has the smallest
  Kolmogorov–Smirnov distance ``D`` to its fitted law; its standard error is ``(α − 1)/√n``;
- with fewer than 20 eigenvalues it uses WeightWatcher's small-sample estimator: the bias-corrected
  ``α = 1 + (n − 1) / Σ log(λ_j / x_min)`` on tails of at least 8, choosing ``x_min`` by ``D − 0.868/√n``;
- WeightWatcher skips matrices with fewer than 8 eigenvalues (``min_evals=8``); here such a matrix, or one with
  fewer than 8 eigenvalues above ``1e-5``, has no α (NaN: no key is logged for it) and keeps its norms.

The matrices are read without being written: each is copied to float64 on the CPU before its decomposition.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moe_lightning.geometry.view import HasExpertWeights, MoEView

__all__ = [
    "EIGENVALUE_THRESHOLD",
    "MIN_EIGENVALUES",
    "PER_EXPERT_QUANTITIES",
    "WEIGHT_QUANTITIES",
    "PowerLawFit",
    "WeightSpectra",
    "fit_power_law",
    "layer_weight_spectra",
    "matrix_eigenvalues",
    "matrix_quantities",
]

#: Eigenvalues at or below this do not enter the fit (WeightWatcher's ``EVALS_THRESH``).
EIGENVALUE_THRESHOLD = 1e-5
#: The fewest eigenvalues a fit is made from (WeightWatcher's ``DEFAULT_MIN_EVALS``).
MIN_EIGENVALUES = 8
# Below this many eigenvalues WeightWatcher's small-sample estimator replaces the standard one (its
# ``SMALL_N_CUTOFF``); that estimator only considers tails of at least _SMALL_N_MIN_TAIL eigenvalues (its ``k_min``).
_SMALL_N = 20
_SMALL_N_MIN_TAIL = 8
# Rows of the (candidate x_min, eigenvalue) KS table computed at once: bounds the memory of a wide matrix's fit.
_KS_CHUNK_ELEMENTS = 2**22

#: Every quantity of one matrix, in the order :meth:`WeightSpectra.to_dict` and the keys list them.
WEIGHT_QUANTITIES = (
    "alpha",
    "alpha_stderr",
    "alpha_weighted",
    "ks_distance",
    "xmin",
    "tail_size",
    "spectral_norm",
    "stable_rank",
)
#: The quantities logged per expert (the others only as their mean over experts).
PER_EXPERT_QUANTITIES = ("alpha", "spectral_norm")


@dataclass(frozen=True)
class PowerLawFit:
    """A power law ``p(λ) ∝ λ^(-α)`` fitted to the tail ``λ ≥ xmin`` of an ESD.

    Attributes:
        alpha: the exponent α.
        alpha_stderr: its standard error ``(α − 1)/√tail_size`` (WeightWatcher's ``sigma``).
        xmin: where the tail starts (an eigenvalue).
        ks_distance: the Kolmogorov–Smirnov distance between the tail and the fitted law (WeightWatcher's ``D``).
        tail_size: eigenvalues in the tail (WeightWatcher's ``num_pl_spikes``).
    """

    alpha: float
    alpha_stderr: float
    xmin: float
    ks_distance: float
    tail_size: int


def matrix_eigenvalues(weight: Tensor) -> Tensor:
    """The eigenvalues of ``WᵀW`` (the squared singular values of ``W``), ascending, float64 on the CPU.

    From the singular values of a float64 copy rather than from ``WᵀW`` itself, whose small eigenvalues would
    lose the digits that squaring the condition number costs. ``W`` is not written.

    Args:
        weight: a 2-D weight matrix, any layout, dtype and device.

    Returns:
        ``(M,)`` eigenvalues, ``M = min(rows, cols)``.
    """
    if weight.dim() != 2:
        raise ValueError(f"matrix_eigenvalues: weight must be 2-D, got shape {tuple(weight.shape)}")
    sigma_M = torch.linalg.svdvals(weight.detach().to(device="cpu", dtype=torch.float64))
    return (sigma_M**2).flip(0)


def _ks_distances(x_N: np.ndarray, alpha_C: np.ndarray) -> np.ndarray:
    """For each candidate ``x_min = x[i]`` (``i < C``), ``max_k |1 − (x[i+k]/x[i])^(1−α_i) − k/n_i|`` over its tail
    of ``n_i = N − i`` sorted values: the KS distance between the tail's empirical CDF and the fitted law's; 1 where
    ``α_i ≤ 1`` (no normalisable law), as in WeightWatcher."""
    N, C = x_N.shape[0], alpha_C.shape[0]
    distances_C = np.ones(C)
    rows = max(1, _KS_CHUNK_ELEMENTS // N)
    for start in range(0, C, rows):
        i_R = np.arange(start, min(start + rows, C))
        n_R = (N - i_R).astype(np.float64)
        k_RN = np.arange(N)[None, :] - i_R[:, None]  # position in the tail; negative before it
        inside_RN = k_RN >= 0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ratio_RN = x_N[None, :] / x_N[i_R][:, None]
            gap_RN = np.abs(1 - ratio_RN ** (1 - alpha_C[i_R][:, None]) - k_RN / n_R[:, None])
        distance_R = np.where(inside_RN, gap_RN, 0.0).max(axis=1)
        distances_C[i_R] = np.where(alpha_C[i_R] > 1, distance_R, 1.0)
    return distances_C


def fit_power_law(eigenvalues: Tensor | np.ndarray) -> PowerLawFit | None:
    """The power law WeightWatcher fits to an ESD (module docstring), or None with fewer than
    :data:`MIN_EIGENVALUES` eigenvalues above :data:`EIGENVALUE_THRESHOLD`.

    Args:
        eigenvalues: ``(M,)`` eigenvalues of ``WᵀW``, any order.

    Returns:
        The fit, or None.
    """
    values = eigenvalues.detach().cpu().double().numpy() if isinstance(eigenvalues, Tensor) else eigenvalues
    x_N = np.sort(np.asarray(values, dtype=np.float64))
    x_N = x_N[x_N > EIGENVALUE_THRESHOLD]
    N = x_N.shape[0]
    if N < MIN_EIGENVALUES:
        return None
    log_N = np.log(x_N)
    i_C = np.arange(N - 1)  # every eigenvalue but the largest is a candidate x_min
    n_C = (N - i_C).astype(np.float64)
    # Σ_{j ≥ i} log(x_j / x_i), the tail's log-likelihood sum; summed per candidate, as WeightWatcher does, rather
    # than from a cumulative sum whose rounding would grow with N.
    spread_C = np.array([log_N[i:].sum() for i in i_C]) - n_C * log_N[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        if N >= _SMALL_N:
            alpha_C = 1 + n_C / spread_C
            distance_C = _ks_distances(x_N, alpha_C)
            best = int(np.argmin(distance_C))
        else:
            alpha_C = 1 + (n_C - 1) / spread_C
            distance_C = _ks_distances(x_N, alpha_C)
            usable_C = (n_C >= _SMALL_N_MIN_TAIL) & (spread_C > 1e-12) & (alpha_C > 1)
            objective_C = np.where(usable_C, distance_C - 0.868 / np.sqrt(n_C), np.inf)
            if not np.isfinite(objective_C).any():
                return None  # WeightWatcher falls back to the whole ESD here; no tail fits a law
            best = int(np.argmin(objective_C))
    alpha, n = float(alpha_C[best]), int(n_C[best])
    if not math.isfinite(alpha):
        return None
    return PowerLawFit(alpha, (alpha - 1) / math.sqrt(n), float(x_N[best]), float(distance_C[best]), n)


def matrix_quantities(weight: Tensor) -> tuple[dict[str, float], Tensor]:
    """Every quantity of :data:`WEIGHT_QUANTITIES` for one matrix, and its eigenvalues.

    ``spectral_norm`` is ``σ_max = ‖W‖₂`` (WeightWatcher's ``spectral_norm`` column is its square, ``λ_max``);
    ``stable_rank`` is ``‖W‖_F² / ‖W‖₂²``; ``alpha_weighted`` is ``α · log10 λ_max`` (Martin & Mahoney's α̂). A
    matrix holding NaN/Inf gets NaN for every quantity, one without a fit NaN for the fit's.

    Args:
        weight: a 2-D weight matrix, any layout, dtype and device (read, not written).

    Returns:
        ``(quantities, eigenvalues (M,) ascending)``; empty eigenvalues for a non-finite matrix.
    """
    nan = dict.fromkeys(WEIGHT_QUANTITIES, math.nan)
    if not bool(torch.isfinite(weight.detach()).all()):
        return nan, torch.empty(0, dtype=torch.float64)
    eigenvalues_M = matrix_eigenvalues(weight)
    lambda_max = float(eigenvalues_M[-1]) if eigenvalues_M.numel() else 0.0
    out = dict(nan)
    out["spectral_norm"] = math.sqrt(lambda_max)
    out["stable_rank"] = float(eigenvalues_M.sum()) / lambda_max if lambda_max > 0 else math.nan
    fit = fit_power_law(eigenvalues_M)
    if fit is not None:
        out.update(
            alpha=fit.alpha,
            alpha_stderr=fit.alpha_stderr,
            alpha_weighted=fit.alpha * math.log10(lambda_max),
            ks_distance=fit.ks_distance,
            xmin=fit.xmin,
            tail_size=float(fit.tail_size),
        )
    return out, eigenvalues_M


@dataclass
class WeightSpectra:
    """The weight spectra of one layer's experts.

    Attributes:
        name: the layer (the view's name).
        num_experts: ``E``.
        values: ``matrix -> quantity -> (E,)`` float64, NaN for an expert not measured (another rank's, under
            expert parallelism, before the values are summed), without a fit, or whose weights hold NaN/Inf.
        eigenvalues: ``matrix -> [(M,) per expert]``, ascending; what the ESD is made of (this rank's experts).
    """

    name: str
    num_experts: int
    values: dict[str, dict[str, Tensor]]
    eigenvalues: dict[str, list[Tensor | None]] = field(default_factory=dict)

    def scalars(self, prefix: str, max_experts: int | None = None) -> dict[str, float]:
        """Metric keys (docs/callbacks.md, ``WeightSpectraMonitor``): ``<prefix>/<matrix>/<quantity>/mean`` over
        the experts with a finite value, per expert ``.../e<i>`` for :data:`PER_EXPERT_QUANTITIES` (experts
        ``0..max_experts-1``, all with None), and ``<prefix>/<matrix>/alpha/mean_stderr``, the standard error of
        the mean α, ``√(Σ σ_e²)/n`` over the ``n`` fitted experts (independent fits). NaN values have no key."""
        out: dict[str, float] = {}
        shown = self.num_experts if max_experts is None else min(max_experts, self.num_experts)
        for matrix, quantities in self.values.items():
            for quantity, values_E in quantities.items():
                if quantity in PER_EXPERT_QUANTITIES:
                    for e in range(shown):
                        if math.isfinite(float(values_E[e])):
                            out[f"{prefix}/{matrix}/{quantity}/e{e}"] = float(values_E[e])
                finite = values_E[torch.isfinite(values_E)]
                if finite.numel():
                    out[f"{prefix}/{matrix}/{quantity}/mean"] = float(finite.mean())
            stderr_E = quantities["alpha_stderr"]
            fitted = torch.isfinite(quantities["alpha"]) & torch.isfinite(stderr_E)
            if bool(fitted.any()):
                out[f"{prefix}/{matrix}/alpha/mean_stderr"] = float(stderr_E[fitted].square().sum().sqrt()) / int(
                    fitted.sum()
                )
        return out

    def esd(self, bins: int = 50) -> dict[str, dict[str, Any]]:
        """Each matrix's ESD: the density of ``log10 λ`` (eigenvalues above :data:`EIGENVALUE_THRESHOLD`) on
        ``bins`` equal bins spanning every expert's, ``{"log10_edges": [B+1], "density": [[B] per expert]}``, an
        expert without eigenvalues an empty list."""
        out: dict[str, dict[str, Any]] = {}
        for matrix, per_expert in self.eigenvalues.items():
            logs = [
                None if ev is None or ev.numel() == 0 else ev[ev > EIGENVALUE_THRESHOLD].log10() for ev in per_expert
            ]
            present = [x for x in logs if x is not None and x.numel()]
            if not present:
                continue
            low = min(float(x.min()) for x in present)
            high = max(float(x.max()) for x in present)
            high = high if high > low else low + 1.0
            edges_B = torch.linspace(low, high, bins + 1, dtype=torch.float64)
            densities = []
            for x in logs:
                if x is None or x.numel() == 0:
                    densities.append([])
                    continue
                counts_B = torch.histc(x, bins=bins, min=low, max=high)
                densities.append((counts_B / (x.numel() * (edges_B[1] - edges_B[0]))).tolist())
            out[matrix] = {"log10_edges": edges_B.tolist(), "density": densities}
        return out

    def to_dict(self, esd_bins: int = 50) -> dict[str, Any]:
        """A JSON-ready dict: ``{"name", "num_experts", "values": {matrix: {quantity: [E]}}, "esd": ...}``; NaN
        stays NaN."""
        return {
            "name": self.name,
            "num_experts": self.num_experts,
            "values": {m: {q: v.tolist() for q, v in qs.items()} for m, qs in self.values.items()},
            "esd": self.esd(esd_bins),
        }


def layer_weight_spectra(view: MoEView, experts: Iterable[int] | None = None) -> WeightSpectra | None:
    """The weight spectra of a layer's experts, from the matrices its view offers (:class:`HasExpertWeights`).

    Args:
        view: the layer.
        experts: the experts to measure (under expert parallelism, some of this rank's); None all. The others'
            values are NaN.

    Returns:
        The spectra, or None where the view does not offer its experts' weights.
    """
    if not isinstance(view, HasExpertWeights):
        return None
    E = view.num_experts
    chosen = list(range(E)) if experts is None else list(experts)
    values: dict[str, dict[str, Tensor]] = {}
    eigenvalues: dict[str, list[Tensor | None]] = {}
    for e in chosen:
        matrices = view.expert_weights(e)
        if matrices is None:
            return None
        for matrix, weight in matrices.items():
            quantities, eigenvalues_M = matrix_quantities(weight)
            if matrix not in values:
                values[matrix] = {q: torch.full((E,), math.nan, dtype=torch.float64) for q in WEIGHT_QUANTITIES}
                eigenvalues[matrix] = [None] * E
            for quantity, value in quantities.items():
                values[matrix][quantity][e] = value
            eigenvalues[matrix][e] = eigenvalues_M
    return WeightSpectra(view.name, E, values, eigenvalues)

"""Geometry core: exact and matrix-free Jacobian spectra, weighted PCA, alignment, Grassmann distances, curvature,
router statistics, and the probe that measures them on one MoE layer seen through :class:`MoEView`.

Pure PyTorch (no Lightning). Definitions: docs/geometry.md; usage: docs/geometry-api.md. ``WeightedCovariance`` is
imported on first use (it needs torchmetrics, which imports transformers when installed).
"""

from typing import TYPE_CHECKING

from moe_lightning.geometry.alignment import (
    alignment_chance,
    jacobian_alignment,
    offdiag_summary,
    pointwise_cosine_sums,
)
from moe_lightning.geometry.bootstrap import BOOTSTRAP_QUANTITIES, bootstrap_values, resample_counts
from moe_lightning.geometry.curvature import (
    TRACE_METHODS,
    EigenResult,
    HessianOperator,
    TraceResult,
    hessian_eigenvalues,
    hessian_spectral_density,
    hessian_top_eigenvalue,
    hessian_trace,
    hessian_vector_product,
    hutchinson_trace,
)
from moe_lightning.geometry.density import SpectralDensity, broadened_density, slq_density
from moe_lightning.geometry.jacobians import (
    ACTIVATIONS,
    DEFAULT_MEMORY_BUDGET_BYTES,
    activation_derivative,
    compose_layer_jacobian,
    expert_jacobian,
    jacobians,
    layer_jacobian,
    mlp_expert_jacobian,
    swiglu_expert_jacobian,
)
from moe_lightning.geometry.krylov import TopRResult, topr_singular_values
from moe_lightning.geometry.lanczos import LanczosResult, lanczos
from moe_lightning.geometry.operators import (
    JacobianOperator,
    compose_layer_operator,
    func_jacobian_operator,
    mlp_jacobian_operator,
    swiglu_jacobian_operator,
)
from moe_lightning.geometry.pca import PCAResult, pca_from_moments, pca_ranks, weighted_pca
from moe_lightning.geometry.probe import finalize, probe, probe_statistics
from moe_lightning.geometry.probe_config import ProbeConfig
from moe_lightning.geometry.report import GeometryReport
from moe_lightning.geometry.router import router_health, router_statistics, routing_sums, window_statistics
from moe_lightning.geometry.spectra import (
    SPECTRAL_STAT_NAMES,
    SPECTRAL_VARIANTS,
    batched_svdvals,
    decay_slope,
    effective_rank,
    n_components_for_variance,
    participation_ratio,
    spectral_stats,
    stable_rank,
)
from moe_lightning.geometry.statistics import ProbeStatistics
from moe_lightning.geometry.subspaces import (
    GrassmannDistance,
    grassmann_distance,
    orthonormal_basis,
    principal_angles,
    rank_gap,
    subspace_overlap_chance,
)
from moe_lightning.geometry.trace import hutchinson, hutchpp
from moe_lightning.geometry.view import MoEView

__all__ = [
    "BOOTSTRAP_QUANTITIES",
    "bootstrap_values",
    "resample_counts",
    "ACTIVATIONS",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "EigenResult",
    "HessianOperator",
    "LanczosResult",
    "SpectralDensity",
    "TRACE_METHODS",
    "broadened_density",
    "hessian_eigenvalues",
    "hessian_spectral_density",
    "hessian_trace",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "slq_density",
    "GeometryReport",
    "GrassmannDistance",
    "JacobianOperator",
    "MoEView",
    "PCAResult",
    "ProbeConfig",
    "ProbeStatistics",
    "SPECTRAL_STAT_NAMES",
    "SPECTRAL_VARIANTS",
    "TopRResult",
    "TraceResult",
    "WeightedCovariance",
    "activation_derivative",
    "alignment_chance",
    "batched_svdvals",
    "compose_layer_jacobian",
    "compose_layer_operator",
    "decay_slope",
    "effective_rank",
    "expert_jacobian",
    "finalize",
    "func_jacobian_operator",
    "grassmann_distance",
    "hessian_top_eigenvalue",
    "hessian_vector_product",
    "hutchinson_trace",
    "jacobian_alignment",
    "jacobians",
    "layer_jacobian",
    "mlp_expert_jacobian",
    "mlp_jacobian_operator",
    "n_components_for_variance",
    "offdiag_summary",
    "orthonormal_basis",
    "participation_ratio",
    "pca_from_moments",
    "pca_ranks",
    "pointwise_cosine_sums",
    "principal_angles",
    "probe",
    "probe_statistics",
    "rank_gap",
    "router_health",
    "router_statistics",
    "routing_sums",
    "spectral_stats",
    "stable_rank",
    "subspace_overlap_chance",
    "swiglu_expert_jacobian",
    "swiglu_jacobian_operator",
    "topr_singular_values",
    "weighted_pca",
    "window_statistics",
]

if TYPE_CHECKING:
    from moe_lightning.geometry.covariance import WeightedCovariance


def __getattr__(name: str) -> object:
    if name == "WeightedCovariance":
        from moe_lightning.geometry.covariance import WeightedCovariance

        return WeightedCovariance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

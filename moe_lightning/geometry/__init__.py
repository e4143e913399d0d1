"""Geometry core: exact and matrix-free Jacobian spectra, weighted PCA, alignment, Grassmann distances, curvature,
router statistics, and the probe that measures them on one MoE layer seen through :class:`MoEView`.

Pure PyTorch (no Lightning). Definitions: docs/geometry.md; usage: docs/geometry-api.md. ``WeightedCovariance`` is
imported on first use (it needs torchmetrics, which imports transformers when installed).

``__all__`` is the public API, grouped as docs/api/geometry.md shows it. The helpers the probe is built from
(moments, routing sums, chunking) are imported from the modules that define them (``moe_lightning.geometry.pca``,
``.router``, ...). The imports are eager: ``probe``, ``jacobians`` and ``lanczos`` share their names with modules of
this package, and an attribute loaded on first use would be shadowed by the module once it is imported.
"""

from typing import TYPE_CHECKING

from moe_lightning.geometry.alignment import alignment_chance, jacobian_alignment
from moe_lightning.geometry.bootstrap import BOOTSTRAP_QUANTITIES, resample_counts
from moe_lightning.geometry.curvature import (
    HessianOperator,
    hessian_eigenvalues,
    hessian_spectral_density,
    hessian_trace,
)
from moe_lightning.geometry.density import SpectralDensity, slq_density
from moe_lightning.geometry.jacobians import jacobians, layer_jacobian, mlp_expert_jacobian, swiglu_expert_jacobian
from moe_lightning.geometry.krylov import TopRResult, topr_singular_values
from moe_lightning.geometry.lanczos import LanczosResult, lanczos
from moe_lightning.geometry.lapack import congruence_eigh, congruence_eigvalsh, symmetric_gram
from moe_lightning.geometry.operators import (
    JacobianOperator,
    compose_layer_operator,
    func_jacobian_operator,
    mlp_jacobian_operator,
    swiglu_jacobian_operator,
)
from moe_lightning.geometry.pca import PCAResult, weighted_pca
from moe_lightning.geometry.probe import finalize, probe, probe_statistics
from moe_lightning.geometry.probe_config import ProbeConfig
from moe_lightning.geometry.report import GeometryReport
from moe_lightning.geometry.router import router_health, router_statistics
from moe_lightning.geometry.spectra import (
    batched_eigvalsh,
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
    pairwise_grassmann,
    principal_angles,
    subspace_overlap_chance,
)
from moe_lightning.geometry.trace import TraceResult, hutchinson, hutchpp
from moe_lightning.geometry.verify import ViewCheck, verify_view
from moe_lightning.geometry.view import (
    CastsOnRead,
    ExpertPlacement,
    HasExpertWeights,
    HasJacobianOperator,
    HasPlacement,
    MoEView,
    check_view,
)

__all__ = [
    # The probe
    "probe",
    "ProbeConfig",
    "GeometryReport",
    "probe_statistics",
    "ProbeStatistics",
    "finalize",
    # The view protocol
    "MoEView",
    "HasJacobianOperator",
    "HasExpertWeights",
    "CastsOnRead",
    "HasPlacement",
    "ExpertPlacement",
    "check_view",
    "verify_view",
    "ViewCheck",
    # Jacobians and operators
    "jacobians",
    "mlp_expert_jacobian",
    "swiglu_expert_jacobian",
    "layer_jacobian",
    "topr_singular_values",
    "TopRResult",
    "JacobianOperator",
    "mlp_jacobian_operator",
    "swiglu_jacobian_operator",
    "func_jacobian_operator",
    "compose_layer_operator",
    # Spectra
    "spectral_stats",
    "effective_rank",
    "stable_rank",
    "participation_ratio",
    "decay_slope",
    "n_components_for_variance",
    "batched_eigvalsh",
    "congruence_eigh",
    "congruence_eigvalsh",
    "symmetric_gram",
    "batched_svdvals",
    # Representations (weighted PCA)
    "weighted_pca",
    "PCAResult",
    "WeightedCovariance",
    # Alignment and subspaces
    "jacobian_alignment",
    "alignment_chance",
    "principal_angles",
    "grassmann_distance",
    "pairwise_grassmann",
    "GrassmannDistance",
    "subspace_overlap_chance",
    # Router statistics
    "router_statistics",
    "router_health",
    # Curvature
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_spectral_density",
    "HessianOperator",
    "LanczosResult",
    "TraceResult",
    "SpectralDensity",
    "lanczos",
    "hutchpp",
    "hutchinson",
    "slq_density",
    # Bootstrap
    "resample_counts",
    "BOOTSTRAP_QUANTITIES",
]

if TYPE_CHECKING:
    from moe_lightning.geometry.covariance import WeightedCovariance


def __getattr__(name: str) -> object:
    if name == "WeightedCovariance":
        from moe_lightning.geometry.covariance import WeightedCovariance

        return WeightedCovariance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

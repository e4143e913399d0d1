"""The probe's quantities, one :class:`~moe_lightning.geometry.accumulators.base.Accumulator` each (docs/geometry.md
§1–5): token counts, expert spectra, mean Jacobians, layer Jacobian, PCA moments, alignment, CKA and subspaces."""

from moe_lightning.geometry.accumulators.alignment import Alignment
from moe_lightning.geometry.accumulators.base import (
    Accumulator,
    NotComputed,
    SkippedForOneExpert,
    SpectralMoments,
)
from moe_lightning.geometry.accumulators.context import Chunk, ProbeContext
from moe_lightning.geometry.accumulators.expert_spectra import ExpertSpectra
from moe_lightning.geometry.accumulators.layer_jacobian import LayerJacobian
from moe_lightning.geometry.accumulators.mean_jacobian import FactoredMeanJacobian, MeanJacobian
from moe_lightning.geometry.accumulators.pca import PCAMoments
from moe_lightning.geometry.accumulators.similarity import ExpertCKA
from moe_lightning.geometry.accumulators.subspaces import Subspaces
from moe_lightning.geometry.accumulators.tokens import TokenCounts

__all__ = [
    "Accumulator",
    "Alignment",
    "Chunk",
    "ExpertCKA",
    "ExpertSpectra",
    "FactoredMeanJacobian",
    "LayerJacobian",
    "MeanJacobian",
    "NotComputed",
    "PCAMoments",
    "ProbeContext",
    "SkippedForOneExpert",
    "SpectralMoments",
    "Subspaces",
    "TokenCounts",
]

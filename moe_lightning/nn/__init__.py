"""The networks, pure torch: the MoE layer (its router and experts), the dense baseline, the MLP and transformer
models, and the router's load-balancing losses. Nothing here imports Lightning.

The names load on first use::

    from moe_lightning.nn import MoEConfig, MoELayer
    layer = MoELayer(MoEConfig(dim=64, expert_hidden=128, num_experts=8, top_k=2))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_lightning.common.lazy import lazy_names

if TYPE_CHECKING:
    from moe_lightning.nn.layer import DenseFFN, MoEAux, MoEConfig, MoELayer, Router, build_ffn
    from moe_lightning.nn.models import MLPMoE, MLPMoEConfig, ModelOutput, TransformerMoE, TransformerMoEConfig

# Public name -> the module that defines it.
_SOURCES = {
    "DenseFFN": "layer",
    "MLPMoE": "models",
    "MLPMoEConfig": "models",
    "ModelOutput": "models",
    "MoEAux": "layer",
    "MoEConfig": "layer",
    "MoELayer": "layer",
    "Router": "layer",
    "TransformerMoE": "models",
    "TransformerMoEConfig": "models",
    "build_ffn": "layer",
}
__all__ = [
    "DenseFFN",
    "MLPMoE",
    "MLPMoEConfig",
    "MoEAux",
    "MoEConfig",
    "MoELayer",
    "ModelOutput",
    "Router",
    "TransformerMoE",
    "TransformerMoEConfig",
    "build_ffn",
]

__getattr__, __dir__ = lazy_names(__name__, _SOURCES)

"""The networks, pure torch: the MoE layer (its router and grouped experts), the dense baseline, the MLP and
transformer models, and the router's load-balancing losses. Nothing here imports Lightning.

One job to a module: ``config`` (:class:`MoEConfig`), ``router``, ``experts``, ``layer`` (:class:`MoELayer`,
:class:`DenseFFN`), ``models`` and ``balancing``. The names load on first use::

    from moe_lightning.nn import MoEConfig, MoELayer
    layer = MoELayer(MoEConfig(dim=64, expert_hidden=128, num_experts=8, top_k=2))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_lightning.common.lazy import lazy_names

if TYPE_CHECKING:
    from moe_lightning.nn.balancing import (
        bias_update,
        load_balance_loss,
        router_z_loss,
        sequence_load_balance_loss,
        update_expert_biases,
    )
    from moe_lightning.nn.config import MoEConfig
    from moe_lightning.nn.experts import GroupedExperts, auto_sparse_dispatch
    from moe_lightning.nn.layer import DenseFFN, MoELayer, build_ffn, reorder_tokens
    from moe_lightning.nn.models import (
        MLPMoE,
        MLPMoEConfig,
        ModelOutput,
        TransformerMoE,
        TransformerMoEConfig,
        param_counts,
    )
    from moe_lightning.nn.router import MoEAux, Router, RouterOutput, topk_gates

# Public name -> the module that defines it.
_SOURCES = {
    "DenseFFN": "layer",
    "GroupedExperts": "experts",
    "MLPMoE": "models",
    "MLPMoEConfig": "models",
    "ModelOutput": "models",
    "MoEAux": "router",
    "MoEConfig": "config",
    "MoELayer": "layer",
    "Router": "router",
    "RouterOutput": "router",
    "TransformerMoE": "models",
    "TransformerMoEConfig": "models",
    "auto_sparse_dispatch": "experts",
    "bias_update": "balancing",
    "build_ffn": "layer",
    "load_balance_loss": "balancing",
    "param_counts": "models",
    "reorder_tokens": "layer",
    "router_z_loss": "balancing",
    "sequence_load_balance_loss": "balancing",
    "topk_gates": "router",
    "update_expert_biases": "balancing",
}
__all__ = [
    "DenseFFN",
    "GroupedExperts",
    "MLPMoE",
    "MLPMoEConfig",
    "MoEAux",
    "MoEConfig",
    "MoELayer",
    "ModelOutput",
    "Router",
    "RouterOutput",
    "TransformerMoE",
    "TransformerMoEConfig",
    "auto_sparse_dispatch",
    "bias_update",
    "build_ffn",
    "load_balance_loss",
    "param_counts",
    "reorder_tokens",
    "router_z_loss",
    "sequence_load_balance_loss",
    "topk_gates",
    "update_expert_biases",
]

__getattr__, __dir__ = lazy_names(__name__, _SOURCES)

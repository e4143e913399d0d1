"""Adapters: every supported MoE block seen through the :class:`~moe_lightning.geometry.MoEView` contract.

``find_moe_layers(model)`` returns the views of a model's MoE layers (moe-lightning's own, every Hugging Face MoE
block, and the classes registered here); ``scan_moe_layers`` also says which blocks it skipped and why. A layer of
your own is viewed through ``register_moe_class``, a ``CallableView`` or a ``register_adapter`` pair.
"""

from moe_lightning.adapters.base import CallableView, selection_bias
from moe_lightning.adapters.custom import register_moe_class
from moe_lightning.adapters.declare import RouterOutput, StackedExperts, register_moe
from moe_lightning.adapters.hf import register_hf_adapters
from moe_lightning.adapters.native import is_native, native_views
from moe_lightning.adapters.registry import (
    BlockNotViewable,
    LayerScan,
    SkippedLayer,
    find_moe_layers,
    register_adapter,
    registered_adapters,
    scan_moe_layers,
)

register_adapter("moe_lightning", is_native, native_views)
register_hf_adapters()  # matches by class name; never imports transformers itself
import moe_lightning.adapters.libraries  # noqa: E402,F401  (registers the built-in declarations)

__all__ = [
    # Finding the MoE layers of a model
    "find_moe_layers",
    "scan_moe_layers",
    "LayerScan",
    "SkippedLayer",
    "BlockNotViewable",
    # Viewing a layer of your own
    "register_moe",
    "RouterOutput",
    "StackedExperts",
    "register_moe_class",
    "CallableView",
    "register_adapter",
    "registered_adapters",
    "selection_bias",
]

"""Adapters: every supported MoE block seen through the :class:`MoEView` contract."""

from moe_lightning.adapters.base import CallableView, MoEView
from moe_lightning.adapters.custom import register_moe_class
from moe_lightning.adapters.hf import register_hf_adapters
from moe_lightning.adapters.native import NativeMoEView, is_native, native_views
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

__all__ = [
    "BlockNotViewable",
    "LayerScan",
    "SkippedLayer",
    "register_moe_class",
    "scan_moe_layers",
    "CallableView",
    "MoEView",
    "NativeMoEView",
    "find_moe_layers",
    "register_adapter",
    "registered_adapters",
]

"""Adapters: every supported MoE block seen through the :class:`MoEView` contract."""

from moe_lightning.adapters.base import CallableView, MoEView
from moe_lightning.adapters.custom import register_moe_class
from moe_lightning.adapters.hf import register_hf_adapters
from moe_lightning.adapters.ours import OurMoEView, _is_ours, our_views
from moe_lightning.adapters.registry import find_moe_layers, register_adapter, registered_adapters

register_adapter("moe_lightning", _is_ours, our_views)
register_hf_adapters()  # matches by class name; never imports transformers itself

__all__ = [
    "register_moe_class",
    "CallableView",
    "MoEView",
    "OurMoEView",
    "find_moe_layers",
    "register_adapter",
    "registered_adapters",
]

"""Adapters: every supported MoE block seen through the :class:`MoEView` contract."""

from moe_lightning.adapters.base import CallableView, MoEView
from moe_lightning.adapters.ours import OurMoEView, _is_ours, our_views
from moe_lightning.adapters.registry import find_moe_layers, register_adapter, registered_adapters

register_adapter("moe_lightning", _is_ours, our_views)

__all__ = ["CallableView", "MoEView", "OurMoEView", "find_moe_layers", "register_adapter", "registered_adapters"]

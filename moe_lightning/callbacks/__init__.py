"""Lightning callbacks that observe MoE layers through the ``MoEView`` seam and log what they see."""

from moe_lightning.callbacks.curvature_monitor import CurvatureMonitor
from moe_lightning.callbacks.geometry_monitor import GeometryMonitor
from moe_lightning.callbacks.router_monitor import RouterMonitor
from moe_lightning.callbacks.weight_spectra_monitor import WeightSpectraMonitor

__all__ = ["CurvatureMonitor", "GeometryMonitor", "RouterMonitor", "WeightSpectraMonitor"]

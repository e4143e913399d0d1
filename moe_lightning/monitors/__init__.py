"""The monitors without Lightning: the loop-agnostic cores of ``GeometryMonitor``, ``RouterMonitor`` and
``CurvatureMonitor``, usable from the Hugging Face Trainer (:mod:`moe_lightning.monitors.hf`, with the ``hf`` extra),
or from an Accelerate loop or a plain training loop through :class:`LoopMonitors` (docs/without-lightning.md). Each
core holds its schedule, its fixed probe set or batch, its checkpointable state, its sums over the ranks of
``torch.distributed`` and the guarantee that it only observes; the Lightning callbacks are thin wrappers around it,
with the same keys and values."""

from moe_lightning.monitors.curvature_probe import CurvatureProbe
from moe_lightning.monitors.geometry_probe import GeometryProbe
from moe_lightning.monitors.loop import LoopMonitors
from moe_lightning.monitors.ranks import Ranks
from moe_lightning.monitors.router_probe import RouterProbe
from moe_lightning.monitors.weight_spectra import WeightSpectraProbe

__all__ = ["CurvatureProbe", "GeometryProbe", "LoopMonitors", "Ranks", "RouterProbe", "WeightSpectraProbe"]

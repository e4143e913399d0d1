"""moe-lightning: train Mixture-of-Experts models with PyTorch Lightning, with geometry probes built in.

The names most programs need, at the top level (each imported on first use, so that ``import moe_lightning`` and
the command line's ``--help`` stay cheap):

- the layer: :class:`MoEConfig`, :class:`MoELayer`;
- the monitors: :class:`GeometryMonitor`, :class:`RouterMonitor`, :class:`CurvatureMonitor`,
  :class:`WeightSpectraMonitor`;
- probing a model of your own: :func:`find_moe_layers`, :func:`probe`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_lightning.common.lazy import lazy_names
from moe_lightning.common.moved import install as _install_moved_paths

if TYPE_CHECKING:
    from moe_lightning.adapters import find_moe_layers
    from moe_lightning.callbacks import CurvatureMonitor, GeometryMonitor, RouterMonitor, WeightSpectraMonitor
    from moe_lightning.geometry import probe
    from moe_lightning.nn import MoEConfig, MoELayer

__version__ = "0.1.0"

# Public name -> the module that defines it.
_SOURCES = {
    "CurvatureMonitor": "callbacks",
    "GeometryMonitor": "callbacks",
    "MoEConfig": "nn",
    "MoELayer": "nn",
    "RouterMonitor": "callbacks",
    "WeightSpectraMonitor": "callbacks",
    "find_moe_layers": "adapters",
    "probe": "geometry",
}
__all__ = [
    "CurvatureMonitor",
    "GeometryMonitor",
    "MoEConfig",
    "MoELayer",
    "RouterMonitor",
    "WeightSpectraMonitor",
    "__version__",
    "find_moe_layers",
    "probe",
]

__getattr__, __dir__ = lazy_names(__name__, _SOURCES)
_install_moved_paths()

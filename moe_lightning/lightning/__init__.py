"""The Lightning glue: the two LightningModules and the optimiser and loss-weight arguments they share
(``modules``), the W&B logger that goes offline by itself (``loggers``) and the expert-parallel strategy
(``strategy``).

The names load on first use, and configs may name them here or in their modules::

    model:
      class_path: moe_lightning.lightning.MLPMoEModule
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_lightning.common.lazy import lazy_names

if TYPE_CHECKING:
    from moe_lightning.lightning.loggers import AutoWandbLogger
    from moe_lightning.lightning.modules import CausalLMModule, LossWeights, MLPMoEModule, OptimizerConfig
    from moe_lightning.lightning.strategy import ExpertParallelStrategy

# Public name -> the module that defines it.
_SOURCES = {
    "AutoWandbLogger": "loggers",
    "CausalLMModule": "modules",
    "ExpertParallelStrategy": "strategy",
    "LossWeights": "modules",
    "MLPMoEModule": "modules",
    "OptimizerConfig": "modules",
}
__all__ = [
    "AutoWandbLogger",
    "CausalLMModule",
    "ExpertParallelStrategy",
    "LossWeights",
    "MLPMoEModule",
    "OptimizerConfig",
]

__getattr__, __dir__ = lazy_names(__name__, _SOURCES)

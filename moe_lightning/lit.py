"""The old module path of the LightningModules (now :mod:`moe_lightning.modules`), kept so old configs
(``class_path: moe_lightning.lit.MLPMoEModule``), recorded sweep results and saved checkpoints still load."""

from moe_lightning.modules import CausalLMModule, LossWeights, MLPMoEModule, OptimizerConfig  # noqa: F401

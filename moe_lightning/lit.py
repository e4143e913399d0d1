"""The old module path of the LightningModules, now :mod:`moe_lightning.modules`. Old configs
(``class_path: moe_lightning.lit.MLPMoEModule``), recorded sweep results and saved checkpoints still load through
it, with a warning that names the new path; it goes in the next release."""

from __future__ import annotations

import importlib
import warnings

_NAMES = ("CausalLMModule", "LossWeights", "MLPMoEModule", "OptimizerConfig")


def __getattr__(name: str) -> object:
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"moe_lightning.lit.{name} is deprecated and goes in the next release; use moe_lightning.modules.{name}",
        FutureWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module("moe_lightning.modules"), name)

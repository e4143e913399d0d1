"""Module paths of the 0.1 layout, kept importable for one release.

Configs (``class_path: moe_lightning.modules.MLPMoEModule``), checkpoints (whose pickled hyperparameters name
``moe_lightning.models.MLPMoEConfig``) and scripts written for 0.1 name modules that now live in the layer folders.
Each old path resolves to the module that replaced it, the same module object, so classes, pickles and
``isinstance`` checks agree, and the first import warns once with the new path."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

# Old module path -> the module that replaced it.
MOVED = {
    "moe_lightning.balancing": "moe_lightning.nn.balancing",
    "moe_lightning.cli": "moe_lightning.commands",
    "moe_lightning.cli.trainer": "moe_lightning.commands.trainer",
    "moe_lightning.expert_parallel": "moe_lightning.distributed.expert_parallel",
    "moe_lightning.lit": "moe_lightning.lightning.modules",
    "moe_lightning.loggers": "moe_lightning.lightning.loggers",
    "moe_lightning.models": "moe_lightning.nn.models",
    "moe_lightning.modules": "moe_lightning.lightning.modules",
    "moe_lightning.moe": "moe_lightning.nn.layer",
    "moe_lightning.parallelize": "moe_lightning.distributed.layout",
    "moe_lightning.pretrained": "moe_lightning.commands.probe",
    "moe_lightning.report.command": "moe_lightning.commands.report",
    "moe_lightning.report.workspace_command": "moe_lightning.commands.dashboard",
    "moe_lightning.run_summary": "moe_lightning.commands.run_summary",
    "moe_lightning.strategy": "moe_lightning.lightning.strategy",
    "moe_lightning.sweep": "moe_lightning.commands.sweep",
}
MOVED.update(
    {
        f"moe_lightning.pretrained.{name}": f"moe_lightning.commands.probe.{name}"
        for name in ("command", "load", "options", "run", "text", "write")
    }
)


class _Alias(importlib.abc.Loader):
    """Loads an old path as the module that replaced it."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} has moved to {self.new}; import it from there (the old path goes in the next release)",
            FutureWarning,
            stacklevel=2,
        )
        module = importlib.import_module(self.new)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system has stamped the alias spec on the shared module object; give it back its own.
        module.__spec__ = self._spec

    def get_code(self, fullname: str) -> object:
        """The new module's code, for ``python -m <old path>`` (runpy runs a module from its code)."""
        warnings.warn(f"{fullname} has moved to {self.new}; run `python -m {self.new}`", FutureWarning, stacklevel=2)
        return importlib.util.find_spec(self.new).loader.get_code(self.new)


class MovedModules(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder for the paths in :data:`MOVED`."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(name)
        if new is None:
            return None
        target = importlib.util.find_spec(new)
        spec = importlib.machinery.ModuleSpec(
            name, _Alias(new), is_package=target.submodule_search_locations is not None
        )
        if spec.submodule_search_locations is not None:
            # An old package path: its submodules (``python -m moe_lightning.cli`` runs ``__main__``) come from the
            # new package's folder.
            spec.submodule_search_locations = list(target.submodule_search_locations)
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModules())

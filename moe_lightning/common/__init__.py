"""Helpers every layer of the package shares, written once: config checks, dtype names, the choices that the model,
the probe and the report share (``common.choices``), observing a module without changing it, telling an
FSDP2-sharded module, warn-once, network checks, and names imported on first use. Pure Python and torch: the bottom
of the import graph. Each name is imported when first used, so that importing the package (and a command's
``--help``) does not import torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_lightning.common.lazy import lazy_names

if TYPE_CHECKING:
    from moe_lightning.common.checks import check_choice, check_nonnegative, check_positive, check_positive_int
    from moe_lightning.common.dtypes import DTYPES, dtype_from_name, dtype_name
    from moe_lightning.common.network import hf_offline_mode, hub_reachable, tcp_reachable
    from moe_lightning.common.observe import observation, preserved_rng, restored_modes
    from moe_lightning.common.sharding import is_fsdp_module
    from moe_lightning.common.warn import warn_once

# Public name -> the module that defines it.
_SOURCES = {
    "DTYPES": "dtypes",
    "check_choice": "checks",
    "check_nonnegative": "checks",
    "check_positive": "checks",
    "check_positive_int": "checks",
    "dtype_from_name": "dtypes",
    "dtype_name": "dtypes",
    "hf_offline_mode": "network",
    "hub_reachable": "network",
    "is_fsdp_module": "sharding",
    "observation": "observe",
    "preserved_rng": "observe",
    "restored_modes": "observe",
    "tcp_reachable": "network",
    "warn_once": "warn",
}
__all__ = [
    "DTYPES",
    "check_choice",
    "check_nonnegative",
    "check_positive",
    "check_positive_int",
    "dtype_from_name",
    "dtype_name",
    "hf_offline_mode",
    "hub_reachable",
    "is_fsdp_module",
    "observation",
    "preserved_rng",
    "restored_modes",
    "tcp_reachable",
    "warn_once",
]

__getattr__, __dir__ = lazy_names(__name__, _SOURCES)
